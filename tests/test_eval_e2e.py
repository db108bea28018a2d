"""`pop-nemo eval` end to end with SmolLM2 on CPU, against a real 2-step training run.

One training run (``eval.every_steps=2``: the loop evaluates its policy at step 2) is shared by
this module and tests/test_report.py through ``ensure_run`` (trained once per session).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.conftest import run_cli as _run_cli


def run_cli(*args, **kw):
    """``pop-nemo`` as a process, with a console wide enough that messages are never wrapped."""
    return _run_cli(*args, env={"COLUMNS": "1000"}, **kw)


pytestmark = pytest.mark.slow

# Small enough for a shared 2-core machine; large enough that every part runs for real.
EVAL_CONF = """\
defaults: [{tiny}]
corpus: {{max_words: 160}}
trainer: {{num_threads: 1}}  # on a shared 2-core machine, 2 spinning OpenMP threads run ~10x slower
eval:
  every_steps: 2
  num_documents: 2
  rubric_answers: 2
  greedy: true
  samples: 1
  max_new_tokens: 40
  bootstrap: 300
  cache_dir: {cache}
  healthbench: example
  healthbench_limit: 2
  healthbench_max_new_tokens: 32
  grader_max_new_tokens: 48
  grader_explanation_chars: 20
"""


@dataclass(frozen=True)
class Run:
    dir: Path
    config: Path  # the training config (its eval cache: train_cache)
    train_cache: Path
    root: Path


def write_conf(path: Path, cache: Path) -> Path:
    path.write_text(EVAL_CONF.format(tiny=TINY, cache=cache))
    return path


def ensure_run(tmp_path_factory) -> Run:
    """Train 2 steps once per test session (a marker file records a finished run)."""
    root = tmp_path_factory.getbasetemp() / "pop_eval_shared"
    run = Run(root / "run", root / "train.yaml", root / "train_cache", root)
    if not (root / "done").is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_conf(run.config, run.train_cache)
        run_cli("train", "--config", str(run.config), "--output-dir", str(run.dir), "--fresh", timeout=1500)
        (root / "done").write_text("ok")
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    return ensure_run(tmp_path_factory)


@dataclass(frozen=True)
class Evals:
    config: Path  # same settings as training, but a fresh cache
    cache: Path
    base: Path
    ckpt: Path
    base_log: str
    ckpt_log: str


def eval_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--config", str(config), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def evals(trained, tmp_path_factory) -> Evals:
    tmp = tmp_path_factory.mktemp("evals")
    config = write_conf(tmp / "eval.yaml", tmp / "cache")
    base = run_cli(*eval_cmd(config, tmp / "base", "--model", "smollm2"), timeout=1200)
    ckpt_dir = trained.dir / "checkpoints" / "step_000002"
    ckpt = run_cli(*eval_cmd(config, tmp / "ckpt", "--model", str(ckpt_dir), "--compare", str(tmp / "base")))
    return Evals(
        config, tmp / "cache", tmp / "base", tmp / "ckpt", base.stderr + base.stdout, ckpt.stderr + ckpt.stdout
    )


def load(path: Path):
    return json.loads(path.read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_online_loop_evaluates_every_k_steps_into_the_metrics_stream(trained):
    metrics = rows(trained.dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert not any(k.startswith("eval/") for k in metrics[0])  # every_steps=2: not at step 1
    m = metrics[1]
    summary = load(trained.dir / "eval" / "step_000002" / "summary.json")
    assert summary["step"] == 2
    for mode in ("greedy", "sampled"):
        r = summary["heldout"][mode]["reward"]
        assert m[f"eval/{mode}/reward"] == r["mean"]
        assert m[f"eval/{mode}/reward_ci_low"] == r["low"] and m[f"eval/{mode}/reward_ci_high"] == r["high"]
        assert m[f"eval/{mode}/format_valid_rate"] == summary["heldout"][mode]["format_valid_rate"]["mean"]
    assert m["eval/healthbench/score"] == summary["healthbench"]["score"]["mean"]
    assert m["eval/num_problems"] == summary["heldout"]["num_problems"] >= 1
    assert m["eval/time_s"] > 0
    # the held-out documents were never trained on
    held = {r["doc_id"] for r in rows(trained.dir / "eval" / "step_000002" / "problems.jsonl")}
    trained_on = {r["doc_id"] for r in rows(trained.dir / "records.jsonl")}
    assert held and not held & trained_on


def test_eval_reports_reward_validity_and_length_with_confidence_intervals(evals):
    s = load(evals.base / "summary.json")
    h = s["heldout"]
    assert h["num_documents"] == 2 and 1 <= h["num_problems"] <= 2
    answers = rows(evals.base / "heldout.jsonl")
    problems = [r for r in rows(evals.base / "problems.jsonl") if r["valid"]]
    assert len(problems) == h["num_problems"]
    for mode, per_problem in (("greedy", 1), ("sampled", 1)):
        m = h[mode]
        assert m["num_answers"] == per_problem * h["num_problems"]
        mine = [a for a in answers if a["mode"] == mode]
        for name in ("reward", "format_valid_rate", "length_tokens", "length_words"):
            e = m[name]
            assert e["low"] <= e["mean"] <= e["high"], (mode, name, e)
        assert m["length_tokens"]["mean"] == pytest.approx(sum(a["num_tokens"] for a in mine) / len(mine))
        scored = [a["reward"] for a in mine if a["reward"] is not None]
        assert m["judge_failures"] == sum(a["judge_valid"] is False for a in mine)
        if scored:
            assert 0.0 <= m["reward"]["mean"] <= 1.0
        for a in mine:
            if a["judge_valid"]:  # the shared rubric scoring: reward = weighted score / 2
                assert a["reward"] == pytest.approx(a["score"] / 2)
    greedy = [a for a in answers if a["mode"] == "greedy"]
    assert all(a["sample"] == 0 for a in greedy)
    b = s["healthbench"]
    assert b["num_conversations"] == 2 and b["items_judged"] == 8
    hb_rows = rows(evals.base / "healthbench.jsonl")
    assert [r["prompt_id"] for r in hb_rows] == ["hb-example-001", "hb-example-002"]
    for r in hb_rows:
        assert len(r["items"]) == 4
        if r["score"] is not None:
            met = sum(i["points"] for i in r["items"] if i["met"])
            assert r["score"] == pytest.approx(min(max(met / r["possible"], 0.0), 1.0))


def test_base_and_checkpoint_are_paired_on_the_same_cached_problems(trained, evals):
    # the problems and rubrics were written once (by this eval of the base) and reused
    assert "writing 2 with the reference model" in evals.base_log
    assert "cached in" in evals.ckpt_log and "writing" not in evals.ckpt_log
    assert (evals.base / "problems.jsonl").read_bytes() == (evals.ckpt / "problems.jsonl").read_bytes()
    # ...and the training run's in-loop eval (another process, another cache) wrote identical ones
    in_loop = trained.dir / "eval" / "step_000002" / "problems.jsonl"
    assert in_loop.read_bytes() == (evals.base / "problems.jsonl").read_bytes()

    sa, sb = load(evals.base / "summary.json"), load(evals.ckpt / "summary.json")
    assert sa["heldout"]["problems_key"] == sb["heldout"]["problems_key"]
    assert sb["step"] == 2 and sb["label"].endswith("step_000002")
    c = load(evals.ckpt / "comparison.json")
    assert c["baseline"] == "smollm2" and c["model"] == sb["label"]
    for mode in ("greedy", "sampled"):
        p = c["heldout"][mode]
        assert p["n"] >= 1 and p["wins"] + p["losses"] + p["ties"] == p["n"]
        assert p["diff"]["low"] <= p["diff"]["mean"] <= p["diff"]["high"]
        assert 0.0 <= p["win_rate"]["low"] <= p["win_rate"]["mean"] <= p["win_rate"]["high"] <= 1.0
        if p["mean_a"] is not None:
            assert p["mean_b"] - p["mean_a"] == pytest.approx(p["diff"]["mean"])
    hb = c["healthbench"]
    both = [
        a["prompt_id"]
        for a, b in zip(rows(evals.base / "healthbench.jsonl"), rows(evals.ckpt / "healthbench.jsonl"))
        if a["score"] is not None and b["score"] is not None
    ]
    assert hb["n"] == len(both) and hb["wins"] + hb["losses"] + hb["ties"] == hb["n"]
    assert "paired:" in evals.ckpt_log and "win rate" in evals.ckpt_log


def test_in_loop_eval_equals_the_cli_eval_of_the_saved_checkpoint(trained, evals):
    loop = load(trained.dir / "eval" / "step_000002" / "summary.json")
    cli = load(evals.ckpt / "summary.json")
    assert loop["heldout"] == cli["heldout"]
    assert loop["healthbench"] == cli["healthbench"]


def test_the_same_eval_command_twice_gives_identical_numbers(evals, tmp_path):
    again = tmp_path / "again"
    run_cli(*eval_cmd(evals.config, again, "--model", "smollm2"))
    assert load(again / "summary.json") == {**load(evals.base / "summary.json")}
    for name in ("heldout.jsonl", "healthbench.jsonl", "problems.jsonl"):
        assert (again / name).read_bytes() == (evals.base / name).read_bytes(), name


def test_user_errors_fail_before_any_model_loads(evals, tmp_path):
    bad = run_cli(*eval_cmd(evals.config, tmp_path / "x", "--compare", str(tmp_path)), check=False, timeout=120)
    assert bad.returncode == 2 and "not an evaluation folder" in bad.stderr
    bad = run_cli(*eval_cmd(evals.config, tmp_path / "x", "--model", str(tmp_path / "nope")), check=False, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    hb = tmp_path / "hb.jsonl"
    hb.write_text('{"prompt_id": "a", "prompt": [], "rubrics": []}\n')
    bad = run_cli(*eval_cmd(evals.config, tmp_path / "x", "--healthbench", str(hb)), check=False, timeout=120)
    assert bad.returncode == 2 and "hb.jsonl:1" in bad.stderr
    assert not (tmp_path / "x" / "summary.json").exists()
