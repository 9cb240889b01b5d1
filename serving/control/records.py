"""What the control actor and the gateways say to each other, as typed data: the directory as a
versioned snapshot (entries without their handles, which each process resolves itself), what the
control plane did (for metrics), and the answer to an operation a front end asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.control.actuator import ControlCounters
from serving.controller.observation import Kind, RequestRecord
from serving.types import Roles, WorkerInfo, WorkerPhase, WorkerStats


@dataclass(frozen=True)
class WorkerRecord:
    """One directory entry as plain data (what crosses processes; the handle does not)."""

    name: str
    roles: Roles
    phase: WorkerPhase
    routing: Roles
    info: WorkerInfo | None
    stats: WorkerStats | None
    restarts: int
    cpus: tuple[int, ...]
    since: float


@dataclass(frozen=True)
class DirectorySnapshot:
    """The control plane's directory at `version`, and the deployment-wide admission limit the SLO
    controller set (None: the gateways keep their configured limit) with how many gateways share it."""

    version: int
    workers: tuple[WorkerRecord, ...]
    admission_limit: int | None = None
    gateways: int = 1
    control_pid: int = 0  # the control actor's process (changes when Ray restarts it)
    control_node: str = ""
    shutting_down: bool = False  # the deployment is stopping: every gateway stops admitting


@dataclass(frozen=True)
class ControllerSummary:
    """The SLO controller's state as its metrics export it."""

    mode: str
    counts: dict[tuple[str, str, bool], int]
    observed_attainment: float | None
    observed_goodput: float | None
    predicted_attainment: float | None


@dataclass(frozen=True)
class ControlReport:
    """The deployment-wide counters a gateway exports beside its own (read at each scrape)."""

    counters: ControlCounters = field(default_factory=ControlCounters)
    controller: ControllerSummary | None = None


@dataclass(frozen=True)
class OpRefused:
    """An operation that cannot be done as asked: `status` 404 (no such worker) or 409 (its state)."""

    status: int
    message: str


@dataclass
class GatewayReport:
    """What one gateway saw since its last report: arrivals and finished requests, on the wall
    clock (`time.time()`), for the controller's window, and with several gateways its metrics (any of
    them answers a scrape for all: `serving/telemetry/replicas.py`); sent every `REPORT_INTERVAL_S`,
    also as its heartbeat (the gateways sharing the admission limit are those heard from recently)."""

    gateway: str
    arrivals: list[tuple[float, Kind]] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    exposition: bytes | None = None  # its own metrics, when there are several gateways to merge
    running: int = 0  # requests it has admitted or queued (a deployment's stop waits for all)


REPORT_INTERVAL_S = 0.5
