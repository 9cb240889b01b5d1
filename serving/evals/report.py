"""An eval's results: one outcome per item, accuracy per task with its interval, the printed table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.evals.score import answer_of, wilson


@dataclass
class Outcome:
    task: str
    index: int
    expected: str
    reply: str = ""
    prompt_tokens: int = 0
    error: str | None = None  # the request failed: counted wrong, and listed

    @property
    def answer(self) -> str:
        return answer_of(self.reply)

    @property
    def correct(self) -> bool:
        return self.error is None and self.answer == self.expected


@dataclass(frozen=True)
class TaskScore:
    task: str
    n: int
    correct: int
    accuracy: float
    interval: tuple[float, float]
    errors: int
    mean_prompt_tokens: float


@dataclass
class Report:
    model: str
    seed: int
    target: str  # the base URL, or "in-process"
    outcomes: list[Outcome]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self) -> list[TaskScore]:
        tasks = list(dict.fromkeys(o.task for o in self.outcomes))
        return [self._score(t, [o for o in self.outcomes if o.task == t]) for t in tasks]

    def overall(self) -> TaskScore:
        return self._score("all", self.outcomes)

    @staticmethod
    def _score(task: str, rows: list[Outcome]) -> TaskScore:
        n = len(rows)
        good = sum(o.correct for o in rows)
        served = [o.prompt_tokens for o in rows if o.error is None]
        return TaskScore(
            task,
            n,
            good,
            good / n if n else 0.0,
            wilson(good, n),
            sum(o.error is not None for o in rows),
            sum(served) / len(served) if served else 0.0,
        )

    def table(self) -> str:
        lines = [
            f"epd eval: {self.model} at {self.target}, seed {self.seed}"
            + (f", extra {json.dumps(self.extra)}" if self.extra else ""),
            f"{'task':<14}{'n':>5}{'right':>7}{'accuracy':>10}{'95% interval':>17}{'errors':>8}"
            f"{'prompt tok':>12}",
        ]
        for s in [*self.scores(), self.overall()]:
            lo, hi = s.interval
            lines.append(
                f"{s.task:<14}{s.n:>5}{s.correct:>7}{s.accuracy * 100:>9.1f}%"
                f"{f'[{lo * 100:.1f}, {hi * 100:.1f}]':>17}{s.errors:>8}{s.mean_prompt_tokens:>12.1f}"
            )
        rate = len(self.outcomes) / self.seconds if self.seconds else 0.0
        lines.append(f"{len(self.outcomes)} items in {self.seconds:.1f} s ({rate:.2f} items/s)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seed": self.seed,
            "target": self.target,
            "extra": self.extra,
            "seconds": self.seconds,
            "items_per_second": len(self.outcomes) / self.seconds if self.seconds else 0.0,
            "tasks": {s.task: asdict(s) for s in self.scores()},
            "overall": asdict(self.overall()),
            "items": [{**asdict(o), "answer": o.answer, "correct": o.correct} for o in self.outcomes],
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
