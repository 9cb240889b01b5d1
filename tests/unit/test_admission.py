import asyncio

import pytest

from serving.gateway.admission import Admission
from serving.gateway.errors import APIError


def test_full_queue_is_429_with_retry_after():
    async def scenario():
        admission = Admission(max_running=1, max_waiting=1)
        await admission.acquire()  # running
        waiter = asyncio.create_task(admission.acquire())  # queued
        await asyncio.sleep(0)
        assert admission.waiting == 1
        with pytest.raises(APIError) as err:
            await admission.acquire()  # nothing left
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
        admission.release()
        await waiter
        assert admission.running == 1 and admission.waiting == 0
        admission.release()
        assert admission.running == 0

    asyncio.run(scenario())
