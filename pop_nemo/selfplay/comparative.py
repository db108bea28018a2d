"""Comparative judging, the paper's scoring ablations (``offline.scoring``): ``median_anchor``
rates each answer against the median-length one, ``pairwise`` runs a round robin; both ask in
both orders and use the rubric as the reference. Rewards are mapped to [0, 1]."""

from __future__ import annotations

from pop_nemo.critic.base import Judgement
from pop_nemo.engines.base import Engine, Guide, Message, Request, Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion
from pop_nemo.selfplay.stage import Example, request_seed

ANCHOR_SYSTEM = """You compare two candidate answers to a problem, using an evaluation rubric as the reference. Each criterion of the rubric has a "gold" standard answer where one applies and a "weight" for how much it matters: use both.

First write brief thoughts on how each answer does on the rubric and how they compare. Then, on separate lines, rate each answer with an integer from 0 to 10 (higher is better; equal ratings mean a tie) in exactly these tags:
<rating_A>INTEGER</rating_A>
<rating_B>INTEGER</rating_B>"""

PAIRWISE_SYSTEM = """You compare two candidate answers to a problem, using an evaluation rubric as the reference. Each criterion of the rubric has a "gold" standard answer where one applies and a "weight" for how much it matters: use both.

First write brief thoughts on how each answer does on the rubric and how they compare. Then, on a separate line, name the better answer, A or B, in exactly this tag:
<better_answer>A or B</better_answer>"""


