"""The live loop over a real pool directory with a recording actuator: advisory decides and exports
but acts on nothing; on acts through the actuator and records the outcome, failures included."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from serving.control.directory import PoolDirectory, WorkerEntry
from serving.controller.loop import ControllerLoop, LoopConfig
from serving.controller.model import StageCosts
from serving.controller.observation import Kind, RequestRecord, Slo
from serving.controller.policy import Policy, PolicyConfig
from serving.controller.window import RequestWindow
from serving.telemetry.controller_metrics import ControllerCollector
from serving.types import Roles, WorkerPhase, parse_roles

SLO = Slo(ttft_s=2.0, tpot_s=0.05)
COSTS = StageCosts(encode_per_token_s=3e-4, prefill_per_token_s=2e-5)


class RecordingActuator:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Roles]] = []
        self.fail = fail

    async def switch(self, name: str, roles: Roles) -> None:
        self.calls.append(("switch", name, roles))
        if self.fail:
            raise RuntimeError("the worker went away")


def plane(actuator: RecordingActuator) -> SimpleNamespace:
    directory = PoolDirectory()
    for i, label in enumerate("e,p,d,d".split(",")):
        roles = parse_roles(label)
        directory.put(WorkerEntry(f"w{i}", None, roles, WorkerPhase.ACTIVE, routing=roles))  # type: ignore[arg-type]
    return SimpleNamespace(directory=directory, actuator=actuator, controller=None)


def image_burst(window: RequestWindow, now: float) -> None:
    """Five image requests a second for the last 10 s, each waiting ~3 s for encode."""
    for i in range(50):
        at = now - 10 + i * 0.2
        window.arrive(at, Kind.IMAGE)
        window.add(
            RequestRecord(
                arrival=at - 3.5, end=at, kind=Kind.IMAGE, prompt_tokens=1100, image_tokens=1000,
                output_tokens=32, ttft_s=3.4, tpot_s=0.02, ok=True, encode_queue_s=3.0, encode_s=0.31,
                prefill_s=0.03,
            )
        )  # fmt: skip


def loop(mode: str, actuator: RecordingActuator) -> tuple[ControllerLoop, RequestWindow]:
    window = RequestWindow()
    controller = ControllerLoop(
        plane(actuator),  # type: ignore[arg-type]
        window,
        Policy(PolicyConfig(), COSTS),
        SLO,
        LoopConfig(mode, tick_s=1.0, window_s=10.0),
    )
    return controller, window


def scrape(controller: ControllerLoop) -> str:
    registry = CollectorRegistry()
    registry.register(ControllerCollector("m", controller.summary))
    return generate_latest(registry).decode()


def test_advisory_decides_and_exports_but_acts_on_nothing() -> None:
    actuator = RecordingActuator()
    controller, window = loop("advisory", actuator)
    image_burst(window, 1000.0)
    made = controller.tick(1000.0)
    assert [d.action.roles for d in made] == [parse_roles("e")]
    assert actuator.calls == [] and not made[0].applied and made[0].outcome == "advisory"
    text = scrape(controller)
    assert (
        'epd:controller_decisions_total{action="switch",applied="false",mode="advisory",model_name="m"} 1.0'
        in text
    )
    assert 'epd:controller_mode{mode="advisory",model_name="m"} 1.0' in text
    assert controller.snapshot()["decisions"][0]["reason"]


def test_on_acts_through_the_actuator_and_records_the_outcome() -> None:
    async def run(fail: bool) -> tuple[RecordingActuator, ControllerLoop]:
        actuator = RecordingActuator(fail)
        controller, window = loop("on", actuator)
        image_burst(window, 1000.0)
        made = controller.tick(1000.0)
        assert made and controller.views()[int(made[0].action.worker[1:])].target == parse_roles("e")
        await asyncio.sleep(0.05)
        return actuator, controller

    actuator, controller = asyncio.run(run(fail=False))
    assert [(c[0], c[2]) for c in actuator.calls] == [("switch", parse_roles("e"))]
    assert controller.decisions[0].outcome == "done" and controller.decisions[0].applied
    assert controller.counts == {("switch", "on", True): 1}
    assert all(v.target is None for v in controller.views())  # the move is over

    actuator, controller = asyncio.run(run(fail=True))
    assert controller.decisions[0].outcome.startswith("failed") and not controller.decisions[0].applied
    assert controller.counts == {("switch", "on", False): 1}  # counted once, never taken back


def test_a_tick_that_raises_is_logged_and_the_loop_goes_on(caplog) -> None:  # noqa: ANN001
    controller, _ = loop("on", RecordingActuator())
    controller.cfg = LoopConfig("on", tick_s=0.01, window_s=10.0)
    calls: list[int] = []

    def tick(now: float | None = None) -> list:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a broken observation")
        return []

    controller.tick = tick  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.create_task(controller.run())
        while len(calls) < 3 and not task.done():
            await asyncio.sleep(0.01)
        assert not task.done()  # the loop outlived the failing tick
        task.cancel()

    asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert len(calls) >= 3
    assert "controller tick failed" in caplog.text
