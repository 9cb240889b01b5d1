"""`python -m tests.e2e.serve_config_driver MODEL`: deploy `deploy/serve-config.yaml` the way KubeRay
does: a local Ray offering the chart's custom resources (`epd-gateway` as the head does, one unit of
each role's as the worker groups do), then the config through the dashboard's REST API (what `serve
deploy` calls), so the builder runs in Serve's build task. Prints one JSON line once /ready answers
200 (its URL, the workers' and the gateway's actors), then waits to be stopped; the Ray it started
ends with it."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import ray
import yaml
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
from ray.util.state import list_actors

from loadgen.server import free_port

ROOT = Path(__file__).resolve().parents[2]


def main(model: str) -> None:
    dashboard, http = free_port(), free_port()
    resources = {"epd-gateway": 1, "epd-e": 1, "epd-p": 1, "epd-d": 1}
    ray.init(num_cpus=4, resources=resources, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard, _node_ip_address="127.0.0.1", log_to_driver=False)  # fmt: skip
    config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http}
    config["applications"][0]["args"].update(model=model, role_resources=True, max_model_len=2048)
    ServeSubmissionClient(f"http://127.0.0.1:{dashboard}").deploy_applications(config)
    url = f"http://127.0.0.1:{http}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    actors = [
        {"name": a.name, "namespace": a.ray_namespace, "detached": a.is_detached,
         "resources": a.required_resources}
        for a in list_actors(address=f"http://127.0.0.1:{dashboard}", filters=[("state", "=", "ALIVE")],
                             detail=True)
        if a.class_name == "StageWorker" or a.class_name.endswith(":gateway")
    ]  # fmt: skip
    print(json.dumps({"url": url, "workers": actors}), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(sys.argv[1])
