"""Moving tensor regions between workers: one interface, a NIXL and an in-process implementation."""

from serving.transport.base import Region, RemoteRegions, Transfer, TransferStatus, Transport
from serving.transport.registry import make_transport

__all__ = ["Region", "RemoteRegions", "Transfer", "TransferStatus", "Transport", "make_transport"]
