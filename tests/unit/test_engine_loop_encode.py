"""The engine loop's vision batches, with a recording engine (a unit test of the loop alone): what runs
after a batch runs in the same pass as it, before the step; a failure of one job's batch or of its
follow-up is that job's alone; a burst is spread over passes by the patch budget; a stopped loop fails
every waiting encode."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from serving.engine.image_processor import ProcessedImage
from serving.stages.loop import EngineLoop, VisionBatchFailed
from serving.types import WorkerUnavailable


class RecordingEngine:
    """Encodes an image of n patches as a (1,) tensor holding n; `step` is recorded and runs while
    work is pending. An image of 13 patches fails the vision batch (a poisoned input). With `held`,
    each vision batch waits for a `release()`, so jobs pile up behind it."""

    def __init__(self, max_encode_patches: int) -> None:
        self.cfg = SimpleNamespace(max_encode_images=16, max_encode_patches=max_encode_patches)
        self.fault_hook = None
        self.events: list[str] = []
        self.pending = 0
        self.runner = SimpleNamespace(encode=self._encode)
        self.held = False
        self._permits = threading.Semaphore(0)
        self._entered = threading.Semaphore(0)

    def release(self, batches: int = 1) -> None:
        for _ in range(batches):
            self._permits.release()

    def wait_for_batch(self) -> None:
        """Until a held vision batch has started."""
        assert self._entered.acquire(timeout=10)

    def _encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        if self.held:
            self._entered.release()
            assert self._permits.acquire(timeout=10)
        sizes = [im.pixel_values.shape[0] for im in images]
        self.events.append(f"encode {sizes}")
        if 13 in sizes:
            raise RuntimeError("poisoned image")
        return [torch.tensor([float(n)]) for n in sizes]

    def has_unfinished(self) -> bool:
        return self.pending > 0

    def step(self) -> list:
        self.events.append("step")
        self.pending -= 1
        return []


def image(patches: int) -> ProcessedImage:
    return ProcessedImage(torch.zeros(patches, 4), (1, 1, patches))


@pytest.fixture
def make_loop():
    loops: list[EngineLoop] = []

    def make(budget: int = 4096, cancelled: set[str] | None = None) -> tuple[EngineLoop, RecordingEngine]:
        engine = RecordingEngine(budget)
        gone = cancelled if cancelled is not None else set()
        loop = EngineLoop(
            engine, lambda: None, lambda _: None, lambda _: None, wanted=lambda r: r not in gone
        )
        loops.append(loop)
        return loop, engine

    yield make
    for loop in loops:
        loop.stop()


def test_what_follows_a_vision_batch_runs_before_the_next_step(make_loop):
    loop, engine = make_loop()

    def admit(done):
        engine.events.append("admit")
        engine.pending += 1  # the admitted request's prefill: the step right after takes it
        return [float(e) for e in done.embeds]

    assert loop.encode("r1", [image(4), image(9)], admit) == [4.0, 9.0]
    loop.call(lambda: None)  # one more pass: the step has run by then
    assert engine.events[:3] == ["encode [4, 9]", "admit", "step"]


def pile_up(loop, engine, jobs):
    """Start r0's vision batch and hold it, queue `jobs` (request id, patches, then) behind it, then
    let every batch run; returns the futures, r0's first."""
    pool = ThreadPoolExecutor(len(jobs) + 1)
    engine.held = True
    futures = [pool.submit(loop.encode, "r0", [image(2)], lambda d: "r0 ok")]
    engine.wait_for_batch()
    futures += [pool.submit(loop.encode, rid, [image(n)], then) for rid, n, then in jobs]
    time.sleep(0.2)  # queued behind r0's batch
    engine.held = False
    engine.release()
    pool.shutdown(wait=False)
    return futures


