"""The Helm chart, checked by the real Helm: lint, render with the default and example values, the
manifests against the Kubernetes schemas and the RayService against KubeRay's fields, values the
schema refuses, and the monitoring objects against the generated rules and dashboards."""

from __future__ import annotations

import copy
import json
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.observability import render as generated
from tests.deploy.conftest import CHART, EXAMPLES, by_kind, helm_template, render
from tests.deploy.kuberay_schema import RAY_SERVICE

K8S_VERSION = "1.35.0"  # the kubectl Helm ships beside (make tools)
OPERATOR_KINDS = {"RayService", "ServiceMonitor", "PrometheusRule"}  # CRDs: checked below instead
EVERYTHING_ON = (
    "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "networkPolicy.enabled=true", "--set", "ingress.enabled=true",
    "--set", "apiKeys.create=true", "--set", "apiKeys.keys={key-one-1234,key-two-5678}",
    "--set", "metricsRequireKey=true", "--set", "grpc.enabled=true",
)  # fmt: skip
VALUE_SETS = {
    "defaults": (),
    "everything on": EVERYTHING_ON,
    **{f"example {p.stem}": ("-f", str(p)) for p in EXAMPLES},
    **{f"topology {t}": ("--set", f"topology={t}") for t in ("ep+d", "e+pd", "epd")},
    "model from object storage": (
        "--set",
        "model.source=objectStore",
        "--set",
        "model.objectStore.uri=s3://b/m",
    ),
}


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, *args) for name, args in VALUE_SETS.items()}


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"kind-cpu", "gpu-8x"}


