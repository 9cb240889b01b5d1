"""Assembles the live controller of a deployment's control actor from its settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from serving.controller.loop import ControllerLoop, LoopConfig
from serving.controller.model import StageCosts
from serving.controller.observation import Slo
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.controller.window import RequestWindow

if TYPE_CHECKING:
    from serving.control.plane import ControlPlane
    from serving.gateway.serve import GatewaySettings


def build_controller(
    settings: GatewaySettings,
    plane: ControlPlane,
    window: RequestWindow,
    set_admission: Callable[[int], None],
) -> ControllerLoop:
    """`window` is fed by the gateways' reports; `set_admission` hands a deployment-wide limit of
    concurrent sequences to them (each takes its share)."""
    c = settings.controller
    costs = StageCosts.load(c.profile) if c.profile else StageCosts()
    policy = Policy(
        PolicyConfig(
            role_sets=role_sets(settings.topology),
            max_workers=c.max_workers,
            min_workers=c.min_workers,
            cooldown_s=c.cooldown_s,
            settle_s=c.window_s,
            min_gain=c.min_gain,
            min_requests=c.min_requests,
            manage_admission=c.manage_admission,
        ),
        costs,
    )
    slo = Slo(settings.gateway.slo_ttft_s, settings.gateway.slo_tpot_s, c.attainment_target)
    window.horizon_s = max(window.horizon_s, 3 * c.window_s)
    return ControllerLoop(plane, window, policy, slo, LoopConfig(c.mode, c.tick_s, c.window_s), set_admission)
