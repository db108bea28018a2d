"""The critic in-process: rubric writer and judge on Engines. The critic server wraps this.

Judge modes (``rollout.judge.mode``): ``rubric`` asks for every criterion in one call (the
paper); ``per_criterion`` makes one short call per criterion, all batched into one engine call,
and scores the collected ratings with the same weighted score. No model output raises here:
the parsers raise only RubricError, which becomes an invalid result carrying its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pop_nemo.critic.base import JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.engines.base import Engine, Request, Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion, Rating, RubricError, reward_from_score, weighted_score

JudgeMode = Literal["rubric", "per_criterion"]


class LocalCritic:
    def __init__(
        self,
        rubric_engine: Engine,
        judge_engine: Engine,
        rubric_sampling: Sampling,
        judge_sampling: Sampling,
        writing: bool,
        limits: roles.GuideLimits | None = None,
        judge_mode: JudgeMode = "rubric",
        paper_parsing: bool = False,
    ):
        """``limits`` set = guided decoding (the rubric and evaluation JSON always parse).
        ``paper_parsing``: the paper's stricter parsing rules (DESIGN §6)."""
        if judge_mode not in ("rubric", "per_criterion"):
            raise ValueError(f"judge_mode={judge_mode!r}: use rubric or per_criterion")
        self.rubric_engine, self.judge_engine = rubric_engine, judge_engine
        self.rubric_sampling, self.judge_sampling = rubric_sampling, judge_sampling
        self.writing = writing
        self.limits = limits
        self.judge_mode, self.paper_parsing = judge_mode, paper_parsing

    def step_metrics(self) -> dict[str, Any]:
        return {}  # nothing beyond the step's own counts: no replicas, no network

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
                results.append(RubricResult(it.id, True, roles.parse_rubric(text, self.paper_parsing), raw=text))
            except RubricError as e:
                results.append(RubricResult(it.id, False, None, error=str(e), raw=text))
        return results

    def _request(self, it: JudgeItem, criteria: list[Criterion], k: int | None) -> Request:
        guide = roles.judge_guide(criteria, self.limits) if self.limits else None
        seed = it.seed if k is None or it.seed is None else (it.seed + k + 1) % 2**62
        sampling = Sampling(**{**self.judge_sampling.__dict__, "n": 1, "seed": seed, "guide": guide})
        rid = it.id if k is None else f"{it.id}#{k}"
        return Request(roles.judge_messages(it.problem, criteria, it.answer), sampling, id=rid)

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        if self.judge_mode == "per_criterion":
            return self._judge_per_criterion(items)
        requests = [self._request(it, it.rubric, None) for it in items]
        out = []
        for it, comps in zip(items, self.judge_engine.generate(requests) if requests else []):
            out.append(score_evaluation(it, comps[0].text, self.paper_parsing))
        return out

    def _judge_per_criterion(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        """One request per (item, criterion), in one engine call; item k's criterion j gets the
        seed ``seed + j + 1`` so the calls of one item differ."""
        keys = [(i, j) for i, it in enumerate(items) for j in range(len(it.rubric))]
        requests = [self._request(items[i], [items[i].rubric[j]], j) for i, j in keys]
        texts: list[list[str]] = [[] for _ in items]
        for (i, _), comps in zip(keys, self.judge_engine.generate(requests) if requests else []):
            texts[i].append(comps[0].text)
        return [score_per_criterion(it, texts[i], self.paper_parsing) for i, it in enumerate(items)]


def score_evaluation(item: JudgeItem, text: str, paper: bool = False) -> Judgement:
    """Parse a judge's output and score it against the item's rubric; never raises."""
    try:
        ratings = roles.parse_evaluation(text, paper)
        score = weighted_score(item.rubric, ratings)
    except RubricError as e:
        return Judgement(item.id, False, error=str(e), raw=text)
    return Judgement(item.id, True, score=score, reward=reward_from_score(score), ratings=ratings, raw=text)


def score_per_criterion(item: JudgeItem, texts: list[str], paper: bool = False) -> Judgement:
    """Score the outputs of one-criterion judge calls (``texts[j]`` rates ``item.rubric[j]``).

    Each output must parse; it counts only its own criterion (its last rating of that name, or
    its only rating when the name differs). Any failed call fails the whole judgement, as a
    failed single call would in ``rubric`` mode.
    """
    raw = "\n".join(texts)
    ratings: list[Rating] = []
    try:
        for c, text in zip(item.rubric, texts, strict=True):
            got = roles.parse_evaluation(text, paper)
            mine = [r for r in got if r.name.strip().casefold() == c.name.strip().casefold()]
            if not mine and len(got) != 1:
                raise RubricError(f"criterion {c.name!r}: the judge did not rate it")
            r = (mine or got)[-1]
            ratings.append(Rating(c.name, r.rating, r.thoughts))
        score = weighted_score(item.rubric, ratings)
    except (RubricError, ValueError) as e:  # ValueError: zip(strict=True), a call missing
        return Judgement(item.id, False, error=str(e), raw=raw)
    return Judgement(item.id, True, score=score, reward=reward_from_score(score), ratings=ratings, raw=raw)