@pytest.mark.parametrize(
    "values", [(), *[("-f", str(p)) for p in EXAMPLES]], ids=["defaults", *[p.stem for p in EXAMPLES]]
)
def test_helm_lint(helm, values):
    result = subprocess.run([helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_manifests_validate_against_kubernetes_schemas(rendered):
    checked = set()
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] not in OPERATOR_KINDS:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked.add(doc["kind"])
    assert checked >= {"Service", "ConfigMap", "PodDisruptionBudget", "Ingress", "NetworkPolicy", "Secret"}


def pod_templates(rayservice: dict) -> list[tuple[str, dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, g["template"]) for name, g in groups]


def test_rayservice_uses_only_kuberay_fields_and_valid_pod_templates(rendered):
    for docs in rendered.values():
        (rayservice,) = by_kind(docs, "RayService")
        jsonschema.validate(rayservice, RAY_SERVICE)
        for group, template in pod_templates(rayservice):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": group},
                "template": template,
            }
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_a_misspelled_or_misplaced_field_is_caught(rendered):
    (rayservice,) = by_kind(rendered["defaults"], "RayService")
    jsonschema.validate(rayservice, RAY_SERVICE)
    misspelled = copy.deepcopy(rayservice)
    misspelled["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    misplaced = copy.deepcopy(rayservice)
    misplaced["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 1
    for bad in (misspelled, misplaced):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, RAY_SERVICE)
    wrong_pod = copy.deepcopy(pod_templates(rayservice)[1][1])
    wrong_pod["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": wrong_pod},
            K8S_VERSION,
            strict=True,
        )


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    (rayservice,) = by_kind(docs, "RayService")
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def serve_args(docs: list[dict]) -> dict:
    (rayservice,) = by_kind(docs, "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app["args"]


@pytest.mark.parametrize(
    "topology, groups",
    [("defaults", {"encode": "e", "prefill": "p", "decode": "d"}),
     ("topology ep+d", {"prefill": "ep", "decode": "d"}),
     ("topology e+pd", {"encode": "e", "prefill": "pd"}), ("topology epd", {"prefill": "epd"})],
)  # fmt: skip
def test_one_worker_group_per_role_set_with_its_resource(rendered, topology, groups):
    found = worker_groups(rendered[topology])
    assert {
        name: g["template"]["metadata"]["labels"]["epd-serve/roles"] for name, g in found.items()
    } == groups
    for name, roles in groups.items():
        assert json.loads(json.loads(found[name]["rayStartParams"]["resources"])) == {f"epd-{roles}": 1}
    (rayservice,) = by_kind(rendered[topology], "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert json.loads(json.loads(head["resources"])) == {"epd-gateway": 1}
    args = serve_args(rendered[topology])
    assert args["role_resources"] is True and args["topology"] == topology.split()[-1].replace(
        "defaults", "e+p+d"
    )


def test_example_gpu_node_requests_gpus_and_bounds(rendered):
    docs = rendered["example gpu-8x"]
    groups = worker_groups(docs)
    assert sum(g["replicas"] for g in groups.values()) == 8
    for g in groups.values():
        (container,) = g["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert g["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert serve_args(docs).items() >= {"encode": 1, "prefill": 3, "decode": 4, "dtype": "bfloat16"}.items()
    assert len(by_kind(docs, "PodDisruptionBudget")) == 3
    (head,) = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ]
    (env,) = [e for e in head["env"] if e["name"] == "EPD_API_KEYS"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == "epd-api-keys"


def test_model_is_mounted_read_only_or_copied_by_an_init_container(rendered):
    for name in ("defaults", "example kind-cpu"):
        for _, template in pod_templates(by_kind(rendered[name], "RayService")[0]):
            mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model")
            assert mount["readOnly"] is True
            assert "initContainers" not in template["spec"]
    for _, template in pod_templates(by_kind(rendered["model from object storage"], "RayService")[0]):
        (init,) = template["spec"]["initContainers"]
        assert {e["name"]: e["value"] for e in init["env"]}["MODEL_URI"] == "s3://b/m"


def test_probes_hit_health_and_ready(rendered):
    (rayservice,) = by_kind(rendered["defaults"], "RayService")
    (head,) = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["livenessProbe"]["httpGet"]["path"] == "/health"
    assert head["readinessProbe"]["httpGet"]["path"] == "/ready"


BAD_VALUES = {
    "replicas as a string": ("--set-string", "workerGroups.decode.replicas=two"),
    "negative TTFT target": ("--set", "slo.ttftSeconds=-1"),
    "unknown topology": ("--set", "topology=e+d"),
    "port out of range": ("--set", "service.port=70000"),
    "attainment target above 1": ("--set", "slo.attainmentTarget=2"),
    "controller mode as a boolean": ("--set", "controller.mode=true"),
    "unknown model source": ("--set", "model.source=huggingface"),
    "misspelled key": ("--set", "workerGroups.prefill.maxReplica=3"),
    "gpus out of range": ("--set", "workerGroups.encode.gpus=64"),
    "gRPC on the HTTP port": ("--set", "grpc.port=8000"),
    "replicas above maxReplicas": ("--set", "workerGroups.decode.replicas=9"),
    "keys to create but none given": ("--set", "apiKeys.create=true"),
    "GPU memory fraction above 1": ("--set", "engine.gpuMemoryUtilization=1.5"),
    "KV cache memory in words": ("--set", "engine.kvCacheMemory=lots"),
    "block size 0": ("--set", "engine.blockSize=0"),
    "max_num_seqs 0": ("--set", "engine.maxNumSeqs=0"),
    "unknown engine key": ("--set", "engine.maxModelLength=4096"),
}


@pytest.mark.parametrize("args", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused(helm, args):
    result = helm_template(helm, *args)
    assert result.returncode != 0
    assert (
        "schema" in result.stderr or "replicas must lie" in result.stderr or "apiKeys.create" in result.stderr
    )


def test_prometheus_rule_equals_the_plain_rules_file_at_default_thresholds(helm):
    docs = render(helm, "--set", "monitoring.prometheusRule.enabled=true")
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(generated.rules_text())


def test_prometheus_rule_thresholds_come_from_values(helm, promtool, tmp_path):
    docs = render(
        helm, "--set", "monitoring.prometheusRule.enabled=true", "--set-json", "slo.attainmentTarget=0.75"
    )
    (rule,) = by_kind(docs, "PrometheusRule")
    (alert,) = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "EPDSLOAttainmentLow"
    ]
    assert alert["expr"].endswith("< 0.75")
    assert "{{ $labels.model_name }}" in alert["annotations"]["summary"]  # Prometheus templates survive Helm
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_monitor_and_dashboards(rendered):
    docs = rendered["everything on"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert endpoint["authorization"]["credentials"]["name"] == "epd-epd-serve-api-keys"
    (service,) = by_kind(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 50051}
    assert serve_args(docs)["grpc_port"] == 50051 and serve_args(docs)["host"] == "0.0.0.0"
    boards = {name: json.loads(text) for name, text in (
        (k, v) for cm in by_kind(docs, "ConfigMap") for k, v in cm["data"].items())}  # fmt: skip
    assert boards == generated.dashboards()
    for cm in by_kind(docs, "ConfigMap"):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_notes_say_how_to_reach_api_and_dashboards(helm):
    result = subprocess.run(
        [helm, "install", "epd", str(CHART), "--dry-run=client", "--namespace", "serving"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/epd-epd-serve 8000:8000" in notes
    assert "EPD Serve — SLO and goodput" in notes


def engine_digest(helm, *args: str) -> set[str]:
    (rayservice,) = by_kind(render(helm, *args), "RayService")
    return {t["metadata"]["annotations"]["epd-serve/engine-config"] for _, t in pod_templates(rayservice)}


def test_engine_changes_start_a_new_cluster_and_serve_changes_do_not(helm):
    base = engine_digest(helm)
    assert len(base) == 1  # the same on every pod template
    assert engine_digest(helm, "--set-json", "slo.ttftSeconds=0.5", "--set", "limits.maxQueued=9") == base
    assert engine_digest(helm, "--set", "dtype=bfloat16") != base
    assert engine_digest(helm, "--set", "model.name=other") != base
    assert engine_digest(helm, "--set", "engine.kvCacheMemory=1GiB") != base
    assert engine_digest(helm, "--set-json", "engine.gpuMemoryUtilization=0.9") != base
    assert engine_digest(helm, "--set", "engine.maxEncodePatches=4096") != base


def test_head_drains_before_it_stops(rendered):
    (rayservice,) = by_kind(rendered["defaults"], "RayService")
    spec = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (head,) = spec["containers"]
    assert "/admin/shutdown" in head["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert spec["terminationGracePeriodSeconds"] > 30
