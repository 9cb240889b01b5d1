"""The Ray Serve config entrypoint: `import_path: serving.gateway.app_builder:build_app`.

A Serve config names an application and its `args`, but cannot start the named stage workers the
gateway adopts. This builder does both, so `serve deploy` (and KubeRay's RayService) run the same
deployment `epd serve` does:

1. `args` are `epd serve` flags with dashes as underscores (`slo_ttft: 2.0` is `--slo-ttft 2.0`;
   a list repeats its flag; `true` is a bare switch, `false` leaves it out), parsed by the same parser
   and turned into settings by the same function (`serving.cli.serve_settings`).
2. Two args are the builder's own: `deployment_id` names the workers (`e-0-<id>`; a redeploy under
   the same id finds them instead of starting more) and `role_resources` makes each worker ask for its
   worker group's custom resource (`epd-e`, `epd-p`, `epd-d`, ...), as the Helm chart's groups offer.
3. The workers start as detached named actors (the build task that creates them ends; they must not),
   and the bound gateway application is returned.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

BUILDER_ARGS = {"deployment_id": "serve", "role_resources": False}


def flags_from_args(args: Mapping[str, Any]) -> list[str]:
    """`{"slo_ttft": 2.0, "api_key": ["a", "b"], "openapi": true}` → `epd serve` flags."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, list | tuple):
            for item in value:
                flags += [flag, str(item)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def serve_flags() -> set[str]:
    """Every option string `epd serve` accepts."""
    from serving.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {s for action in commands.choices["serve"]._actions for s in action.option_strings}


def settings_from_args(args: Mapping[str, Any], gpus: int) -> tuple[Any, list[Any], dict[str, Any]]:
    """(GatewaySettings, worker plans, builder options) for a Serve config's `args`."""
    from serving.cli import build_parser, serve_settings

    own = {k: args.get(k, default) for k, default in BUILDER_ARGS.items()}
    serve_args = {k: v for k, v in args.items() if k not in BUILDER_ARGS}
    # argparse takes any unambiguous prefix (`--slo-ttf`); a config key must name its flag exactly.
    known = serve_flags()
    if unknown := sorted(k for k in serve_args if "--" + k.replace("_", "-") not in known):
        raise ValueError(f"unknown epd serve args in the Serve config: {', '.join(unknown)}")
    parsed = build_parser().parse_args(["serve", *flags_from_args(serve_args)])
    settings, plans = serve_settings(parsed, str(own["deployment_id"]), gpus)
    if own["role_resources"]:
        from dataclasses import replace

        settings = replace(settings, role_resources=True)
    return settings, plans, own


def build_app(args: dict[str, Any]) -> Any:
    """The application builder Ray Serve calls with the config's `args`."""
    import ray

    from serving.cluster import start_ray_workers
    from serving.gateway.serve import NAMESPACE, gateway_application
    from serving.stages.factory import RayWorkerFactory

    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    settings, plans, own = settings_from_args(args, gpus)
    factory = RayWorkerFactory(
        settings.worker_template, NAMESPACE, gpus, role_resources=bool(own["role_resources"]), detached=True
    )
    start_ray_workers(factory, plans)
    return gateway_application(settings)
