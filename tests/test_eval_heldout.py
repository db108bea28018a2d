"""The held-out split, the problem cache key, eval config checks and comparisons (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pop_nemo.build import build_corpus
from pop_nemo.config import ConfigError, load_config
from pop_nemo.corpus import Corpus, is_heldout, split_point
from pop_nemo.eval import heldout, runner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "conf" / "tiny.yaml"


def cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def test_split_is_a_pure_function_of_the_id():
    p = split_point("health-004", "pop-nemo-heldout")
    assert 0 <= p < 1 and p == split_point("health-004", "pop-nemo-heldout")
    assert p != split_point("health-004", "other-salt")
    assert is_heldout("health-004", 0.1, "pop-nemo-heldout")
    assert not is_heldout("health-001", 0.1, "pop-nemo-heldout")
    ids = [f"doc-{i}" for i in range(4000)]
    share = sum(is_heldout(i, 0.1, "s") for i in ids) / len(ids)
    assert 0.085 < share < 0.115
    # a larger fraction only adds documents: evaluation sets nest
    assert {i for i in ids if is_heldout(i, 0.05, "s")} <= {i for i in ids if is_heldout(i, 0.1, "s")}


def test_training_corpus_never_holds_a_heldout_document():
    c = cfg()
    held = heldout.heldout_ids(c)
    docs = heldout.heldout_documents(c)
    assert held and {d.id for d in docs} <= held
    train_ids = {d.id for d in build_corpus(c).documents}
    assert not train_ids & held
    everything = {d.id for d in Corpus(domains=["health"]).documents}
    assert train_ids | {d.id for d in docs} == everything
    # the split does not move with the training seed or the data-parallel layout
    assert heldout.heldout_ids(cfg("seed=99")) == held
    ranks = [{d.id for d in build_corpus(c, rank=r, world_size=2).documents} for r in (0, 1)]
    assert not (ranks[0] | ranks[1]) & held
    # docs come in split order, so a larger num_documents extends the same list
    points = [split_point(d.id, c.eval.split_salt) for d in docs]
    assert points == sorted(points)


def test_fraction_zero_trains_on_everything_and_explicit_exclusion_wins():
    c = cfg("eval.heldout_fraction=0")
    assert heldout.heldout_ids(c) == set()
    assert len(build_corpus(c)) == len(Corpus(domains=["health"]))
    assert len(build_corpus(cfg(), exclude_ids=set())) == len(Corpus(domains=["health"]))


def test_split_of_a_local_file_without_ids_uses_the_corpus_fallback_ids(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"w{i} " * 60}) + "\n" for i in range(40)))
    c = cfg(f"corpus.source={src}", "eval.heldout_fraction=0.3")
    held = heldout.heldout_ids(c)
    all_ids = {d.id for d in Corpus(str(src)).documents}
    assert held and held < all_ids  # ids like "docs.jsonl:7", exactly as Corpus names them
    assert {d.id for d in build_corpus(c).documents} == all_ids - held


def test_problem_cache_key_tracks_what_shapes_problems_only(model_path):
    c = cfg()
    docs = heldout.heldout_documents(c)
    key = heldout.problems_key(c, model_path, docs)
    assert key == heldout.problems_key(cfg(), model_path, docs)
    # evaluated-side settings do not change the problems...
    for same in ("eval.samples=9", "eval.greedy=false", "eval.every_steps=3", "eval.max_new_tokens=7", "seed=5"):
        assert heldout.problems_key(cfg(same), model_path, docs) == key, same
    # ...everything that writes them does
    for other in ("eval.seed=1", "eval.rubric_answers=3", "rollout.rubric.max_new_tokens=99", "task=creative_writing"):
        assert heldout.problems_key(cfg(other), model_path, docs) != key, other
    assert heldout.problems_key(c, model_path, docs[:1]) != key
    assert heldout.problems_key(c, "HuggingFaceTB/SmolLM2-360M-Instruct", docs) != key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.heldout_fraction=1.0", "heldout_fraction"),
        ("eval.samples=-1", "eval.samples"),
        ("eval.temperature=0", "eval.temperature"),
        ("eval.confidence=1.0", "eval.confidence"),
        ("eval.bootstrap=10", "eval.bootstrap"),
        ("eval.rubric_max_new_tokens=0", "eval.rubric_max_new_tokens"),
        ("eval.every_steps=-2", "eval.every_steps"),
        ("eval.healthbench=/nonexistent/hb.jsonl", "is not a file"),
    ],
)
def test_bad_eval_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg(override)


def test_no_answer_mode_fails_at_load():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        cfg("eval.greedy=false", "eval.samples=0")


def summary(tmp: Path, label: str, key: str, rewards: dict[str, list[float | None]]) -> Path:
    """A hand-written evaluation folder: summary.json and heldout.jsonl."""
    tmp.mkdir(parents=True)
    rows = [
        {"doc_id": doc, "mode": "greedy", "sample": k, "reward": r}
        for doc, rs in rewards.items()
        for k, r in enumerate(rs)
    ]
    (tmp / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = {"label": label, "heldout": {"problems_key": key, "greedy": {}}}
    (tmp / "summary.json").write_text(json.dumps(s))
    return tmp


def test_compare_pairs_problems_by_document_and_refuses_other_problems(tmp_path):
    c = cfg("eval.bootstrap=200")
    a = summary(tmp_path / "a", "base", "k1", {"d1": [0.5], "d2": [0.2], "d3": [None]})
    b = summary(tmp_path / "b", "ckpt", "k1", {"d1": [1.0], "d2": [0.0], "d3": [0.7]})
    out = runner.compare(c, a, b)
    p = out["heldout"]["greedy"]
    assert (p["n"], p["wins"], p["losses"], p["ties"]) == (2, 1, 1, 0)  # d3: the baseline's judge failed
    assert p["diff"]["mean"] == pytest.approx((0.5 - 0.2) / 2)
    assert json.loads((b / "comparison.json").read_text()) == out
    other = summary(tmp_path / "c", "x", "k2", {"d1": [0.1]})
    with pytest.raises(runner.EvalError, match="other problems"):
        runner.compare(c, a, other)
    with pytest.raises(runner.EvalError, match="not an evaluation folder"):
        runner.compare(c, tmp_path, b)


def test_flat_metrics_names():
    est = {"mean": 0.5, "low": 0.25, "high": 0.75, "n": 2}
    s = {
        "heldout": {
            "num_problems": 2,
            "greedy": {"reward": est, "format_valid_rate": est, "length_tokens": est, "judge_failures": 1},
        },
        "healthbench": {"score": est, "judge_failures": 0, "unscorable": 1},
    }
    m = runner.flat_metrics(s)
    assert m["eval/greedy/reward"] == 0.5 and m["eval/greedy/reward_ci_low"] == 0.25
    assert m["eval/greedy/reward_ci_high"] == 0.75 and m["eval/greedy/judge_failures"] == 1
    assert m["eval/healthbench/score"] == 0.5 and m["eval/healthbench/unscorable"] == 1
    assert "eval/sampled/reward" not in m


def test_model_argument_accepts_run_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        ck = run / "checkpoints" / f"step_{step:06d}"
        (ck / "policy" / "model").mkdir(parents=True)
        (ck / "policy" / "model" / "config.json").write_text("{}")
        (ck / "state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text("step_000001\n")  # latest, not the highest number
    path, label, step = runner.resolve_model(str(run))
    assert path == str(run / "checkpoints" / "step_000001" / "policy" / "model") and step == 1 and label == str(run)
    path, _, step = runner.resolve_model(str(run / "checkpoints" / "step_000002"))
    assert path.endswith("step_000002/policy/model") and step == 2
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert runner.resolve_model(str(hf)) == (str(hf), str(hf), None)
