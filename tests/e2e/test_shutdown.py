"""SIGTERM to `epd serve` (what Kubernetes and systemd send): admission stops (new requests get 503
with Retry-After), streams in flight finish, then every process the server started is gone."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from loadgen.server import start_server, stop_server


def _children(pid: int) -> set[int]:
    """Every other process of the session `pid` leads (the server starts one: Ray's processes too)."""
    sid = pid
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and int(entry) != pid:
                    found.add(int(entry))
            except OSError:
                continue
    return found


def test_sigterm_finishes_streams_refuses_new_requests_and_leaves_no_process(tiny_model: Path, tmp_path):
    proc, url = start_server(
        ["--model", str(tiny_model), "--topology", "epd", "--shutdown-grace", "60"], tmp_path / "serve.log"
    )
    try:
        body = {
            "model": "epd-tiny",
            "messages": [{"role": "user", "content": "a long story"}],
            "max_tokens": 3000,  # several seconds of decoding: still running when SIGTERM arrives
            "ignore_eos": True,
            "stream": True,
        }
        finished: list[str | None] = []

        def stream() -> None:
            reason = None
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        reason = chunk["choices"][0]["finish_reason"] or reason
            finished.append(reason)

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert _children(proc.pid), "the server runs Ray processes"
        proc.send_signal(signal.SIGTERM)  # the server process only, as an orchestrator would
        time.sleep(0.5)
        assert not finished, "the streams are still running"
        refused = httpx.post(f"{url}/v1/chat/completions", json=body | {"stream": False}, timeout=30)
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(timeout=120)
        assert finished == ["length"] * 3, "streams in flight run to their end"
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while (left := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left behind: {left}"
    finally:
        stop_server(proc)
