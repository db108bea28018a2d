"""``pop-nemo dpo policy.backend=megatron --nproc 2`` end to end on CPU, as a user runs it.

Two ranks under torchrun (gloo): data parallel 2, against the HF backend in one process on the
same pairs, model and settings. ``dpo.batch_size=3`` pairs are 6 rows: an even split gives each
rank 3 rows, which would cut a chosen row from its rejected one (measured: loss and margins then
go wrong from step 1). The pair split keeps pairs whole: 2 pairs on rank 0, 1 and a padding pair
on rank 1.

* run 1: ``dpo.max_steps=1`` stops after a checkpoint; run 2, the same command without it,
  resumes and finishes: the held-out evaluation and the HF export.
* HF: the whole run, uninterrupted. Every step's metrics, the held-out metrics and the exported
  weights must match it.

The model is the tiny Llama with SmolLM2's tokenizer (tests/conftest.py): what is tested is the
launch, the pairing across ranks, the schedule and the resume, which a 135M model would only
make slower.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.megatron.checks import assert_metrics_rows_match
from tests.megatron.launching import megatron_installed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not megatron_installed(), reason="megatron-core / megatron-bridge not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is for machines without CUDA"),
]

SITE = Path(__file__).resolve().parent / "site"
CONFIG = "conf/offline/dpo_smoke_cpu.yaml"
# 12 pairs: 3 held out, 9 trained in 3 steps of 3 pairs; lr 1e-3 so that a random tiny model moves.
COMMON = [
    "dpo.batch_size=3",
    "dpo.micro_batch_size=1",
    "dpo.lr=1e-3",
    "dpo.eval_fraction=0.2",
    "dpo.save_every=1",
    "logging.tensorboard=false",
]
# Both fp32. Step 1's logprobs agree to the last bit; later steps differ by the order of
# floating-point sums (DP all-reduce vs one batch): measured at most 1.9e-5 relative for the
# rewards (β·Δlogp, about 6e-3 here) and 1e-7 for losses, grad norms and logprobs.
REL, ABS = 1e-4, 1e-7
VOLATILE = ("time_", "train_tokens_per_s")


def _dpo(model: str, pairs: Path, out: Path, *extra: str, env: dict | None = None):
    args = ["dpo", "--config", CONFIG, "--pairs", str(pairs), "--output-dir", str(out), *extra]
    return run_cli(
        *args,
        f"model.path={model}",
        *COMMON,
        env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "1000", **(env or {})},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, dpo_pairs):
    base = tmp_path_factory.mktemp("megatron_dpo")
    hf, mg = base / "hf", base / "megatron"
    shim = {"PYTHONPATH": os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)}
    megatron = ["--nproc", "2", "policy.backend=megatron"]
    res: dict = {"hf": hf, "mg": mg, "initial": tiny_llama}
    _dpo(tiny_llama, dpo_pairs, hf)
    res["first"] = _dpo(tiny_llama, dpo_pairs, mg, *megatron, "dpo.max_steps=1", env=shim)
    res["metrics_1"] = (mg / "metrics.jsonl").read_text()
    res["state_1"] = json.loads((mg / "checkpoints" / "step_000001" / "policy" / "policy_state.json").read_text())
    res["second"] = _dpo(tiny_llama, dpo_pairs, mg, *megatron, env=shim)
    return res


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_first_run_stops_after_one_step_with_a_megatron_checkpoint(runs):
    assert [r["step"] for r in map(json.loads, runs["metrics_1"].splitlines())] == [1]
    state = runs["state_1"]
    assert state["format"] == "megatron-dist-ckpt" and state["steps_done"] == 1
    assert "stopped after step 1 of 3" in runs["first"].stdout + runs["first"].stderr


def test_rerun_resumes_and_every_step_matches_the_hf_policy(runs):
    log = runs["second"].stdout + runs["second"].stderr
    assert "resumed from" in log and "(step 1)" in log
    metrics = (runs["mg"] / "metrics.jsonl").read_text()
    assert metrics.startswith(runs["metrics_1"])  # step 1's row kept, not written twice
    mg, hf = _lines(runs["mg"] / "metrics.jsonl"), _lines(runs["hf"] / "metrics.jsonl")
    assert [r["step"] for r in mg] == [r["step"] for r in hf] == [1, 2, 3, 3]  # 3 steps, then held-out
    assert hf[0]["loss"] == pytest.approx(math.log(2)) and hf[2]["reward_margin"] > 1e-3  # it trains
    for a, b in zip(mg, hf):
        assert_metrics_rows_match(a, b, REL, ABS, VOLATILE)


def test_held_out_metrics_and_exported_weights_match_the_hf_policy(runs):
    from safetensors.torch import load_file

    mg, hf = (json.loads((runs[k] / "eval.json").read_text()) for k in ("mg", "hf"))
    assert mg["eval_pairs"] == hf["eval_pairs"] == 3
    for k in ("eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_logps_chosen"):
        assert math.isclose(mg[k], hf[k], rel_tol=REL, abs_tol=ABS), k
    a = load_file(runs["mg"] / "final_model" / "model.safetensors")
    b = load_file(runs["hf"] / "final_model" / "model.safetensors")
    assert sorted(a) == sorted(b)
    initial = load_file(Path(runs["initial"]) / "model.safetensors")
    assert max(float((b[k] - initial[k]).abs().max()) for k in b) > 1e-4  # training moved the weights
    for k in b:
        assert torch.allclose(a[k], b[k], atol=5e-6), k


def test_console_shows_rank_0_only(runs):
    for proc, steps in ((runs["first"], [1]), (runs["second"], [2, 3])):
        log = proc.stdout + proc.stderr
        for step in steps:
            assert log.count(f"step {step:>4}/3 |") == 1, "one line per step, not one per rank"
        assert "Import of FP8GlobalStateManager" not in log  # megatron-bridge's INFO probes stay quiet
