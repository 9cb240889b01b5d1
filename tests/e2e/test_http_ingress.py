"""Under `epd serve` the gateway replica serves HTTP itself (no Ray Serve proxy in between): the
listening socket is the replica's, a killed replica comes back on the same port with the workers it
left, and a port that is taken stops `epd serve` at once with the reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadgen.server import free_port, listener_pid, start_server, stop_server


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _chat(url: str, **extra) -> dict:
    body = {"model": "epd-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_gateway_replica_itself_listens_on_the_http_port(tiny_model: Path, tmp_path):
    proc, url = start_server(["--model", str(tiny_model), "--topology", "epd"], tmp_path / "serve.log")
    try:
        port = int(url.rsplit(":", 1)[1])
        owner = listener_pid(port)
        assert "ServeReplica:epd:gateway" in _cmdline(owner), _cmdline(owner)
        answer = _chat(url, temperature=0)
        assert answer["choices"][0]["message"]["content"]
        names = [w["name"] for w in httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]]
        assert names

        # The replica dies with a stream in flight: that stream fails (never a 200 that ends in an
        # empty answer), Serve starts a new replica, and it binds the same port and adopts the workers.
        errors: list[BaseException] = []
        finished: list[str] = []

        def stream() -> None:
            body = {
                "model": "epd-tiny", "messages": [{"role": "user", "content": "a long story"}],
                "max_tokens": 3000, "ignore_eos": True, "stream": True,
            }  # fmt: skip
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                            if reason:
                                finished.append(reason)
            except httpx.HTTPError as e:
                errors.append(e)

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(1.0)
        os.kill(owner, signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert errors and not finished, (errors, finished)

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the gateway did not come back")
        replacement = listener_pid(port)
        assert replacement != owner and "ServeReplica:epd:gateway" in _cmdline(replacement)
        again = _chat(url, temperature=0)
        assert again["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
        # The same workers, adopted by the new replica: none started anew.
        after = [w["name"] for w in httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]]
        assert after == names
    finally:
        stop_server(proc)


def test_a_taken_port_stops_epd_serve_at_once_with_the_reason(tiny_model: Path, tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _workers(url: str) -> dict[str, dict]:
    return {w["name"]: w for w in httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]}


def _until(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, AssertionError, LookupError):  # not answering yet; nothing listening yet
            pass
        time.sleep(0.5)
    pytest.fail("timed out")


def test_a_restarted_gateway_adopts_the_workers_after_churn(tiny_model: Path, tmp_path):
    """A decode worker killed and replaced under a new name, one added, one removed; then the gateway
    replica killed: the new replica serves again and adopts exactly the workers there were, the
    replacement and the added one included (it finds them by the deployment's id, not by the names
    `epd serve` started with)."""
    args = ["--model", str(tiny_model), "--topology", "e+p+d", "--decode", "2"]
    proc, url = start_server(args, tmp_path / "serve.log", timeout_s=240)
    try:
        before = _workers(url)
        first, second = sorted(n for n, w in before.items() if w["roles"] == "d")
        os.kill(before[first]["pid"], signal.SIGKILL)

        def replaced() -> bool:
            now = _workers(url)
            fresh = [n for n, w in now.items() if n not in before and w["roles"] == "d"]
            return first not in now and bool(fresh) and now[fresh[0]]["phase"] == "active"

        _until(replaced)
        added = httpx.post(f"{url}/admin/workers", json={"roles": "d"}, timeout=120)
        assert added.status_code == 201, added.text
        assert httpx.delete(f"{url}/admin/workers/{second}", timeout=120).status_code == 200
        churned = set(_workers(url))
        assert second not in churned and added.json()["name"] in churned

        owner = listener_pid(int(url.rsplit(":", 1)[1]))
        os.kill(owner, signal.SIGKILL)
        _until(lambda: listener_pid(int(url.rsplit(":", 1)[1])) != owner, 90)
        _until(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 90)
        assert set(_workers(url)) == churned, "the same workers, none lost, none started anew"
        assert _chat(url, temperature=0)["choices"][0]["message"]["content"]
    finally:
        stop_server(proc)
