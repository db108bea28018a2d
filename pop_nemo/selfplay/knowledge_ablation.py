"""The paper's knowledge ablations: what a role sees in place of the document and the reference
answer when ``offline.proposer_knowledge`` / ``offline.rubric_knowledge`` is off."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pop_nemo.critic.base import Critic, JudgeItem, Judgement, RubricItem, RubricResult

NONE_KNOWLEDGE = "None"  # what the paper's ablations put in place of the document / reference


class BlindRubricWriter:
    """The paper's ``--no_know_in_rubric`` (and ``--use_knowledge 0``): the rubric writer sees
    "None" for the document and the reference answer. Judging is unchanged."""

    def __init__(self, inner: Critic):
        self.inner = inner

    def write_rubrics(self, items: Sequence[RubricItem]) -> list[RubricResult]:
        return self.inner.write_rubrics(
            [replace(it, document=NONE_KNOWLEDGE, reference=NONE_KNOWLEDGE) for it in items]
        )

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        return self.inner.judge(items)

    def step_metrics(self) -> dict[str, Any]:
        return self.inner.step_metrics()
