"""HealthBench-format scoring pinned on hand-built cases; file format; the grader's plumbing.

score = clip(Σ points of met items / Σ positive points, 0, 1); no positive points → no score;
any item the grader failed to judge → no score for that conversation (counted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from pop_nemo.engines.base import Completion, Request, Sampling
from pop_nemo.eval import healthbench as hb
from pop_nemo.eval.healthbench import RubricPoint, score


def rubric(*points: float) -> list[RubricPoint]:
    return [RubricPoint(f"item {i}", p) for i, p in enumerate(points)]


# ---------------------------------------------------------------- the scorer, exact


@pytest.mark.parametrize(
    ("points", "met", "expected", "raw"),
    [
        ((10, 5, -8, 3), (True, False, False, True), 13 / 18, 13 / 18),  # unmet positive and negative items
        ((10, 5, -8, 3), (True, True, False, True), 1.0, 1.0),  # every positive met, no negative: full score
        ((10, -8, 2), (True, True, False), 2 / 12, 2 / 12),  # a met negative item subtracts
        ((5, -10), (False, True), 0.0, -2.0),  # clipped at 0; raw keeps -10/5
        ((5, -10), (True, True), 0.0, -1.0),
        ((4, 4), (False, False), 0.0, 0.0),  # nothing met
        ((3, 0, -1), (True, True, False), 1.0, 1.0),  # a zero-point item changes nothing
        ((2.5, 7.5), (False, True), 0.75, 0.75),  # fractional points
    ],
)
def test_score_exact(points, met, expected, raw):
    s = score(rubric(*points), list(met))
    assert s.score == pytest.approx(expected, abs=0, rel=1e-12)
    assert s.raw_score == pytest.approx(raw, abs=0, rel=1e-12)
    assert s.possible == sum(p for p in points if p > 0)
    assert s.achieved == sum(p for p, m in zip(points, met) if m)
    assert s.judge_failures == 0
    assert 0.0 <= s.score <= 1.0


def test_all_negative_rubric_has_no_score_met_or_not():
    for met in ([False, False], [True, False], [True, True]):
        s = score(rubric(-10, -5), met)
        assert s.score is None and s.raw_score is None
        assert s.possible == 0
    assert score(rubric(-10, -5), [True, False]).achieved == -10


def test_a_judge_failure_leaves_the_conversation_unscored():
    s = score(rubric(5, 5, -3), [True, None, False])
    assert s.score is None and s.raw_score is None
    assert s.judge_failures == 1
    assert s.achieved == 5  # what was judged is kept for inspection
    assert score(rubric(5, 5), [None, None]).judge_failures == 2


def test_score_needs_one_verdict_per_item():
    with pytest.raises(ValueError, match="2 verdicts for 3"):
        score(rubric(1, 2, 3), [True, False])


def test_summary_means_only_scored_conversations_and_counts_the_rest():
    records = [
        {"prompt_id": "a", "example_tags": ["t1"], "items": [{}] * 2, "num_tokens": 10, **score(rubric(4, 4), [True, False]).to_dict()},
        {"prompt_id": "b", "example_tags": ["t1", "t2"], "items": [{}] * 2, "num_tokens": 20, **score(rubric(5, -10), [False, True]).to_dict()},
        {"prompt_id": "c", "example_tags": ["t2"], "items": [{}] * 2, "num_tokens": 30, **score(rubric(-1, -2), [False, False]).to_dict()},
        {"prompt_id": "d", "example_tags": [], "items": [{}] * 3, "num_tokens": 40, **score(rubric(1, 1, 1), [True, None, None]).to_dict()},
    ]  # fmt: skip
    s = hb.summarize(records, resamples=200, confidence=0.95, seed=0)
    assert s["score"]["mean"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["score"]["n"] == s["scored"] == 2
    assert s["raw_score_mean"] == pytest.approx((0.5 - 2.0) / 2)
    assert s["unscorable"] == 1
    assert s["conversations_with_judge_failure"] == 1
    assert s["judge_failures"] == 2
    assert s["items_judged"] == 9
    assert s["by_tag"] == {"t1": pytest.approx(0.25), "t2": 0.0}
    assert s["length_tokens_mean"] == 25


# ---------------------------------------------------------------- the file format


def write(tmp_path, rows) -> object:
    p = tmp_path / "hb.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def good(i: int = 1, **over) -> dict:
    row = {
        "prompt_id": f"c{i}",
        "prompt": [{"role": "user", "content": "Is it safe?"}],
        "rubrics": [
            {"criterion": "Says yes", "points": 3, "tags": ["axis:accuracy"]},
            {"criterion": "Rude", "points": -2},
        ],
        "example_tags": ["theme:x"],
    }
    row.update(over)
    return row


def test_bundled_example_has_positive_negative_and_all_negative_rubrics():
    convs = hb.load(hb.example_path())
    assert len(convs) >= 3
    pts = [[r.points for r in c.rubric] for c in convs]
    assert any(any(p > 0 for p in ps) and any(p < 0 for p in ps) for ps in pts)
    assert any(all(p < 0 for p in ps) for ps in pts)
    assert any(len(c.messages) > 1 for c in convs)  # a multi-turn conversation
    assert hb.resolve_path("example") == hb.example_path()
    assert [c.id for c in hb.load(hb.example_path(), limit=2)] == [c.id for c in convs[:2]]


def test_load_reads_the_healthbench_fields(tmp_path):
    (c,) = hb.load(write(tmp_path, [good()]))
    assert c.id == "c1" and c.messages == [{"role": "user", "content": "Is it safe?"}]
    assert c.rubric == [RubricPoint("Says yes", 3.0, ("axis:accuracy",)), RubricPoint("Rude", -2.0, ())]
    assert c.tags == ("theme:x",)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (good(prompt=[]), "non-empty list"),
        (good(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), "end with a user"),
        (good(prompt=[{"role": "doctor", "content": "q"}]), r"prompt\[0\]"),
        (good(rubrics=[]), "'rubrics'"),
        (good(rubrics=[{"criterion": " ", "points": 1}]), r"rubrics\[0\] needs a non-empty 'criterion'"),
        (good(rubrics=[{"criterion": "x", "points": "5"}]), r"rubrics\[0\].points must be a finite number"),
        (good(rubrics=[{"criterion": "x", "points": True}]), "finite number"),
        (good(prompt_id=None), "prompt_id"),
    ],
)
def test_load_names_the_line_and_field(tmp_path, row, message):
    with pytest.raises(hb.HealthBenchError, match=message) as e:
        hb.load(write(tmp_path, [good(0), row]))
    assert "hb.jsonl:2" in str(e.value)


def test_load_rejects_bad_json_missing_file_and_repeated_ids(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt_id": 1}\n{not json\n')
    with pytest.raises(hb.HealthBenchError, match="bad.jsonl:1"):
        hb.load(p)
    p.write_text(json.dumps(good()) + "\n{not json\n")
    with pytest.raises(hb.HealthBenchError, match="bad.jsonl:2: not valid JSON"):
        hb.load(p)
    with pytest.raises(hb.HealthBenchError, match="does not exist"):
        hb.load(tmp_path / "missing.jsonl")
    with pytest.raises(hb.HealthBenchError, match="repeats"):
        hb.load(write(tmp_path, [good(1), good(1)]))


# ---------------------------------------------------------------- grader replies


@pytest.mark.parametrize(
    ("text", "met"),
    [
        ('{"explanation": "ok", "criteria_met": true}', True),
        ('{"explanation": "no", "criteria_met": false}', False),
        ('```json\n{"explanation": "fenced", "criteria_met": true}\n```', True),
        ('<think>{"criteria_met": true}</think>{"explanation": "", "criteria_met": false}', False),
    ],
)
def test_parse_grade(text, met):
    assert hb.parse_grade(text)[0] is met


@pytest.mark.parametrize("text", ["yes", '{"criteria_met": "true"}', '{"explanation": "x"}', "{broken", "[true]"])
def test_parse_grade_failures(text):
    with pytest.raises(hb.GradeError):
        hb.parse_grade(text)


def test_grader_prompt_shows_the_reply_and_the_signed_points():
    (c,) = hb.load(hb.example_path(), limit=1)
    item = next(r for r in c.rubric if r.points < 0)
    msgs = hb.grader_messages(c, "Take ibuprofen.", item)
    assert msgs[0]["role"] == "system" and "negative" in msgs[0]["content"]
    assert f"[{item.points:g}] {item.criterion}" in msgs[1]["content"]
    assert "assistant: Take ibuprofen." in msgs[1]["content"]
    assert c.messages[0]["content"] in msgs[1]["content"]


class ScriptedEngine:
    """A deterministic test double of the Engine protocol: ``reply(request) -> text``."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        self.requests.extend(requests)
        return [
            [Completion(self.reply(r), [1] * 3, [0.0] * 3, [0], "stop") for _ in range(r.sampling.n)] for r in requests
        ]

    def update_weights(self, source) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


