"""ASGI middleware: a client that leaves before its response has ended cancels the request's handler.

uvicorn only marks a request whose connection closed as disconnected; the handler keeps running until
it next reads from the client, which a handler waiting on generation never does. Starlette watches for
the disconnect only while a streaming response is being sent. So without this, a non-streaming
completion (or a stream still waiting in admission) whose client left would generate to its end and
hold its admission slot and KV until then. Serve's HTTP proxy cancels the replica's call when its
client leaves; this gives the replica's own HTTP server the same behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()  # the handler has the whole body: from now on receive() only ends
        finished = False  # the response's last body message went out

        async def app_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        async def client_left() -> None:
            await body_read.wait()
            # After the body, the server answers receive() only when the connection closed or the
            # response is complete; both read as a disconnect, told apart by `finished`.
            while (await receive())["type"] != "http.disconnect":
                pass

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not finished:
                handler.cancel()  # the client left first: the handler's cleanup frees what it held
                await asyncio.gather(handler, return_exceptions=True)
                return
            await handler  # its own outcome, an error included, is the server's to handle
        finally:
            watcher.cancel()
            if not handler.done():  # this task was cancelled (the server is stopping): so is the handler
                handler.cancel()
