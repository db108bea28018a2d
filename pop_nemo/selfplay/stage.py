"""Batched self-play: propose → solve ×N → rubric → judge, for many documents at once.

Each stage is one engine call across all documents (plus retries for the failures only), so
the engine always sees full batches. Used by the online loop and by offline synthesis.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from pop_nemo.corpus import Document
from pop_nemo.critic.base import Critic, JudgeItem, Judgement, RubricItem
from pop_nemo.engines.base import Completion, Engine, Request, Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion


def request_seed(*parts: Any) -> int:
    """A stable 62-bit seed from (run seed, step, group, role, attempt...)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass
class Answer:
    completion: Completion
    answer: str | None  # what the judge sees; None when there is nothing to judge
    format_valid: bool  # the reply had exactly one non-empty <answer> block
    judgement: Judgement | None = None


@dataclass
class Example:
    """One document's self-play; ``group_id`` names the solver group explicitly."""

    group_id: int
    doc: Document
    problem: str | None = None
    reference: str | None = None
    proposer_output: str = ""
    proposer_attempts: int = 0
    answers: list[Answer] = field(default_factory=list)
    rubric: list[Criterion] | None = None
    rubric_output: str = ""
    rubric_error: str | None = None

    @property
    def proposer_valid(self) -> bool:
        return self.problem is not None

    @property
    def rubric_valid(self) -> bool:
        return self.rubric is not None

    def to_record(self, **extra: Any) -> dict[str, Any]:
        """The JSONL record schema shared by the online loop and the offline path."""
        return {
            **extra,
            "group_id": self.group_id,
            "doc_id": self.doc.id,
            "document": self.doc.text,
            "proposer_valid": self.proposer_valid,
            "proposer_attempts": self.proposer_attempts,
            "proposer_output": self.proposer_output,
            "problem": self.problem,
            "reference": self.reference,
            "rubric_valid": self.rubric_valid,
            "rubric": [c.to_dict() for c in self.rubric] if self.rubric else None,
            "rubric_error": self.rubric_error,
            "answers": [
                {
                    "output": a.completion.text,
                    "answer": a.answer,
                    "format_valid": a.format_valid,
                    "num_tokens": len(a.completion.token_ids),
                    "finish_reason": a.completion.finish_reason,
                    "judge_valid": a.judgement.valid if a.judgement else None,
                    "score": a.judgement.score if a.judgement else None,
                    "reward": a.judgement.reward if a.judgement else None,
                    "ratings": [r.to_dict() for r in a.judgement.ratings] if a.judgement else [],
                    "judge_error": a.judgement.error if a.judgement else None,
                }
                for a in self.answers
            ],
        }


@dataclass
class StageStats:
    seconds: dict[str, float] = field(default_factory=dict)
    generated_tokens: dict[str, int] = field(default_factory=dict)


