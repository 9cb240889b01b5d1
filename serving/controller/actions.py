"""What the policy asks for. Each action names its reason and the prediction behind it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from serving.types import Roles, roles_label


class ActionKind(enum.StrEnum):
    SWITCH = "switch"  # give a worker other roles (drain, resize, re-register)
    ADD = "add"  # start a worker with these roles
    REMOVE = "remove"  # drain a worker and stop it
    ADMISSION = "admission"  # set the gateway's concurrent-sequence limit


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    worker: str | None = None  # SWITCH, REMOVE
    roles: Roles | None = None  # SWITCH, ADD: the roles the worker will hold
    limit: int | None = None  # ADMISSION
    predicted_before: float = 0.0  # predicted SLO attainment now ...
    predicted_after: float = 0.0  # ... and once the action has taken effect

    def describe(self) -> str:
        target = {
            ActionKind.SWITCH: f"{self.worker} -> {roles_label(self.roles or frozenset())}",
            ActionKind.ADD: f"+{roles_label(self.roles or frozenset())}",
            ActionKind.REMOVE: f"-{self.worker}",
            ActionKind.ADMISSION: f"max sequences {self.limit}",
        }[self.kind]
        return f"{self.kind.value} {target}: {self.reason}"


@dataclass(frozen=True)
class Decision:
    """An action as the live loop or the simulator handled it: when, in which mode, and the outcome."""

    at: float
    action: Action
    mode: str  # advisory | on
    applied: bool
    outcome: str = ""  # "done", "advisory", or why it failed

    def as_dict(self) -> dict[str, object]:
        a = self.action
        return {
            "at": self.at,
            "kind": a.kind.value,
            "worker": a.worker,
            "roles": roles_label(a.roles) if a.roles else None,
            "limit": a.limit,
            "reason": a.reason,
            "predicted_before": round(a.predicted_before, 4),
            "predicted_after": round(a.predicted_after, 4),
            "mode": self.mode,
            "applied": self.applied,
            "outcome": self.outcome,
        }
