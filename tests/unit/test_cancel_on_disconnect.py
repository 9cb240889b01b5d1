"""CancelOnDisconnect: the handler is cancelled when the client leaves before the response ended, and
only then (a response that completed reads as a disconnect too, and must not cancel the handler)."""

from __future__ import annotations

import asyncio

import pytest

from serving.gateway.disconnect import CancelOnDisconnect

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}


class Client:
    """The server side of one connection, as uvicorn presents it: the body, then receive() waits until
    the connection closes or the response is complete, and answers a disconnect."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict] = []
        self._body = [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]

    async def receive(self) -> dict:
        if self._body:
            return self._body.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.gone.set()  # the response is complete: receive() now answers a disconnect


def waiting_handler(cancelled: list[bool]):  # noqa: ANN201
    """A handler that reads the body, then waits on generation; it notes its cancellation."""

    async def handler(scope, receive, send) -> None:  # noqa: ANN001
        await receive()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    return handler


@pytest.mark.parametrize("end", ["client leaves", "server stops"])
def test_the_handler_is_cancelled_when_the_client_leaves_or_the_server_stops(end: str) -> None:
    """Before the response: the client closing the connection, or the server cancelling the request's
    task as it stops, cancels the handler waiting on generation (its cleanup frees what it holds)."""
    cancelled: list[bool] = []
    handler = waiting_handler(cancelled)

    async def scenario() -> None:
        client = Client()
        served = asyncio.create_task(CancelOnDisconnect(handler)(SCOPE, client.receive, client.send))
        await asyncio.sleep(0.05)
        if end == "client leaves":
            client.gone.set()
            await asyncio.wait_for(served, timeout=5)
        else:
            served.cancel()
            await asyncio.gather(served, return_exceptions=True)
            await asyncio.sleep(0)  # the handler's cancellation runs

    asyncio.run(scenario())
    assert cancelled == [True]


def test_a_completed_response_is_not_cancelled_while_the_handler_finishes() -> None:
    finished = []

    async def handler(scope, receive, send) -> None:  # noqa: ANN001
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})
        await asyncio.sleep(0.1)  # cleanup after the response: the disconnect it reads must not cut it
        finished.append(True)

    async def scenario() -> list[dict]:
        client = Client()
        await asyncio.wait_for(CancelOnDisconnect(handler)(SCOPE, client.receive, client.send), timeout=5)
        return client.sent

    sent = asyncio.run(scenario())
    assert finished == [True]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_the_handlers_error_reaches_the_server() -> None:
    async def handler(scope, receive, send) -> None:  # noqa: ANN001
        await receive()
        raise ValueError("boom")

    async def scenario() -> None:
        client = Client()
        await CancelOnDisconnect(handler)(SCOPE, client.receive, client.send)

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(scenario())
