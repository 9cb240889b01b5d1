"""Admission counts sequences (prompts × n) and image pixels, queues FIFO within the limits, and
answers 429 with Retry-After beyond them."""

import asyncio
import gc

import pytest

from serving.api.admission import Admission
from serving.api.errors import APIError


def test_full_queue_is_429_with_retry_after():
    async def scenario():
        admission = Admission(max_sequences=1, max_waiting=1)
        running = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())  # queued
        await asyncio.sleep(0)
        assert admission.waiting == 1
        with pytest.raises(APIError) as err:
            await admission.acquire()  # nothing left
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
        running.release()
        ticket = await waiter
        assert admission.running == 1 and admission.waiting == 0
        ticket.release()
        ticket.release()  # idempotent
        assert admission.running == 0 and admission.sequences == 0

    asyncio.run(scenario())


def test_sequences_not_requests_are_counted():
    """A request of n=3 takes three of four sequence slots: the next n=2 request waits for it."""

    async def scenario():
        admission = Admission(max_sequences=4, max_waiting=8)
        first = await admission.acquire(3)
        assert (admission.running, admission.sequences) == (1, 3)
        second = asyncio.create_task(admission.acquire(2))
        await asyncio.sleep(0)
        assert admission.waiting == 1 and not second.done()
        third = asyncio.create_task(admission.acquire(1))  # would fit, but waits behind the queue
        await asyncio.sleep(0)
        assert not third.done()
        first.release()
        ticket = await second
        await asyncio.sleep(0)
        assert (admission.running, admission.sequences, admission.waiting) == (2, 3, 0)
        ticket.release()
        (await third).release()

    asyncio.run(scenario())


def test_queue_is_fifo_and_a_request_larger_than_the_limit_runs_alone():
    async def scenario():
        admission = Admission(max_sequences=4, max_waiting=8)
        small = await admission.acquire(1)
        big = asyncio.create_task(admission.acquire(10))  # more than the limit: waits to run alone
        await asyncio.sleep(0)
        late = asyncio.create_task(admission.acquire(1))  # would fit, but must not overtake `big`
        await asyncio.sleep(0)
        assert not big.done() and not late.done()
        small.release()
        big_ticket = await big
        await asyncio.sleep(0)
        assert not late.done() and admission.sequences == 10
        big_ticket.release()
        (await late).release()
        assert admission.running == 0 and admission.sequences == 0

    asyncio.run(scenario())


def test_cancelled_waiter_leaves_the_queue():
    async def scenario():
        admission = Admission(max_sequences=1, max_waiting=4)
        held = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.waiting == 0
        held.release()
        assert admission.running == 0

    asyncio.run(scenario())


def test_image_pixels_in_flight_are_budgeted_and_returned():
    async def scenario():
        admission = Admission(max_sequences=8, max_waiting=8, max_pixels=100)
        a, b = await admission.acquire(), await admission.acquire()
        a.charge_pixels(60)
        with pytest.raises(APIError) as err:
            b.charge_pixels(50)
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
        b.charge_pixels(40)
        assert admission.pixels == 100
        a.release()
        assert admission.pixels == 40
        b.release()
        assert admission.pixels == 0

    asyncio.run(scenario())


def test_a_ticket_dropped_without_release_is_returned():
    async def scenario():
        admission = Admission(max_sequences=2, max_waiting=0)
        ticket = await admission.acquire(2)
        ticket.charge_pixels(5)
        del ticket
        gc.collect()
        assert (admission.running, admission.sequences, admission.pixels) == (0, 0, 0)

    asyncio.run(scenario())
