"""The online loop end to end with the real SmolLM2, as a user runs it (a real `pop-nemo` process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, run_cli
from tests.outputs_contract import METRIC_KEYS, TIMING_KEYS

pytestmark = pytest.mark.slow

# Weight decay makes every step move the weights, even when all groups are degenerate (a 135M
# judge often gives equal scores), so the weight comparison below can fail.
OVERRIDES = ["policy.weight_decay=0.1"]


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "--output-dir", str(out), *OVERRIDES, *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "checkpoints" / f"step_{step:06d}" / "policy" / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_path) -> Path:
    out = tmp_path_factory.mktemp("run") / "a"
    run_cli(*_train_args(out, "logging.tensorboard=true"))
    return out


@pytest.mark.image_tier  # the image-pins tier's one short real-model run (.ci/run)
def test_outputs_contract(uninterrupted: Path):
    metrics = _lines(uninterrupted / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(METRIC_KEYS) <= set(m), set(METRIC_KEYS) - set(m)
        # Guided roles always parse (their grammars fit in max_new_tokens).
        assert m["proposer_valid_rate"] == 1.0
        assert m["rubric_valid_rate"] == 1.0
        assert m["judge_valid_rate"] == 1.0
        assert 0.0 <= m["reward_mean"] <= 1.0
        assert 0.0 <= m["solver_format_valid_rate"] <= 1.0
    records = _lines(uninterrupted / "records.jsonl")
    assert len(records) == 2  # 1 document per step
    for r in records:
        assert r["problem"] and r["reference"] and r["document"] and r["doc_id"]
        assert 1 <= len(r["rubric"]) <= 2 and all(c["weight"] > 0 for c in r["rubric"])
        assert len(r["answers"]) == 2
        for a in r["answers"]:
            assert a["judge_valid"] is True
            assert {x["name"] for x in a["ratings"]} == {c["name"] for c in r["rubric"]}
            assert a["reward"] == pytest.approx(a["score"] / 2)
    latest = (uninterrupted / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000002"
    assert list((uninterrupted / "tb").iterdir()), "TensorBoard event file expected"
    assert (uninterrupted / "config.yaml").is_file()


def test_kill9_during_step2_then_resume_matches_uninterrupted(uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "pop_nemo.cli", *_train_args(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.2)
    time.sleep(2.0)  # well inside step 2's self-play
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert latest.read_text().strip() == "step_000001", "the kill must land during step 2"
    for name in ("metrics.jsonl", "records.jsonl"):  # never a truncated line
        text = (out / name).read_text(encoding="utf-8")
        assert text.endswith("\n")
        _lines(out / name)

    resumed = run_cli(*_train_args(out))
    assert "resumed from" in resumed.stderr

    assert _lines(out / "records.jsonl") == _lines(uninterrupted / "records.jsonl")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS and not k.startswith("time_")} for m in ms]  # noqa: E731
    assert strip(_lines(out / "metrics.jsonl")) == strip(_lines(uninterrupted / "metrics.jsonl"))
    wa, wb = _weights(uninterrupted, 2), _weights(out, 2)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    # and training did change the weights
    w0 = _weights(uninterrupted, 1)
    assert any(not torch.equal(w0[k], wa[k]) for k in wa)


def test_rerun_of_finished_run_is_a_noop(uninterrupted: Path):
    before = (uninterrupted / "records.jsonl").read_bytes()
    run_cli(*_train_args(uninterrupted))
    assert (uninterrupted / "records.jsonl").read_bytes() == before


def test_resume_refuses_a_different_config(uninterrupted: Path):
    proc = run_cli(*_train_args(uninterrupted, "algo.kl_coef=0.5"), check=False)
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "algo" in proc.stderr and "--fresh" in proc.stderr


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        ("empty", [], "is empty"),
        ("no_text_field", [], "corpus.text_field='text' is not a field"),
        ("not_utf8", [], "is not UTF-8"),
        (None, ["task=poetry"], "task='poetry' is unknown"),
        (None, ["model.path=./no/such/model"], "does not exist"),
        (None, ["rollout.n=1"], "rollout.n=1"),
        (None, ["corpus.source=./missing.jsonl"], "does not exist"),
        # Whole sentences: a message is one line in a log, not cut at the console's 80 columns.
        (None, ["--nproc", "2"], "but policy.backend='hf' trains in one process: add policy.backend=megatron"),
        pytest.param(
            None,
            ["policy.backend=megatron"],
            "none is visible; set policy.backend=hf to run on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run the Megatron policy"),
        ),
    ],
)
def test_bad_input_gives_one_clear_error_before_loading_a_model(tmp_path, setup, overrides, message):
    extra = list(overrides)
    if setup:
        f = tmp_path / ("corpus.txt" if setup == "not_utf8" else "corpus.jsonl")
        if setup == "empty":
            f.write_text("")
        elif setup == "no_text_field":
            f.write_text(json.dumps({"body": "word " * 80}) + "\n")
        else:
            f.write_bytes(b"caf\xe9 " * 80)
        extra.append(f"corpus.source={f}")
    proc = run_cli("train", "--config", str(TINY), "--output-dir", str(tmp_path / "run"), *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr  # failed before any model load