def test_a_failing_follow_up_fails_its_own_request_alone(make_loop):
    loop, engine = make_loop()

    def boom(done):
        raise ValueError("no room for this one")

    first, bad, good = pile_up(loop, engine, [("r1", 3, boom), ("r2", 5, lambda d: d.embeds[0].item())])
    assert first.result(10) == "r0 ok"
    with pytest.raises(ValueError, match="no room"):
        bad.result(10)
    assert good.result(10) == 5.0
    assert "encode [3, 5]" in engine.events, "r1 and r2 shared one vision batch"


def test_a_poisoned_image_fails_its_request_alone_with_the_cause(make_loop):
    loop, engine = make_loop()
    jobs = [("r1", 13, lambda d: "never"), ("r2", 5, lambda d: d.embeds[0].item())]
    first, bad, good = pile_up(loop, engine, jobs)
    assert first.result(10) == "r0 ok"
    with pytest.raises(VisionBatchFailed) as failed:
        bad.result(10)
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert good.result(10) == 5.0


def test_a_request_cancelled_while_waiting_is_not_encoded_nor_followed_up(make_loop):
    """A client that goes away while its media wait behind another vision batch: its images are not
    encoded and what was to follow (admission, holding embeddings for a peer) never runs."""
    cancelled: set[str] = set()
    loop, engine = make_loop(cancelled=cancelled)
    followed: list[str] = []

    def then(rid):
        return lambda d: followed.append(rid) or d.embeds[0].item()

    pool = ThreadPoolExecutor(3)
    engine.held = True
    first = pool.submit(loop.encode, "r0", [image(2)], then("r0"))
    engine.wait_for_batch()
    gone = pool.submit(loop.encode, "r1", [image(3)], then("r1"))
    kept = pool.submit(loop.encode, "r2", [image(5)], then("r2"))
    time.sleep(0.2)  # both queued behind r0's batch
    cancelled.add("r1")  # the worker's cancel has freed r1 (it runs on the engine thread, after r0's pass)
    engine.held = False
    engine.release()
    pool.shutdown(wait=False)
    assert first.result(10) == 2.0 and kept.result(10) == 5.0
    with pytest.raises(WorkerUnavailable, match="cancelled"):
        gone.result(10)
    assert followed == ["r0", "r2"]
    assert "encode [5]" in engine.events and "encode [3, 5]" not in engine.events


def test_a_burst_is_spread_over_passes_by_the_patch_budget(make_loop):
    loop, engine = make_loop(budget=10)

    def admit(done):
        engine.pending += 1  # its prefill: one step
        return done.queued_s

    jobs = [("r1", 6, admit), ("r2", 3, admit), ("r3", 6, admit), ("r4", 12, admit)]
    for future in pile_up(loop, engine, jobs):
        future.result(10)
    loop.call(lambda: None)
    batches = [e for e in engine.events if e.startswith("encode")]
    # r1 and r2 fit the budget together; r3 does not fit beside them; r4 is over it alone and still goes
    assert batches == ["encode [2]", "encode [6, 3]", "encode [6]", "encode [12]"], engine.events
    for i, event in enumerate(engine.events[:-1]):
        if event.startswith("encode") and i > 0:
            assert engine.events[i + 1] == "step", f"a step follows every batch: {engine.events}"


def test_a_stopped_loop_fails_the_encodes_still_waiting(make_loop):
    loop, engine = make_loop(budget=1)
    engine.held = True
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(loop.encode, "r0", [image(1)], lambda d: "done")
        engine.wait_for_batch()
        backlog = [pool.submit(loop.encode, f"r{i}", [image(1)], lambda d: "done") for i in (1, 2, 3)]
        time.sleep(0.2)
        engine.release()
        assert first.result(10) == "done"
        engine.wait_for_batch()  # r1's batch, r2 and r3 in the backlog behind it
        loop._stop.set()
        engine.release()
        assert backlog[0].result(10) == "done"
        for job in backlog[1:]:
            with pytest.raises(WorkerUnavailable):
                job.result(10)
