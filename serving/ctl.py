"""`epd ctl`: operate a running `epd serve` through its admin API.

epd ctl workers [--json]          the pool directory: roles, phase, process, load, KV usage
epd ctl switch NAME --roles p     move a worker to other roles (drain, resize, re-register)
epd ctl drain NAME                stop routing to a worker and wait until it is idle
epd ctl resume NAME               route to a drained worker again
epd ctl add --roles d             start a new worker
epd ctl remove NAME               drain a worker, then stop it
epd ctl decisions [--json]        the SLO controller: mode, what it sees, its recent decisions
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx


def add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser(
        "ctl", help="operate a running server: workers, switch, drain, resume, add, remove, decisions"
    )
    _connection_options(ctl, suppress=False)
    verbs = ctl.add_subparsers(dest="verb", required=True)
    workers = verbs.add_parser("workers", help="list the workers")
    workers.add_argument("--json", action="store_true", help="print the directory as JSON")
    switch = verbs.add_parser("switch", help="move a worker to other roles")
    switch.add_argument("name")
    switch.add_argument("--roles", required=True, help="e, p, d or a mix such as pd")
    for verb, text in (("drain", "stop routing to a worker"), ("resume", "route to a drained worker"),
                       ("remove", "drain and stop a worker")):  # fmt: skip
        verbs.add_parser(verb, help=text).add_argument("name")
    decisions = verbs.add_parser("decisions", help="the SLO controller's recent decisions")
    decisions.add_argument("--json", action="store_true", help="print them as JSON")
    add = verbs.add_parser("add", help="start a new worker")
    add.add_argument("--roles", required=True)
    for verb in verbs.choices.values():
        _connection_options(verb, suppress=True)
    ctl.set_defaults(func=cmd_ctl)


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--url, --api-key and --timeout, before the verb or after it (`epd ctl workers --url U`). After
    it they default to nothing, so they override only what they name."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=default(os.environ.get("EPD_URL", "http://127.0.0.1:8000")))
    parser.add_argument("--api-key", default=default(os.environ.get("EPD_API_KEY")), help="or $EPD_API_KEY")
    parser.add_argument(
        "--timeout", type=float, default=default(300.0), help="seconds to wait for an operation"
    )


def cmd_ctl(args: argparse.Namespace) -> None:
    try:
        _run(args)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _run(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        if args.verb == "workers":
            body = _check(client.get("/admin/workers"))
            print(json.dumps(body, indent=2) if args.json else format_workers(body))
            return
        if args.verb == "decisions":
            body = _check(client.get("/admin/decisions"))
            print(json.dumps(body, indent=2) if args.json else format_decisions(body))
            return
        if args.verb == "switch":
            body = _check(client.post(f"/admin/workers/{args.name}/switch", json={"roles": args.roles}))
        elif args.verb == "add":
            body = _check(client.post("/admin/workers", json={"roles": args.roles}))
        elif args.verb == "remove":
            body = _check(client.delete(f"/admin/workers/{args.name}"))
        else:
            body = _check(client.post(f"/admin/workers/{args.name}/{args.verb}"))
        print(json.dumps(body))


def format_workers(body: dict[str, Any]) -> str:
    """The directory as a table, one worker a line."""
    columns = ("name", "roles", "phase", "pid", "node", "outstanding", "requests_in_flight", "kv_cache_usage")
    titles = ("NAME", "ROLES", "PHASE", "PID", "NODE", "LEGS", "IN FLIGHT", "KV USE")
    rows = [titles] + [tuple(str(w.get(c, "")) for c in columns) for w in body["workers"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(titles))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    ready = ", ".join(f"{role}={'yes' if ok else 'NO'}" for role, ok in body.get("ready", {}).items())
    return "\n".join(lines + [f"directory version {body.get('version')}; roles served: {ready}"])


def format_decisions(body: dict[str, Any]) -> str:
    """The controller's state and its decisions, newest last."""
    lines = [f"controller: {body.get('mode', 'off')}"]
    if (seen := body.get("observed")) is not None:
        lines.append(
            f"last {body.get('window_s')} s: {seen['requests']} requests, {seen['rate']} req/s, attainment "
            f"{seen['attainment']:.0%} (TTFT {seen['attainment_ttft']:.0%}, "
            f"TPOT {seen['attainment_tpot']:.0%}), "
            f"goodput {seen['goodput']} req/s; predicted attainment {body.get('predicted_attainment')}"
        )
    for d in body.get("decisions", []):
        target = d.get("worker") or ""
        if d.get("roles"):
            target = f"{target} -> {d['roles']}" if target else f"+{d['roles']}"
        if d.get("limit") is not None:
            target = f"max sequences {d['limit']}"
        lines.append(
            f"{time.strftime('%H:%M:%S', time.localtime(d['at']))}  {d['mode']:<8} {d['kind']:<9} "
            f"{target:<28} {d['outcome']:<10} {d['reason']}"
        )
    if not body.get("decisions"):
        lines.append("no decisions yet")
    return "\n".join(lines)


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        print(f"error: {response.status_code} {message}", file=sys.stderr)
        raise SystemExit(1)
    return response.json()