class SelfPlay:
    def __init__(
        self,
        task: roles.Task,
        proposer: Engine,
        solver: Engine,
        critic: Critic,
        proposer_sampling: Sampling,
        solver_sampling: Sampling,
        n: int,
        proposer_retries: int = 5,
        solver_resample: int = 0,
        limits: roles.GuideLimits | None = None,
        seed: int = 0,
        answer_fallback: bool = False,
    ):
        """``answer_fallback``: a reply without an ``<answer>`` block is judged as a whole
        (for small models that have not learned the tags); it still counts as format-invalid."""
        self.task, self.proposer, self.solver, self.critic = task, proposer, solver, critic
        self.proposer_sampling, self.solver_sampling = proposer_sampling, solver_sampling
        self.n, self.proposer_retries, self.solver_resample = n, proposer_retries, solver_resample
        self.limits, self.seed, self.answer_fallback = limits, seed, answer_fallback

    def run(self, docs: list[Document], step: int, first_group_id: int = 0) -> tuple[list[Example], StageStats]:
        stats = StageStats()
        examples = [Example(first_group_id + i, d) for i, d in enumerate(docs)]
        for name, fn in (
            ("propose", self.propose),
            ("solve", self.solve),
            ("rubric", self.rubric),
            ("judge", self.judge),
        ):
            t = time.perf_counter()
            stats.generated_tokens[name] = fn(examples, step)
            stats.seconds[name] = time.perf_counter() - t
        return examples, stats

    def propose(self, examples: list[Example], step: int) -> int:
        guide = roles.proposer_guide(self.limits) if self.limits else None
        tokens = 0
        for attempt in range(self.proposer_retries):
            todo = [e for e in examples if not e.proposer_valid]
            if not todo:
                break
            reqs = [
                Request(
                    self.task.proposer_messages(e.doc.text),
                    Sampling(
                        **{
                            **self.proposer_sampling.__dict__,
                            "n": 1,
                            "guide": guide,
                            "seed": request_seed(self.seed, step, e.group_id, "propose", attempt),
                        }
                    ),
                )
                for e in todo
            ]
            for e, comps in zip(todo, self.proposer.generate(reqs)):
                e.proposer_attempts += 1
                e.proposer_output = comps[0].text
                tokens += len(comps[0].token_ids)
                parsed = roles.parse_proposal(comps[0].text)
                if parsed:
                    e.problem, e.reference = parsed
        return tokens

    def solve(self, examples: list[Example], step: int) -> int:
        tokens = 0
        for call in range(1 + self.solver_resample):
            if call == 0:
                todo = [e for e in examples if e.proposer_valid]
            else:  # the paper re-samples while at most n//4 answers are valid
                todo = [
                    e
                    for e in examples
                    if e.proposer_valid and sum(a.answer is not None for a in e.answers) <= self.n // 4
                ]
            if not todo:
                break
            reqs = [
                Request(
                    self.task.solver_messages(e.problem or ""),
                    Sampling(
                        **{
                            **self.solver_sampling.__dict__,
                            "n": self.n,
                            "guide": None,  # never constrained: the format is learned through the reward
                            "seed": request_seed(self.seed, step, e.group_id, "solve", call),
                        }
                    ),
                )
                for e in todo
            ]
            for e, comps in zip(todo, self.solver.generate(reqs)):
                for c in comps:
                    e.answers.append(self._answer(c))
                    tokens += len(c.token_ids)
        return tokens

    def _answer(self, c: Completion) -> Answer:
        tagged = roles.extract_answer(c.text)
        if tagged is not None or not self.answer_fallback:
            return Answer(c, tagged, tagged is not None)
        whole = roles.after_think(c.text).strip()
        return Answer(c, whole or None, False)

    def rubric(self, examples: list[Example], step: int) -> int:
        todo = [e for e in examples if e.proposer_valid]
        for e in todo:
            if not any(a.answer is not None for a in e.answers):
                e.rubric_error = "no valid answer to show the rubric writer"
        todo = [e for e in todo if e.rubric_error is None]
        items = [
            RubricItem(
                id=str(e.group_id),
                document=e.doc.text,
                problem=e.problem or "",
                reference=e.reference or "",
                answers=[a.answer for a in e.answers if a.answer is not None],
                seed=request_seed(self.seed, step, e.group_id, "rubric"),
            )
            for e in todo
        ]
        for e, res in zip(todo, self.critic.write_rubrics(items) if items else []):
            e.rubric, e.rubric_error, e.rubric_output = res.rubric, res.error, res.raw
        return 0

    def judge(self, examples: list[Example], step: int) -> int:
        pending: list[Answer] = []
        items: list[JudgeItem] = []
        for e in examples:
            if not e.rubric_valid:
                continue
            for k, a in enumerate(e.answers):
                if a.answer is None:
                    continue
                pending.append(a)
                items.append(
                    JudgeItem(
                        id=f"{e.group_id}:{k}",
                        problem=e.problem or "",
                        rubric=e.rubric or [],
                        answer=a.answer,
                        seed=request_seed(self.seed, step, e.group_id, "judge", k),
                    )
                )
        for a, j in zip(pending, self.critic.judge(items) if items else []):
            a.judgement = j
        return 0
