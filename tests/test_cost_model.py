"""bench/cost_model.py (docs/SCALING.md): its pure functions, with values worked out by hand."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.append(str(ROOT / "bench"))  # last: its module name shadows nothing installed
import cost_model as cm  # noqa: E402

W = cm.Workload()  # 8 docs × N=8
M7 = cm.MODELS["7b"]


def test_tokens_per_role_with_judge_tokens_apart_from_policy_tokens():
    t = cm.generated_tokens(W)
    assert (t.proposer, t.solver, t.rubric, t.judge) == (8 * 1.2 * 300, 64 * 512, 8 * 600, 64 * 350)
    assert t.policy == 32768 and t.judge_side == 4800 + 22400
    p = cm.prompt_tokens(W)
    assert p.rubric == 8 * (1700 + 8 * 512) and p.judge == 64 * 1500


def test_training_flops_and_refit_bytes():
    assert cm.train_tokens(W) == 64 * (250 + 512) == 48768
    assert cm.train_flops(M7, W) == pytest.approx(6 * 7.61e9 * 48768)
    assert cm.refit_bytes(M7) == 2 * 7.61e9
    c = cm.step_cost(M7, W, cm.Hardware(), gpus=8, critic_gpus=1, split=True)
    assert c.refit_s == pytest.approx(15.22e9 / 100e9)


def test_decode_is_the_larger_of_throughput_and_latency():
    hw = cm.Hardware()
    one_gpu = cm.decode_seconds(M7, hw, 32768, 64, 512, 1)
    assert one_gpu == pytest.approx(32768 / (15220 * 0.6))  # throughput-bound on one GPU
    eight = cm.decode_seconds(M7, hw, 32768, 64, 512, 8)
    assert eight == pytest.approx(512 * 15.22e9 / 3.35e12)  # latency-bound: 512 steps reading 15.2 GB
    assert cm.decode_seconds(M7, hw, 0, 0, 512, 8) == 0.0


def test_split_self_play_is_never_slower_and_gpu_hours_follow_the_step_time():
    big = cm.Workload(docs=64, n=16)
    for key, m in cm.MODELS.items():
        tp, ctp = cm.TP[key]
        hw = cm.Hardware(rollout_tp=tp, critic_tp=ctp)
        today = cm.step_cost(m, big, hw, gpus=32, critic_gpus=4, split=False)
        split = cm.step_cost(m, big, hw, gpus=32, critic_gpus=4, split=True)
        assert split.generate_s < today.generate_s
        assert (split.critic_s, split.train_s, split.refit_s) == (today.critic_s, today.train_s, today.refit_s)
        assert split.gpu_hours_per_1000_docs == pytest.approx(split.step_s * 36 * (1000 / 64) / 3600)
        assert today.step_s == pytest.approx(today.generate_s + today.critic_s + today.train_s + today.refit_s)


def test_cited_constants():
    assert cm.nemo_rl_step_s(W, 8) == pytest.approx(48768 / (1581 * 8))
    assert cm.PAPER_A100_HOURS_PER_1000_DOCS == pytest.approx(4.8828125)


def test_the_script_prints_all_three_sizes_in_both_layouts(capsys):
    cm.main(["--gpus", "16", "--critic-gpus", "2"])
    out = capsys.readouterr().out
    for name in ("Qwen2.5-7B", "Qwen2.5-32B", "Qwen2.5-72B"):
        assert out.count(f"| {name} |") == 2
    assert "repeated (every rank, before the split)" in out and "split (data-parallel self-play)" in out
