"""The Critic protocol: writes rubrics and judges answers. In-process or remote, same types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pop_nemo.selfplay.rubric import Criterion, Rating


@dataclass(frozen=True)
class RubricItem:
    id: str
    document: str
    problem: str
    reference: str
    answers: list[str]  # the valid extracted answers; the critic picks the shown subset
    seed: int | None = None


@dataclass
class RubricResult:
    id: str
    valid: bool
    rubric: list[Criterion] | None = None
    error: str | None = None
    raw: str = ""


@dataclass(frozen=True)
class JudgeItem:
    id: str
    problem: str
    rubric: list[Criterion]
    answer: str
    seed: int | None = None


@dataclass
class Judgement:
    id: str
    valid: bool
    score: float | None = None  # in [0, 2]
    reward: float | None = None  # score / 2, in [0, 1]
    ratings: list[Rating] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "valid": self.valid,
            "score": self.score,
            "reward": self.reward,
            "ratings": [r.to_dict() for r in self.ratings],
            "error": self.error,
        }


class Critic(Protocol):
    def write_rubrics(self, items: Sequence[RubricItem]) -> list[RubricResult]: ...

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]: ...

    def step_metrics(self) -> dict[str, Any]:
        """Counts since the last call, for the step's metrics row ({} for an in-process critic)."""
        ...
