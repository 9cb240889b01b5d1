"""`epd profile`'s NIXL measurement closes both of its agents even when a transfer fails."""

from __future__ import annotations

import pytest

import serving.transport as transport
from serving.sim import profile


class _Agent:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self.closed = name, closed

    def register(self, *args: object) -> None:
        pass

    def metadata(self) -> bytes:
        return b""

    def add_peer(self, *args: object) -> None:
        pass

    def publish(self, *args: object) -> object:
        return object()

    def read(self, *args: object) -> object:
        raise RuntimeError("the transfer failed")

    def close(self) -> None:
        self.closed.append(self.name)


def test_a_failed_transfer_still_closes_both_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    monkeypatch.setattr(transport, "make_transport", lambda kind, name: _Agent(name, closed))
    assert profile._transfers(repeats=1) == []  # the profile falls back to FACTS.md's rates
    assert sorted(closed) == ["profile-owner", "profile-reader"]
