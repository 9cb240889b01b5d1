"""Transport kind → class, chosen once when a worker is built."""

from __future__ import annotations

from typing import Any

from serving.transport.base import Transport


def make_transport(kind: str, name: str, **kwargs: Any) -> Transport:
    if kind == "nixl":
        from serving.transport.nixl import NixlTransport

        return NixlTransport(name)
    if kind == "inproc":
        from serving.transport.inproc import InProcessTransport

        return InProcessTransport(name, **kwargs)
    raise ValueError(f"unknown transport {kind!r}; choose nixl or inproc")
