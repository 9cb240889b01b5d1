"""`deploy/serve-config.yaml` deployed for real, as KubeRay deploys the chart's: through Ray's dashboard
REST API into a Ray with one unit of each role's resource. The builder's workers come up detached,
each holding its role's resource, and the gateway serves a chat completion over them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import openai
import pytest

from tests.deploy.conftest import ROOT


@pytest.fixture(scope="module")
def deployed(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-config") / "driver.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.serve_config_driver", str(tiny_model)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        line = proc.stdout.readline() if ready else ""
        assert line, f"the Serve config did not become ready:\n{log.read_text()[-3000:]}"
        yield json.loads(line), tiny_model.name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_workers_are_detached_and_placed_by_role_resource(deployed):
    info, _ = deployed
    workers = {w["name"]: w for w in info["workers"] if "gateway" not in w["name"]}
    assert sorted(workers) == ["d-2-serve", "e-0-serve", "p-1-serve"]
    (gateway,) = [w for w in info["workers"] if "gateway" in w["name"]]
    assert "epd-gateway" in gateway["resources"]  # it stays on the head
    for name, w in workers.items():
        assert w["detached"] and w["namespace"] == "epd"
        assert w["resources"].get(f"epd-{name.split('-')[0]}") == 1, w


def test_gateway_from_the_serve_config_answers(deployed):
    info, model = deployed
    client = openai.OpenAI(base_url=f"{info['url']}/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
