"""Assembles the live controller of a gateway replica from its settings."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from serving.controller.loop import ControllerLoop, LoopConfig
from serving.controller.model import StageCosts
from serving.controller.observation import Slo
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.controller.window import RequestWindow

if TYPE_CHECKING:
    from serving.api.admission import Admission
    from serving.control.plane import ControlPlane
    from serving.gateway.serve import GatewaySettings
    from serving.telemetry.metrics import Metrics


def build_controller(
    settings: GatewaySettings, plane: ControlPlane, metrics: Metrics, admission: Admission
) -> ControllerLoop:
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
    metrics.window = RequestWindow(horizon_s=max(300.0, 3 * c.window_s))

    # Admission lives on the gateway's event loop (the one building the service); the controller
    # runs on the control plane's thread, so the new limit is handed over, never set across threads.
    gateway_loop = asyncio.get_running_loop()

    def set_admission(limit: int) -> None:
        gateway_loop.call_soon_threadsafe(admission.set_limit, limit)

    return ControllerLoop(
        plane, metrics.window, policy, slo, LoopConfig(c.mode, c.tick_s, c.window_s), set_admission
    )
