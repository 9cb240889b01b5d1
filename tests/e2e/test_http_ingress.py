"""Under `epd serve` the gateway replica serves HTTP itself (no Ray Serve proxy in between): the
listening socket is the replica's, a killed replica comes back on the same port with the workers it
left, and a port that is taken stops `epd serve` at once with the reason. (A replica killed after
workers were replaced, added and removed: `test_gateway_replicas.py`.)"""

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
