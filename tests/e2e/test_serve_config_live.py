"""`deploy/serve-config.yaml` deployed for real, as KubeRay deploys the chart's: through Ray's dashboard
REST API into a real two-node Ray cluster on loopback whose nodes offer the roles' resources. The
builder's workers come up detached, each holding its role's resource, one decode worker on the second
node; the gateway serves over them, prefill on the head handing KV to decode on the other node over
NIXL; and when the second node dies under streaming load (its raylet killed), its decode worker is
replaced on the head, its streams migrate, and no request is lost."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.deploy.conftest import ROOT


def _session(pid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(entry)) == pid:
                found.add(int(entry))
        except OSError:
            continue
    return found


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
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        for pid in _session(proc.pid):  # both nodes' Ray processes, which `ray start` left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_workers_are_detached_and_placed_by_role_resource(deployed):
    info, _ = deployed
    workers = {w["name"]: w for w in info["workers"] if "gateway" not in w["name"]}
    assert sorted(workers) == ["d-2-serve", "d-3-serve", "d-4-serve", "e-0-serve", "p-1-serve"]
    (gateway,) = [w for w in info["workers"] if "gateway" in w["name"]]
    assert "epd-gateway" in gateway["resources"] and gateway["node"] == "head"  # it stays on the head
    for name, w in workers.items():
        assert w["detached"] and w["namespace"] == "epd"
        assert w["resources"].get(f"epd-{name.split('-')[0]}") == 1, w
    # The second node offers one unit of epd-d: exactly one decode worker is there.
    assert sorted(w["node"] for w in workers.values() if w["name"].startswith("d-")) == [
        "head",
        "head",
        "second",
    ]


def test_gateway_from_the_serve_config_answers(deployed):
    info, model = deployed
    client = openai.OpenAI(base_url=f"{info['url']}/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


def _stream(url: str, model: str, i: int, out: list) -> None:
    body = {
        "model": model, "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 1900,
        "ignore_eos": True, "stream": True, "temperature": 0,
    }  # fmt: skip
    finish = None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=180) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out[i] = ("error", chunk["error"])
                        return
                    finish = chunk["choices"][0]["finish_reason"] or finish
        out[i] = ("done", finish)
    except httpx.HTTPError as e:
        out[i] = ("error", repr(e))


def test_a_dead_node_s_decode_worker_is_replaced_on_the_other_and_no_stream_is_lost(deployed):
    info, model = deployed
    url = info["url"]
    second = next(w for w in info["workers"] if w["node"] == "second")
    on_head = sorted(w["name"] for w in info["workers"] if w["name"].startswith("d-") and w["node"] == "head")
    # Room on the head for the replacement: one of its two decode workers leaves (its epd-d unit frees).
    assert httpx.delete(f"{url}/admin/workers/{on_head[0]}", timeout=120).status_code == 200
    results: list = [None] * 6
    threads = [threading.Thread(target=_stream, args=(url, model, i, results)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # streams decoding on both decode workers (prefill on the head, KV over NIXL)
    os.kill(info["raylets"]["second"], signal.SIGKILL)  # the second node dies with its workers
    assert not all(results), "streams are in flight when the node dies"
    for t in threads:
        t.join(timeout=240)
    assert results == [("done", "length")] * 6, results

    def replaced() -> bool:
        workers = {w["name"]: w for w in httpx.get(f"{url}/admin/workers", timeout=30).json()["workers"]}
        fresh = [w for n, w in workers.items() if n.startswith("d-") and n not in (second["name"], *on_head)]
        return second["name"] not in workers and len(fresh) == 1 and fresh[0]["phase"] == "active"

    deadline = time.monotonic() + 120
    while not replaced():
        assert time.monotonic() < deadline, "the lost decode worker was not replaced"
        time.sleep(1)
    workers = httpx.get(f"{url}/admin/workers", timeout=30).json()["workers"]
    (fresh,) = [
        w for w in workers if w["name"].startswith("d-") and w["name"] not in (second["name"], *on_head)
    ]
    with open(f"/proc/{fresh['pid']}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    assert parent == info["raylets"]["head"], "the replacement runs on the surviving node"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert reply.usage.completion_tokens >= 1
