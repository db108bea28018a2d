"""No model output crashes a run: every parser returns a value or a RubricError with its reason,
LocalCritic turns any rubric writer or judge output into a (maybe invalid) result, and the critic
server answers adversarial bodies and adversarial model outputs without a 5xx.

The engine here replays scripted texts: the point is what a model *could* emit (an unguided
teacher endpoint, say), which a real 135M model will not produce on demand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop_nemo.critic.base import JudgeItem, RubricItem
from pop_nemo.critic.local import LocalCritic, score_per_criterion
from pop_nemo.critic.server import CriticService, ServeConfig, ServerThread
from pop_nemo.engines.base import Completion, Request, Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion, RubricError

SETTINGS = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------- adversarial text

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300),
    st.floats(),  # NaN and ±inf included: json.dumps writes them as NaN / Infinity
    st.text(max_size=12),
    st.sampled_from(["2", " 1 ", "inf", "-Infinity", "NaN", "1e999", "0x10", "", "..."]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "rating",
                    "weight",
                    "gold",
                    "description",
                    "thoughts",
                    "criterion_1",
                    "criterion_2",
                    "criteria",
                    "evaluation",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        ),  # fmt: skip
    ),
    max_leaves=20,
)

HOSTILE = [
    "[" * 100_000 + "]" * 100_000,  # RecursionError in json
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "1" * 5000,  # more digits than int() converts by default: ValueError, not JSONDecodeError
    '{"criterion_1": {"name": "A", "gold": "g", "description": "d", "weight": ' + "9" * 5000 + "}}",
    '{"criterion_1": {"name": "A", "thoughts": "t", "rating": ' + "9" * 400 + "}}",
    '{"criterion_1": {"name": "A", "gold": "g", "description": "d", "weight": 1e999}}',
    '{"criterion_1": {"name": "A", "thoughts": "t", "rating": NaN}}',
    '{"criterion_1": {"name": "A", "thoughts": "t", "rating": Infinity}}',
    '{"criterion_1": {"name": "A", "thoughts": "t", "rating": true}}',
    '{"criterion_1": {"name": "A", "name": 3, "thoughts": "t", "rating": 1}}',  # duplicate keys: last wins
    "{}",
    "[]",
    "null",
    '"text"',
    "<evaluation></evaluation>",
    "<evaluation>...</evaluation>",
    "<rubric>{}</rubric><rubric>{}</rubric>",
    "</think>",
    "\x00\ud800",
]


def wrapped(tag: str) -> st.SearchStrategy[str]:
    """Any text, JSON of any shape (tagged or bare, after a </think> or not), and known hostiles."""
    body = st.one_of(st.text(max_size=200), JSON.map(json.dumps), st.sampled_from(HOSTILE))
    return st.tuples(body, st.sampled_from(["bare", "tag", "think", "twice"])).map(
        lambda bt: {
            "bare": bt[0],
            "tag": f"<{tag}>{bt[0]}</{tag}>",
            "think": f"<think>{{</think><{tag}>{bt[0]}</{tag}>",
            "twice": f"<{tag}>{bt[0]}</{tag}><{tag}>{bt[0]}</{tag}>",
        }[bt[1]]
    )


RUBRIC = [Criterion("Dose", "500 mg", "states the dose", 2.0), Criterion("Safety", "n/a", "warns", 1.0)]


def _valid_criteria(got: list[Criterion]) -> bool:
    return all(math.isfinite(c.weight) and c.weight > 0 and isinstance(c.name, str) for c in got)


def _valid_ratings(got: list) -> bool:
    return all(not math.isnan(r.rating) for r in got)


@pytest.mark.parametrize(
    "tag, parse, valid",
    [("rubric", roles.parse_rubric, _valid_criteria), ("evaluation", roles.parse_evaluation, _valid_ratings)],
)
@SETTINGS
@given(data=st.data(), paper=st.booleans())
def test_tagged_json_parsers_return_a_value_or_rubric_error(tag, parse, valid, data, paper):
    """``parse_rubric`` gives valid criteria, ``parse_evaluation`` ratings that are numbers, or a RubricError with its reason."""
    text = data.draw(wrapped(tag), label="text")
    try:
        got = parse(text, paper)
    except RubricError as e:
        assert str(e)
        return
    assert got and valid(got)


@SETTINGS
@given(st.one_of(st.text(max_size=300), st.sampled_from(HOSTILE)), st.text(max_size=50))
def test_parse_proposal_and_answer_return_a_value_or_none(text, extra):
    for t in (text, f"<problem>{text}</problem><answer>{extra}</answer>"):
        got = roles.parse_proposal(t)
        assert got is None or (got[0].strip() and got[1].strip())
        ans = roles.extract_answer(t)
        assert ans is None or ans.strip()


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("paper", [False, True])
def test_each_hostile_output_is_a_rubric_error_or_a_value(text, paper):
    for parse in (roles.parse_rubric, roles.parse_evaluation):
        for t in (text, f"<rubric>{text}</rubric>", f"<evaluation>{text}</evaluation>"):
            try:
                parse(t, paper)
            except RubricError:
                pass


# ---------------------------------------------------------------- LocalCritic on scripted outputs


class ScriptedEngine:
    """An Engine that answers every request with the next scripted text (cycling)."""

    def __init__(self, texts: Sequence[str]):
        self.texts, self.i, self.requests = list(texts), 0, []

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        out = []
        for r in requests:
            self.requests.append(r)
            text = self.texts[self.i % len(self.texts)]
            self.i += 1
            out.append([Completion(text, [1] * 3, [0.0] * 3, [1], "stop")] * r.sampling.n)
        return out

    def update_weights(self, source) -> None:  # pragma: no cover - the protocol's other methods
        pass

    def sleep(self) -> None:  # pragma: no cover
        pass

    def wake(self) -> None:  # pragma: no cover
        pass


def critic(texts: Sequence[str], mode: str = "rubric", paper: bool = False) -> LocalCritic:
    eng = ScriptedEngine(texts)
    return LocalCritic(eng, eng, Sampling(0.0), Sampling(0.0), writing=False, judge_mode=mode, paper_parsing=paper)


@SETTINGS
@given(st.lists(st.one_of(wrapped("evaluation"), wrapped("rubric")), min_size=1, max_size=4),
       st.sampled_from(["rubric", "per_criterion"]), st.booleans())  # fmt: skip
def test_local_critic_never_raises_on_any_output(texts, mode, paper):
    c = critic(texts, mode, paper)
    items = [JudgeItem(f"q:{k}", "Which dose?", RUBRIC, "500 mg", seed=k) for k in range(3)]
    for j in c.judge(items):
        assert j.valid == (j.error is None)
        if j.valid:
            assert 0.0 <= j.score <= 2.0 and j.reward == j.score / 2
    for r in c.write_rubrics([RubricItem("g", "doc", "p", "ref", ["a", "b"], seed=1)]):
        assert r.valid == (r.rubric is not None) and r.valid == (r.error is None)


def test_per_criterion_makes_one_call_per_criterion_and_scores_them_together():
    texts = [
        json.dumps({"criterion_1": {"name": "Dose", "thoughts": "right", "rating": 2}}),
        '<evaluation>{"criterion_1": {"name": "safety", "thoughts": "no", "rating": 0}}</evaluation>',
    ]
    c = critic(texts, "per_criterion")
    (j,) = c.judge([JudgeItem("q:0", "Which dose?", RUBRIC, "500 mg", seed=5)])
    assert j.valid and j.score == pytest.approx((2 * 2 + 1 * 0) / 3)
    reqs = c.judge_engine.requests
    assert len(reqs) == 2 and [r.id for r in reqs] == ["q:0#0", "q:0#1"]
    assert "Dose" in reqs[0].messages[1]["content"] and "Safety" not in reqs[0].messages[1]["content"]
    assert reqs[0].sampling.seed != reqs[1].sampling.seed


def test_per_criterion_one_failed_call_fails_the_judgement():
    item = JudgeItem("q:0", "p", RUBRIC, "a")
    ok = json.dumps({"criterion_1": {"name": "Dose", "thoughts": "", "rating": 2}})
    j = score_per_criterion(item, [ok, "no json here"])
    assert not j.valid and "no single <evaluation>" in j.error
    # a call that rates another criterion only: not this one
    two = json.dumps({"a": {"name": "Tone", "rating": 1}, "b": {"name": "Style", "rating": 1}})
    assert not score_per_criterion(item, [ok, two]).valid
    # one rating under another name counts for the criterion asked about
    other = json.dumps({"criterion_1": {"name": "whatever", "rating": 1}})
    assert score_per_criterion(item, [ok, other]).score == pytest.approx((2 * 2 + 1 * 1) / 3)


def test_empty_evaluation_is_a_failed_judge_call_not_a_zero():
    (j,) = critic(["<evaluation>{}</evaluation>"]).judge([JudgeItem("q", "p", RUBRIC, "a")])
    assert not j.valid and j.score is None and "empty evaluation" in j.error


# ---------------------------------------------------------------- the critic server


@pytest.fixture(scope="module")
def scripted_server():
    texts = [
        HOSTILE[0],
        HOSTILE[2],
        '{"criterion_1": {"name": "Dose", "thoughts": "t", "rating": NaN}}',
        '{"criterion_1": {"name": "Dose", "thoughts": "t", "rating": 2}}',
        "{}",
        '<rubric>{"criterion_1": {"name": "A", "gold": "g", "description": "d", "weight": 1e999}}</rubric>',
    ]
    eng = ScriptedEngine(texts)
    c = LocalCritic(eng, eng, Sampling(0.0), Sampling(0.0), writing=False, judge_mode="per_criterion")
    with ServerThread(CriticService(load=lambda: c, cfg=ServeConfig(max_body_mb=1))) as srv:
        srv.wait_ready()
        yield srv


ITEM = {"id": "q:0", "problem": "Which dose?", "answer": "500 mg",
        "rubric": [{"name": "Dose", "gold": "500 mg", "description": "d", "weight": 2}]}  # fmt: skip


def test_server_answers_hostile_model_outputs_with_200_and_invalid_items(scripted_server):
    with httpx.Client(base_url=scripted_server.url, timeout=60) as client:
        seen_valid = seen_invalid = 0
        for k in range(12):
            r = client.post("/v1/score", json={"items": [dict(ITEM, id=f"q:{k}")]})
            assert r.status_code == 200, r.text[:300]
            item = r.json()["items"][0]
            seen_valid += item["valid"]
            seen_invalid += not item["valid"]
            assert item["valid"] or item["error"]
        r = client.post(
            "/v1/rubric", json={"id": "g", "document": "d", "problem": "p", "reference": "r", "answers": ["a"]}
        )
        assert r.status_code == 200 and r.json()["valid"] in (True, False)
        assert seen_valid and seen_invalid
        assert client.get("/healthz").status_code == 200


BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    json.dumps({"items": [dict(ITEM, rubric=[dict(ITEM["rubric"][0], weight=0)])]})
    .encode()
    .replace(b'"weight": 0', b'"weight": ' + b"9" * 5000),
    json.dumps({"items": [ITEM]}).encode().replace(b'"weight": 2', b'"weight": 1e999'),
    json.dumps({"items": [ITEM]}).encode().replace(b'"weight": 2', b'"weight": NaN'),
    json.dumps({"items": [ITEM]}).encode().replace(b'"weight": 2', b'"weight": true'),
    json.dumps({"items": [ITEM]}).encode().replace(b'"weight": 2', b'"weight": 2, "weight": "x"'),
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_server_refuses_adversarial_bodies_with_a_4xx(scripted_server, body):
    with httpx.Client(base_url=scripted_server.url, timeout=60) as client:
        r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert client.get("/healthz").status_code == 200
