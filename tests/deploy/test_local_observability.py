"""`deploy/local-observability.sh`: a real Prometheus on loopback, with the EPD rules, scraping a
server's /metrics (here a loopback endpoint serving the gateway's own metrics registry)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from loadgen.server import free_port
from serving.telemetry.metrics import Metrics
from tests.deploy.conftest import ROOT, tool


@pytest.fixture
def metrics_endpoint():
    body = generate_latest(Metrics("epd-tiny", 2.0, 0.2).registry)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def test_script_runs_prometheus_with_rules_against_the_server(metrics_endpoint):
    tool("prometheus", "run `make tools` (apt-get install prometheus); apt was unavailable here")
    prom_port = free_port()
    env = {**os.environ, "PORT": str(metrics_endpoint), "PROM_PORT": str(prom_port), "SCRAPE": "1s"}
    script = ROOT / "deploy" / "local-observability.sh"
    proc = subprocess.Popen([str(script)], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url, health = f"http://127.0.0.1:{prom_port}", None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and health != "up":
            try:
                (target,) = get(f"{url}/api/v1/targets")["activeTargets"]
                health = target["health"]
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        assert health == "up", proc.stdout.read() if proc.poll() is not None else health
        assert target["scrapeUrl"] == f"http://127.0.0.1:{metrics_endpoint}/metrics"
        groups = {g["name"]: len(g["rules"]) for g in get(f"{url}/api/v1/rules")["groups"]}
        assert groups == {"epd-serve-slo": 12, "epd-serve-alerts": 6}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
