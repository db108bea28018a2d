"""``rollout.judge.mode: per_criterion`` on the real model: guided one-criterion calls that
parse and score, and the online loop writing the judge tie metrics."""

from __future__ import annotations

import json

import pytest

from pop_nemo.config import GuideConfig
from pop_nemo.critic.base import JudgeItem
from pop_nemo.critic.local import LocalCritic
from pop_nemo.engines.base import Sampling
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion, tie_stats
from tests.conftest import ROOT, TINY, RecordingEngine, run_cli

RUBRIC = [
    Criterion("Names vitamin D", "Vitamin D", "says vitamin D", 2.0),
    Criterion("Mentions sunlight", "sunlight", "says the skin makes it in sunlight", 1.0),
]


def test_tie_stats_exact_values():
    # group 1: scores 1,1,2 -> 1 tie of 3 pairs; group 2: 0,0 -> 1 of 1, all equal; group 3: one score, not counted
    assert tie_stats([[1.0, 1.0, 2.0], [0.0, 0.0], [2.0]]) == (2 / 4, 1 / 2)
    assert tie_stats([[2.0], []]) == (None, None)
    assert tie_stats([[0.5, 1.5]]) == (0.0, 0.0)


def test_per_criterion_guided_calls_on_the_real_model(engine):
    limits = roles.GuideLimits.from_section(GuideConfig(name_chars=24, thoughts_chars=24, max_criteria=2))
    judge = Sampling(temperature=0.0, max_new_tokens=120)
    critic = LocalCritic(engine, engine, judge, judge, writing=False, limits=limits, judge_mode="per_criterion")
    items = [JudgeItem(f"q:{k}", "Which vitamin does sunlight make?", RUBRIC, a, seed=k)
             for k, a in enumerate(["Vitamin D, made in sunlight.", "Vitamin C."])]  # fmt: skip
    calls = engine.stats["calls"]
    got = critic.judge(items)
    assert engine.stats["calls"] == calls + 1  # all four one-criterion requests in one engine call
    for j in got:
        assert j.valid, j.error
        assert [r.name for r in j.ratings] == [c.name for c in RUBRIC]
        assert all(r.rating in (0.0, 1.0, 2.0) for r in j.ratings)
        expected = sum(c.weight * r.rating for c, r in zip(RUBRIC, j.ratings)) / 3
        assert j.score == pytest.approx(expected) and j.reward == pytest.approx(expected / 2)


@pytest.mark.slow
def test_online_loop_with_per_criterion_judge(tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--config", str(TINY), "--output-dir", str(out), "trainer.max_steps=1",
            "rollout.judge.mode=per_criterion", "algo.answer_fallback=true")  # fmt: skip
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "judge_tie_rate" in m and "judge_all_equal_rate" in m
    assert m["judge_valid_rate"] == 1.0  # guided one-criterion calls always parse
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    judged = [a for r in recs for a in r["answers"] if a["judge_valid"]]
    assert judged
    for r in recs:
        for a in r["answers"]:
            if a["judge_valid"]:
                assert [x["name"] for x in a["ratings"]] == [c["name"] for c in r["rubric"]]


@pytest.mark.slow
def test_offline_synthesis_with_per_criterion_judge(engine):
    from pop_nemo import build
    from pop_nemo.config import load_config
    from pop_nemo.selfplay.synthesize import Synthesizer

    cfg = load_config(
        ROOT / "conf/offline/tiny_cpu.yaml",
        ["offline.n=2", "rollout.judge.mode=per_criterion", "rollout.judge.temperature=0.0",
         "rollout.guide.max_criteria=2", "rollout.rubric.max_new_tokens=300", "algo.answer_fallback=true"],
    )  # fmt: skip
    own = RecordingEngine(engine)
    synth = Synthesizer(cfg, dict.fromkeys(("proposer", "solver", "rubric", "judge"), own))
    (e,), _ = synth.run(build.build_corpus(cfg).take(1), first_group_id=0)
    assert e.rubric_valid, e.rubric_error
    judged = [a for a in e.answers if a.answer is not None]
    judge_prompts = [r for r in own.requests if "Now evaluate the candidate answer." in r.messages[-1]["content"]]
    assert len(judge_prompts) == len(judged) * len(e.rubric)  # one call per (answer, criterion)
    for a in judged:
        assert a.judgement.valid, a.judgement.error
        assert [r.name for r in a.judgement.ratings] == [c.name for c in e.rubric]