def comparison_messages(
    system: str, problem: str, criteria: list[Criterion], a: str, b: str, ask: str
) -> list[Message]:
    user = (
        f"<problem>\n{problem}\n</problem>\n\n<rubric>\n{roles.rubric_text(criteria)}\n</rubric>\n\n"
        f"<candidate_answer_A>\n{a}\n</candidate_answer_A>\n\n<candidate_answer_B>\n{b}\n</candidate_answer_B>\n\n{ask}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def anchor_guide(lim: roles.GuideLimits) -> Guide:
    return Guide(
        "ebnf",
        'root ::= thoughts "\\n<rating_A>" rating "</rating_A>\\n<rating_B>" rating "</rating_B>"\n'
        'rating ::= "10" | [0-9]\n'
        f"thoughts ::= [^<]{{0,{lim.thoughts_chars}}}\n",
    )


def pairwise_guide(lim: roles.GuideLimits) -> Guide:
    return Guide(
        "ebnf",
        f'root ::= thoughts "\\n<better_answer>" ("A" | "B") "</better_answer>"\nthoughts ::= [^<]{{0,{lim.thoughts_chars}}}\n',
    )


def parse_anchor_ratings(text: str) -> tuple[float, float] | None:
    """``(rating_A, rating_B)``: each tag exactly once, a number (the paper does not clip)."""
    got = []
    for tag in ("rating_A", "rating_B"):
        body = roles.extract_tag(text, tag)
        try:
            got.append(float(body) if body is not None else None)
        except ValueError:
            got.append(None)
    return None if None in got else (got[0], got[1])


def parse_better(text: str) -> float | None:
    """1.0 when A is better, 0.0 when B is, None otherwise."""
    body = roles.extract_tag(text, "better_answer")
    return {"a": 1.0, "b": 0.0}.get(body.casefold()) if body is not None else None


def anchor_index(answers: list[str]) -> int:
    """The paper's anchor: the median-length answer (characters; stable sort, index len//2)."""
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]))
    return order[len(order) // 2]


def anchor_score(forward: tuple[float, float] | None, backward: tuple[float, float] | None) -> float | None:
    """Answer i vs the anchor, as A (``forward``) and as B (``backward``): mean of r_i − r_anchor.
    Either order failing to parse makes the answer unscored, as in the paper."""
    if forward is None or backward is None:
        return None
    return ((forward[0] - forward[1]) + (backward[1] - backward[0])) / 2


def round_robin_scores(n: int, results: dict[tuple[int, int], list[float]]) -> list[float | None]:
    """Win rate of each answer: ``results[(i, j)]`` (i < j) holds, per valid comparison, 1.0 when
    i won and 0.0 when j won (0.5 for identical answers); the row mean over all entries."""
    rows: list[list[float]] = [[] for _ in range(n)]
    for (i, j), vals in results.items():
        rows[i].extend(vals)
        rows[j].extend(1.0 - v for v in vals)
    return [sum(r) / len(r) if r else None for r in rows]


class ComparativeJudge:
    """Scores every answer of a group by comparisons with the rubric (``median_anchor`` or
    ``pairwise``), batched across all groups of a chunk. Rewards are mapped to [0, 1]."""

    def __init__(self, mode: str, engine: Engine, sampling: Sampling, limits: roles.GuideLimits | None, seed: int):
        self.mode, self.engine, self.sampling, self.limits, self.seed = mode, engine, sampling, limits, seed

    def _request(self, e: Example, key: tuple, a: str, b: str) -> Request:
        if self.mode == "median_anchor":
            system, ask = ANCHOR_SYSTEM, "Now compare candidate answer A and candidate answer B and rate each of them."
            guide = anchor_guide(self.limits) if self.limits else None
        else:
            system, ask = (
                PAIRWISE_SYSTEM,
                "Now compare candidate answer A and candidate answer B and say which is better.",
            )
            guide = pairwise_guide(self.limits) if self.limits else None
        seed = request_seed(self.seed, 0, e.group_id, "judge", self.mode, *key)
        sampling = Sampling(**{**self.sampling.__dict__, "n": 1, "seed": seed, "guide": guide})
        return Request(comparison_messages(system, e.problem or "", e.rubric or [], a, b, ask), sampling)

    def judge(self, examples: list[Example]) -> None:
        plan: list[tuple[Example, list[int], tuple]] = []  # (example, answer indices, comparison key)
        requests: list[Request] = []
        groups = []
        for e in examples:
            if not e.rubric_valid:
                continue
            idx = [k for k, a in enumerate(e.answers) if a.answer is not None]
            texts = [e.answers[k].answer or "" for k in idx]
            groups.append((e, idx, texts))
            if self.mode == "median_anchor":
                anchor = anchor_index(texts)
                for i in range(len(texts)):
                    for order in ("ij", "ji"):
                        a, b = (texts[i], texts[anchor]) if order == "ij" else (texts[anchor], texts[i])
                        plan.append((e, idx, (i, order)))
                        requests.append(self._request(e, (i, order), a, b))
            else:
                for i in range(len(texts)):
                    for j in range(i + 1, len(texts)):
                        if texts[i].strip() == texts[j].strip():
                            continue  # identical answers tie without a call
                        for order in ("ij", "ji"):
                            a, b = (texts[i], texts[j]) if order == "ij" else (texts[j], texts[i])
                            plan.append((e, idx, (i, j, order)))
                            requests.append(self._request(e, (i, j, order), a, b))
        outputs = self.engine.generate(requests) if requests else []
        got: dict[tuple[int, tuple], str] = {
            (e.group_id, key): comps[0].text for (e, _, key), comps in zip(plan, outputs)
        }
        for e, idx, texts in groups:
            n = len(texts)
            if self.mode == "median_anchor":
                scores = [
                    anchor_score(
                        parse_anchor_ratings(got[(e.group_id, (i, "ij"))]),
                        parse_anchor_ratings(got[(e.group_id, (i, "ji"))]),
                    )
                    for i in range(n)
                ]
                rewards = [None if s is None else (s + 10) / 20 for s in scores]
            else:
                results: dict[tuple[int, int], list[float]] = {}
                for i in range(n):
                    for j in range(i + 1, n):
                        if texts[i].strip() == texts[j].strip():
                            results[(i, j)] = [0.5]
                            continue
                        ij, ji = (
                            parse_better(got[(e.group_id, (i, j, "ij"))]),
                            parse_better(got[(e.group_id, (i, j, "ji"))]),
                        )
                        results[(i, j)] = [v for v in (ij, None if ji is None else 1.0 - ji) if v is not None]
                scores = round_robin_scores(n, results)
                rewards = scores
            for k, s, r in zip(idx, scores, rewards):
                jid = f"{e.group_id}:{k}"
                e.answers[k].judgement = (
                    Judgement(jid, False, error=f"{self.mode}: a comparison did not parse")
                    if s is None
                    else Judgement(jid, True, score=s, reward=r)
                )
