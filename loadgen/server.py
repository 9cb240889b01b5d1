"""Start `epd serve` as a child process on a free loopback port, wait until it is ready, stop it; check
out an older revision to serve the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str],
    log: Path,
    timeout_s: float = 300,
    source: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`epd serve ARGS --port <free>` in its own process group; returns it and its URL once /ready.
    `source`: serve the `serving` package of another checkout (e.g. an older commit's worktree) with
    this environment's packages; Ray's workers inherit its PYTHONPATH. `env`: the server's whole
    environment (Ray's workers inherit it too), instead of this process's."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", *args, "--port", str(port)]
    if source is not None:
        base = env if env is not None else os.environ
        env = {**base, "PYTHONPATH": os.pathsep.join([str(source), base.get("PYTHONPATH", "")])}
    return launch(cmd, port, "/ready", log, timeout_s, env=env, cwd=source)


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached git worktree of this repository at `rev` for the length of the block: an older tree
    for `start_server(source=...)`, removed afterwards."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def launch(
    cmd: list[str],
    port: int,
    ready_path: str,
    log: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start an HTTP server process in its own process group, output to `log`; return it and its
    loopback URL once `ready_path` answers 200. Stopped, with the log's tail in the error, if it exits
    or is not ready within `timeout_s`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}{ready_path}", timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"{' '.join(cmd[1:4])} did not become ready:\n{Path(log).read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the whole group (Ray's processes included), SIGKILL if it lingers. Returns once no
    process of the group is left: a benchmark that starts the next server sooner would run it beside
    the last one's exiting workers (vLLM's engine core, Ray's worker processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s / 4
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # signal 0: does any process of the group still exist?
            except ProcessLookupError:
                return
            time.sleep(0.1)


def listener_pid(port: int) -> int:
    """The process holding the TCP socket that listens on 127.0.0.1:`port` (from /proc); with several
    (gateway replicas sharing the port), the lowest pid."""
    return listener_pids(port)[0]


def listener_pids(port: int) -> list[int]:
    """Every process holding a TCP socket that listens on `port` (from /proc), sorted."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        raise LookupError(f"nothing listens on port {port}")
    owners = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                owners.append(int(pid))
        except OSError:
            continue
    if not owners:
        raise LookupError(f"no process owns the socket listening on {port}")
    return sorted(owners)
