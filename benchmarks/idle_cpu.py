"""CPU an idle `epd serve` burns (`python -m benchmarks.idle_cpu`): start it, wait until it is ready
and settled, then read the CPU time of every process it started (its session and their children)
from /proc over a window. Prints the share of one core, per process and in all."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from loadgen.server import start_server, stop_server

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(parent pid, session id, CPU ticks, name) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12]), name


def _label(pid: int, name: str) -> str:
    """A readable name: Ray's Python helpers all show as `python`, so name them by their script."""
    if not name.startswith("python"):
        return name
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    scripts = [a.decode(errors="replace") for a in args if a.endswith(b".py")]
    if scripts:
        return Path(scripts[0]).name
    return " ".join(a.decode(errors="replace") for a in args[1:4]) or name


def server_processes(root: int) -> dict[int, tuple[int, str]]:
    """pid → (CPU ticks, name) of every process in root's session or descended from one that is."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) is not None}
    ours = {pid for pid, (_, sid, _, _) in stats.items() if sid == root}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _, _) in stats.items() if ppid in ours and pid not in ours}
        ours |= more
        grew = bool(more)
    return {pid: (stats[pid][2], _label(pid, stats[pid][3])) for pid in ours}


def measure(serve_args: list[str], settle_s: float, window_s: float) -> None:
    proc, _ = start_server(serve_args, Path(tempfile.gettempdir()) / "epd-idle.log")
    try:
        time.sleep(settle_s)
        before = server_processes(proc.pid)
        time.sleep(window_s)
        after = server_processes(proc.pid)
    finally:
        stop_server(proc)
    rows = []
    for pid, (ticks, name) in after.items():
        used = ticks - before.get(pid, (ticks, name))[0]
        rows.append((100 * used / _TICKS / window_s, pid, name))
    rows.sort(reverse=True)
    print(f"idle `epd serve {' '.join(serve_args)}`, {window_s:.0f} s after {settle_s:.0f} s settling:")
    for share, pid, name in rows:
        print(f"  {share:5.2f} % of a core  pid {pid:<7} {name[:60]}")
    print(f"  total: {sum(r[0] for r in rows):.2f} % of a core over {len(rows)} processes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve-args", default="--topology epd", help="flags of `epd serve` besides --model")
    p.add_argument("--model", help="model directory (default: the small preset)")
    p.add_argument("--settle", type=float, default=15.0)
    p.add_argument("--window", type=float, default=30.0)
    args = p.parse_args()
    if args.model is None:
        from serving.config import default_model_dir
        from serving.engine.models.builder import ensure_model

        args.model = str(ensure_model(default_model_dir("small"), "small"))
    measure(["--model", args.model, *args.serve_args.split()], args.settle, args.window)


if __name__ == "__main__":
    main()
