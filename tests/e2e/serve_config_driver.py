"""`python -m tests.e2e.serve_config_driver MODEL`: deploy `deploy/serve-config.yaml` the way KubeRay
does, on a real two-node Ray cluster on loopback (two raylets, two object stores, one GCS, started as
`ray start --head` and `ray start --address` would, by Ray's own `cluster_utils`): a head offering the
chart's head and worker-group resources (`epd-gateway`, one unit of `epd-e` and `epd-p`, two of
`epd-d`) and a second node offering one more `epd-d`; then the config, with three decode
workers, through the dashboard's REST API (what `serve deploy` calls), so the builder runs in Serve's
build task and exactly one decode worker lands on the second node. Prints one JSON line once /ready
answers 200 (its URL, the workers' and the gateway's actors with their nodes, each node's raylet pid),
then waits to be stopped; both nodes end with it."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
from ray.util.state import list_actors

from loadgen.server import free_port

ROOT = Path(__file__).resolve().parents[2]
HEAD_RESOURCES = {"epd-gateway": 1, "epd-e": 1, "epd-p": 1, "epd-d": 2}
SECOND_RESOURCES = {"epd-d": 1}


def main(model: str) -> None:
    import ray._private.utils
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Both nodes are children of this process and end with it. The cluster must not be left behind as
    # "the last one started" (/tmp/ray/ray_current_cluster): a later `ray.init()` would join it.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    dashboard, http = free_port(), free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=4, resources=HEAD_RESOURCES, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=dashboard, object_store_memory=300 * 2**20,
        ),
    )  # fmt: skip
    second = cluster.add_node(num_cpus=2, resources=SECOND_RESOURCES)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http}
    config["applications"][0]["args"].update(model=model, role_resources=True, max_model_len=2048, decode=3)
    ServeSubmissionClient(f"http://127.0.0.1:{dashboard}").deploy_applications(config)
    url = f"http://127.0.0.1:{http}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)

    def raylet(node) -> int:  # noqa: ANN001 - Ray's private Node
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    nodes = {cluster.head_node.node_id: "head", second.node_id: "second"}
    actors = [
        {"name": a.name, "namespace": a.ray_namespace, "detached": a.is_detached,
         "resources": a.required_resources, "node": nodes.get(a.node_id), "pid": a.pid}
        for a in list_actors(address=f"http://127.0.0.1:{dashboard}", filters=[("state", "=", "ALIVE")],
                             detail=True)
        if a.class_name == "StageWorker" or a.class_name.endswith(":gateway")
    ]  # fmt: skip
    raylets = {"head": raylet(cluster.head_node), "second": raylet(second)}
    print(json.dumps({"url": url, "workers": actors, "raylets": raylets}), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    cluster.shutdown()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(sys.argv[1])
