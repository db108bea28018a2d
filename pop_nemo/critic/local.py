"""The critic in-process: rubric writer and judge on Engines. The critic server wraps this."""

from __future__ import annotations

from collections.abc import Sequence

from pop_nemo.critic.base import JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.engines.base import Engine, Request, Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import RubricError, reward_from_score, weighted_score


class LocalCritic:
    def __init__(
        self,
        rubric_engine: Engine,
        judge_engine: Engine,
        rubric_sampling: Sampling,
        judge_sampling: Sampling,
        writing: bool,
        limits: roles.GuideLimits | None = None,
    ):
        """``limits`` set = guided decoding (the rubric and evaluation JSON always parse)."""
        self.rubric_engine, self.judge_engine = rubric_engine, judge_engine
        self.rubric_sampling, self.judge_sampling = rubric_sampling, judge_sampling
        self.writing = writing
        self.limits = limits

    def write_rubrics(self, items: Sequence[RubricItem]) -> list[RubricResult]:
        guide = roles.rubric_guide(self.limits) if self.limits else None
        requests = [
            Request(
                roles.rubric_messages(
                    it.document, it.problem, it.reference, roles.subsample_answers(it.answers, self.writing)
                ),
                Sampling(**{**self.rubric_sampling.__dict__, "n": 1, "seed": it.seed, "guide": guide}),
                id=it.id,
            )
            for it in items
        ]
        results = []
        for it, comps in zip(items, self.rubric_engine.generate(requests) if requests else []):
            text = comps[0].text
            try:
                results.append(RubricResult(it.id, True, roles.parse_rubric(text), raw=text))
            except RubricError as e:
                results.append(RubricResult(it.id, False, None, error=str(e), raw=text))
        return results

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        requests = [
            Request(
                roles.judge_messages(it.problem, it.rubric, it.answer),
                Sampling(
                    **{
                        **self.judge_sampling.__dict__,
                        "n": 1,
                        "seed": it.seed,
                        "guide": roles.judge_guide(it.rubric, self.limits) if self.limits else None,
                    }
                ),
                id=it.id,
            )
            for it in items
        ]
        out = []
        for it, comps in zip(items, self.judge_engine.generate(requests) if requests else []):
            out.append(score_evaluation(it, comps[0].text))
        return out


def score_evaluation(item: JudgeItem, text: str) -> Judgement:
    """Parse a judge's output and score it against the item's rubric."""
    try:
        ratings = roles.parse_evaluation(text)
        score = weighted_score(item.rubric, ratings)
    except RubricError as e:
        return Judgement(item.id, False, error=str(e), raw=text)
    return Judgement(item.id, True, score=score, reward=reward_from_score(score), ratings=ratings, raw=text)
