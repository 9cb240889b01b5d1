"""The KubeRay `ray.io/v1` RayService fields this chart writes, as a strict JSON schema.

A subset of the operator's CRD (v1.3+), written down from its API reference: every object closes its
field list (`additionalProperties: false`), so a misspelled or misplaced field fails validation where
the API server would prune it silently. Pod templates are checked separately against the Kubernetes
`PodTemplateSpec` schema (`kubernetes-validate`).
"""

from __future__ import annotations

from typing import Any


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
POD_TEMPLATE = {"type": "object"}  # checked as a core/v1 PodTemplateSpec by kubernetes-validate

HEAD_GROUP = closed(
    {
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
    },
    ("template",),
)
WORKER_GROUP = closed(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "numOfHosts": INT32,
        "suspend": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": closed({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
    },
    ("groupName", "template", "maxReplicas"),
)
AUTOSCALER = closed(
    {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": INT32,
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "resources": {"type": "object"},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "securityContext": {"type": "object"},
        "volumeMounts": {"type": "array"},
        "version": {"enum": ["v1", "v2"]},
    }
)
RAY_CLUSTER_SPEC = closed(
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": AUTOSCALER,
        "headServiceAnnotations": STRING_MAP,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
    },
    ("headGroupSpec",),
)
RAY_SERVICE = closed(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": closed(
            {
                "name": {"type": "string", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },  # fmt: skip
            ("name",),
        ),
        "spec": closed(
            {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "rayClusterConfig": RAY_CLUSTER_SPEC,
                "upgradeStrategy": closed(
                    {"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}}
                ),
                "serviceUnhealthySecondThreshold": INT32,
                "deploymentUnhealthySecondThreshold": INT32,
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serveService": {"type": "object"},
            },
            ("rayClusterConfig",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
