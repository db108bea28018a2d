"""Data-parallel self-play end to end: ``pop-nemo train --nproc 2 policy.backend=megatron`` on CPU.

Each rank plays its share of a step's documents (whole groups) and rank 0 writes them all. The
tiny config with two documents per step, so each of two ranks plays one:

* ``single``: ``--nproc 1``, two steps: the single-process run of the same config;
* ``dp2``: ``--nproc 2`` (TP=PP=1, so DP=2), one step, then the same command to two steps,
  which resumes from the checkpoint;
* ``pp2``: ``--nproc 2`` with pipeline parallel 2 (DP=1: both pipeline stages are generation
  replicas), two steps.

The records must be identical to the single run's, the metrics equal (floats within summation
order), the weights after two steps equal within float tolerance, and each rank must have
generated its own share of the tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, run_cli
from tests.megatron.checks import assert_metrics_rows_match
from tests.megatron.launching import megatron_installed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not megatron_installed(), reason="megatron-core / megatron-bridge not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is for machines without CUDA"),
]

SITE = Path(__file__).resolve().parent / "site"
# seed 2: step 1 trains (one of its two groups is not degenerate: grad norm 2.39), so step 2 runs on
# moved weights (kl 0.029); with the tiny config's default seed both groups are degenerate.
COMMON = ["seed=2", "rollout.docs_per_step=2", "policy.lr=1e-4", "trainer.keep_checkpoints=1"]
# Gradients are all-reduced over DP ranks (another summation order than one process): floats
# agree to ~1e-6 relative; records and integer counts must be equal.
REL = 1e-4
VOLATILE = ("time_", "tokens_per_s", "train_tokens_per_s", "generated_tokens_rank_")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _train(out: Path, steps: int, nproc: int, *extra: str):
    env = {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "1000",
        "PYTHONPATH": os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p),
    }
    args = ["train", "--config", str(TINY), "--output-dir", str(out), "--nproc", str(nproc)]
    return run_cli(*args, "policy.backend=megatron", *COMMON, *extra, f"trainer.max_steps={steps}", env=env)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the step-2 checkpoint, whatever layout wrote it (dist-ckpt is layout-free)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = run.parent / f"{run.name}_weights.pt"
    dcp_to_torch_save(run / "checkpoints" / "step_000002" / "policy" / "dist", flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    return {
        k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "optimizer" not in k and "_extra" not in k
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_dp")
    res: dict = {name: base / name for name in ("single", "dp2", "pp2")}
    _train(res["single"], 2, 1)
    res["dp2_first"] = _train(res["dp2"], 1, 2)
    res["dp2_records_1"] = (res["dp2"] / "records.jsonl").read_text()
    res["dp2_second"] = _train(res["dp2"], 2, 2)
    _train(res["pp2"], 2, 2, "megatron.pipeline_model_parallel_size=2")
    res["weights"] = {name: _weights(res[name]) for name in ("single", "dp2", "pp2")}
    yield res
    for name in ("single", "dp2", "pp2"):
        for run in (res[name], res[name] / "ranks" / "rank_1"):
            shutil.rmtree(run / "checkpoints", ignore_errors=True)


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_records_are_the_single_process_runs(runs, layout):
    single = _lines(runs["single"] / "records.jsonl")
    assert [(r["step"], r["group_id"]) for r in single] == [(1, 0), (1, 1), (2, 2), (2, 3)]
    assert _lines(runs[layout] / "records.jsonl") == single


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_metrics_are_the_single_process_runs(runs, layout):
    single, got = _lines(runs["single"] / "metrics.jsonl"), _lines(runs[layout] / "metrics.jsonl")
    assert single[0]["grad_norm"] > 0 and single[1]["kl"] > 0, (
        "the steps must train for the comparison to mean anything"
    )
    assert len(got) == len(single) == 2
    for g, s in zip(got, single):
        assert_metrics_rows_match(g, s, REL, volatile=VOLATILE)


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_each_rank_generated_its_share(runs, layout):
    for row in _lines(runs[layout] / "metrics.jsonl"):
        per_rank = [row["generated_tokens_rank_0"], row["generated_tokens_rank_1"]]
        assert all(t > 0 for t in per_rank), per_rank  # one document each: both ranks generated
        assert sum(per_rank) == row["generated_tokens"]
    assert "generated_tokens_rank_0" not in _lines(runs["single"] / "metrics.jsonl")[0]


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_weights_after_two_steps_match(runs, layout):
    want, got = runs["weights"]["single"], runs["weights"][layout]
    assert want.keys() == got.keys() and len(want) > 0
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert math.isfinite(worst) and worst <= 1e-5, worst


def test_the_second_run_resumed_and_added_step_2_only(runs):
    assert "resumed from" in runs["dp2_second"].stderr and "(step 1)" in runs["dp2_second"].stderr
    records = (runs["dp2"] / "records.jsonl").read_text()
    assert records.startswith(runs["dp2_records_1"]) and len(records.splitlines()) == 4
