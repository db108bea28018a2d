"""Megatron policy == HF policy on CPU (torchrun, 2 ranks, gloo): logprobs, one train step,
a 3-step trajectory, for TP=2, PP=2 and DP=2; TP=2 == TP=1."""

from __future__ import annotations

import pytest

from tests.megatron import checks

LAYOUTS = ["tp2", "pp2", "dp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_what_it_says(cpu_results, layout):
    assert cpu_results["world_size"] == 2
    assert cpu_results[layout]["dp_size"] == (2 if layout == "dp2" else 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_match_hf_tiny_qwen2(cpu_results, layout):
    checks.assert_logprobs(cpu_results[layout])


@pytest.mark.parametrize("layout", ["pp2", "dp2"])  # no TP=2: SmolLM2-135M's 9 heads do not split in two
def test_logprobs_match_hf_smollm2(cpu_results, layout):
    r = cpu_results[layout]
    assert r["smol_tokens"] > 20
    assert r["smol_logprobs_max_abs_diff"] <= checks.LOGPROB_TOL_SMOL


def test_smollm2_is_not_split_over_tp2(cpu_results):
    """The worker refuses the split that cannot exist, and says why, instead of a wrong one."""
    assert cpu_results["tp2"]["smol_skipped"] == "9 attention heads do not split over TP=2"
    assert "smol_tokens" not in cpu_results["tp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_train_step_matches_hf(cpu_results, layout):
    first = cpu_results[layout]["trajectory"][0]
    hf = cpu_results["hf_trajectory"][0]
    assert hf["grad_norm"] > 1.0, "the recipe must exercise gradient clipping (max_grad_norm=1)"
    checks.assert_steps_close([first], [hf])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_three_step_trajectory_matches_hf(cpu_results, layout):
    traj = cpu_results[layout]["trajectory"]
    assert traj[1]["kl"] > 0 and traj[2]["loss"] != traj[0]["loss"], "weights did not move"
    checks.assert_steps_close(traj, cpu_results["hf_trajectory"])


def test_tp2_trajectory_equals_tp1(cpu_results):
    assert cpu_results["tp1_world_size"] == 1
    checks.assert_steps_close(cpu_results["tp2"]["trajectory"], cpu_results["tp1"]["trajectory"])
    checks.assert_logprobs(cpu_results["tp1"])
