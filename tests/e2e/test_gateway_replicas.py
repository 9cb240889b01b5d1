"""Two gateway replicas in front of one control actor (`epd serve --gateway-replicas 2`): both listen
on the port and serve; the control actor killed under load (a decode worker with it) is restarted
by Ray, rebuilds the same membership, starts a worker in place of the one lost meanwhile and orphans
none, while the gateways keep serving; a gateway replica killed under load after all that churn takes
only its own streams with it, and its replacement serves the same workers; SIGTERM to `epd serve`
stops admission on every replica, lets every stream finish, and leaves no process behind. (One server
for all of it: each start costs the suite ~40 s.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loadgen.server import listener_pids, start_server, stop_server


def _admin(url: str) -> dict:
    return httpx.get(f"{url}/admin/workers", timeout=30).json()


def _workers(url: str) -> dict[str, dict]:
    return {w["name"]: w for w in _admin(url)["workers"]}


def _until(check: Callable[[], bool], timeout_s: float = 120, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, LookupError, KeyError):  # a replica restarting; nothing listening yet
            pass
        time.sleep(every_s)
    pytest.fail("timed out")


def _served_by(url: str) -> str:
    body = {"model": "epd-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)  # a new connection each
    assert response.status_code == 200, response.text
    return response.headers["x-epd-gateway"]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _children(pid: int) -> set[int]:
    """Every other process of the session `pid` leads (the server starts one: Ray's processes too)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(entry)) == pid and int(entry) != pid:
                found.add(int(entry))
        except OSError:
            continue
    return found


def _stage_workers(server: int) -> int:
    """Worker processes alive in the session the server `epd serve` (pid `server`) leads."""
    count = 0
    for pid in _children(server):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += f.read().startswith(b"ray::StageWorker")
        except OSError:
            continue
    return count


class Streams:
    """Long streamed requests on their own connections: which gateway took each, how each ended."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.gateway: list[str | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.error: list[str | None] = [None] * n
        # When each answered and ended, from the start: what a failed timing assertion prints.
        self.times: list[list[float]] = [[] for _ in range(n)]
        self._t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(url, i, max_tokens)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, url: str, i: int, max_tokens: int) -> None:
        body = {
            "model": "epd-tiny", "messages": [{"role": "user", "content": f"story {i}"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
        }  # fmt: skip
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                self.gateway[i] = response.headers.get("x-epd-gateway")
                self.times[i].append(round(time.monotonic() - self._t0, 2))
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        self.finish[i] = choice["finish_reason"] or self.finish[i]
                    elif line.startswith("data: ") and '"error"' in line:
                        self.error[i] = line
        except httpx.HTTPError as e:
            self.error[i] = repr(e)
        self.times[i].append(round(time.monotonic() - self._t0, 2))

    def started(self) -> bool:
        return all(g is not None for g in self.gateway)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads)


def test_two_gateways_share_one_control_plane_through_its_restart_and_theirs(tiny_model: Path, tmp_path):
    args = ["--model", str(tiny_model), "--topology", "e+p+d", "--decode", "2", "--gateway-replicas", "2"]
    args += ["--shutdown-grace", "60"]
    proc, url = start_server(args, tmp_path / "serve.log", timeout_s=240)
    port = int(url.rsplit(":", 1)[1])
    try:
        # Both replicas listen on the one port, and both answer (the kernel spreads new connections:
        # 24 requests all on one replica would be a 1-in-2^23 chance).
        _until(lambda: len(listener_pids(port)) == 2)
        assert all("ServeReplica:epd:gateway" in _cmdline(pid) for pid in listener_pids(port))
        assert len({_served_by(url) for _ in range(24)}) == 2

        # Churn: a decode worker killed and replaced under a new name, one added, one removed.
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
        churned = _workers(url)
        assert second not in churned and added.json()["name"] in churned

        # The control actor killed under load, and a decode worker while it is down: every stream
        # ends normally (the gateways route with the directory they have; streams on the dead worker
        # migrate), and the restarted actor adopts the live workers and starts one in place of the dead.
        control = _admin(url)["control"]["pid"]
        streams = Streams(url, 8, max_tokens=1500)
        _until(streams.started, 60, every_s=0.02)
        os.kill(control, signal.SIGKILL)
        assert not all(streams.finish), "streams are in flight when the control actor dies"
        victim = sorted(n for n, w in churned.items() if w["roles"] == "d")[0]
        os.kill(churned[victim]["pid"], signal.SIGKILL)
        streams.join()
        assert streams.error == [None] * 8 and streams.finish == ["length"] * 8, streams.error

        def rebuilt() -> bool:
            view = _admin(url)
            now = {w["name"]: w for w in view["workers"]}
            fresh = [n for n in now if n not in churned]
            return (
                view["control"]["pid"] not in (0, control)
                and set(now) == set(churned) - {victim} | set(fresh)
                and len(fresh) == 1
                and now[fresh[0]]["roles"] == "d"
                and all(w["phase"] == "active" for w in now.values())
            )

        _until(rebuilt)
        membership = _workers(url)
        assert _stage_workers(proc.pid) == len(membership), "no worker orphaned"

        # A gateway replica killed under load: its own streams fail, the other replica's all finish;
        # Serve starts a replacement, which serves the same workers. The one killed has a stream still
        # running once every stream has its answer's headers (a replica's id starts with its pid). On
        # a loaded 2-core machine a round's streams had all ended by then (CI saw it once): that round
        # proves nothing about a kill, so it is let finish and run again, its timings printed.
        for _ in range(3):
            streams = Streams(url, 16, max_tokens=1500)
            _until(streams.started, 60, every_s=0.02)
            running = [g for g, f in zip(streams.gateway, streams.finish, strict=True) if f is None]
            if running:
                break
            streams.join()
            print("every stream ended before the kill; again:", streams.gateway, streams.times)
        else:
            pytest.fail("three rounds of 16 streams all ended before a replica could be killed")
        killed_pid = int(running[0].split("-")[0])
        assert killed_pid in listener_pids(port), (running[0], listener_pids(port))
        replicas = set(streams.gateway)
        os.kill(killed_pid, signal.SIGKILL)
        streams.join()
        assert len(replicas) == 2, "16 streams all on one replica: a 1-in-2^15 chance"
        lost = [i for i, e in enumerate(streams.error) if e is not None]
        assert lost and {streams.gateway[i] for i in lost} == {running[0]}, (streams.gateway, streams.error)
        survivor = (replicas - {running[0]}).pop()
        assert all(
            f == "length" for g, f in zip(streams.gateway, streams.finish, strict=True) if g == survivor
        )
        _until(lambda: len(listener_pids(port)) == 2 and killed_pid not in listener_pids(port), 120)
        assert all("ServeReplica:epd:gateway" in _cmdline(pid) for pid in listener_pids(port))
        _until(lambda: len({_served_by(url) for _ in range(24)} - replicas) == 1, 60)
        assert set(_workers(url)) == set(membership), "the replacement replica serves the same workers"
        assert _stage_workers(proc.pid) == len(membership)

        # SIGTERM to `epd serve` (what Kubernetes and systemd send), streams running on both replicas:
        # every replica stops admitting (503 + Retry-After), every stream runs to its end, then every
        # process the server started is gone.
        streams = Streams(url, 8, max_tokens=2000)
        _until(streams.started, 60, every_s=0.02)
        assert _children(proc.pid), "the server runs Ray processes"
        proc.send_signal(signal.SIGTERM)  # the server process only, as an orchestrator would
        time.sleep(1.0)
        # Streams that end normally meanwhile are fine (on a quiet machine 3 of 8 did within the
        # second once); what matters is that some still run while new requests are refused below,
        # and that every one ends with its full length.
        assert not all(streams.finish), "streams are in flight while the server refuses new requests"
        body = {"model": "epd-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        resets = []
        for _ in range(8):  # new connections: each replica gets some
            # One new connection in ~6 runs of this test was reset instead of answered (not yet
            # explained; suspected: a listening socket of the port's SO_REUSEPORT group closing with
            # it queued). A client retries a reset; what it must never get is a 200 or a 500.
            for attempt in range(3):
                try:
                    refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
                    break
                except httpx.TransportError as e:
                    resets.append(repr(e))
                    assert attempt < 2, resets
            assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
        assert len(resets) <= 1, resets
        streams.join()
        assert streams.error == [None] * 8 and streams.finish == ["length"] * 8, "streams run to their end"
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while (left := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left behind: {left}"
    finally:
        stop_server(proc)