def test_evaluate_scores_each_item_and_counts_grader_failures(tmp_path):
    rows = [
        good(1, rubrics=[{"criterion": "MEET a", "points": 6}, {"criterion": "skip b", "points": 2}, {"criterion": "MEET bad", "points": -4}]),
        good(2, rubrics=[{"criterion": "MEET a", "points": 1}, {"criterion": "BROKEN", "points": 1}]),
        good(3, rubrics=[{"criterion": "MEET only bad", "points": -5}]),
    ]  # fmt: skip
    convs = hb.load(write(tmp_path, rows))
    model = ScriptedEngine(lambda r: "  my reply  ")

    def grade(r: Request) -> str:
        item = r.messages[1]["content"].split("<rubric_item>")[1]
        if "BROKEN" in item:
            return "I think it does."
        return json.dumps({"explanation": "e", "criteria_met": "MEET" in item})

    grader = ScriptedEngine(grade)
    out = hb.evaluate(convs, model, grader, Sampling(temperature=0.0, max_new_tokens=8), 32, 50, seed=0)
    assert [g.reply for g in out] == ["my reply"] * 3
    assert [g.result.score for g in out] == [pytest.approx(2 / 8), None, None]
    assert out[1].result.judge_failures == 1 and out[2].result.possible == 0
    rec = out[1].to_record()
    assert rec["items"][1]["met"] is None and "no JSON object" in rec["items"][1]["error"]
    assert [v["met"] for v in out[0].to_record()["items"]] == [True, False, True]
    # one batched call each; every grader request guided, greedy, seeded
    assert len(model.requests) == 3 and len(grader.requests) == 6
    assert all(r.sampling.guide is not None and r.sampling.temperature == 0 for r in grader.requests)
    assert len({r.sampling.seed for r in grader.requests}) == 6
    assert json.loads(grader.requests[0].sampling.guide.spec)["required"] == ["explanation", "criteria_met"]


def test_grader_choice(monkeypatch):
    from pop_nemo.config import load_config
    from pop_nemo.engines.openai import OpenAIEngine
    from pop_nemo.eval.runner import build_grader

    reference = ScriptedEngine(lambda r: "")
    assert build_grader(load_config(None, []), reference) is reference
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    cfg = load_config(
        None,
        [
            "eval.judge_url=http://judge:8000/v1",
            "eval.judge_model=big-judge",
            "eval.judge_api_key_env=JUDGE_KEY",
            "eval.judge_guide_format=vllm",
        ],
    )
    g = build_grader(cfg, reference)
    assert isinstance(g, OpenAIEngine) and g.url == "http://judge:8000/v1" and g.model == "big-judge"
    (c,) = hb.load(hb.example_path(), limit=1)
    s = Sampling(temperature=0.0, max_new_tokens=64, guide=hb.grader_guide(100))
    body = g.body(Request(hb.grader_messages(c, "reply", c.rubric[0]), s))
    assert body["model"] == "big-judge" and body["temperature"] == 0.0
    assert body["guided_json"]["required"] == ["explanation", "criteria_met"]
    assert g._client.headers["Authorization"] == "Bearer sekrit"
    g.close()
