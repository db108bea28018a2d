"""Group-relative advantages (DESIGN §2) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pop_nemo.rl.advantages import compute_advantages

S3 = math.sqrt(1 / 3)  # unbiased std of [0, 0, 1]


def adv(rewards, groups, valid=None, **kw):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    valid = torch.ones(len(rewards), dtype=torch.bool) if valid is None else torch.tensor(valid)
    return compute_advantages(rewards, groups, valid, **kw)


def test_grpo_with_unbiased_std():
    # group 0: [0, 0, 1]: mean 1/3, unbiased std sqrt(1/3); group 1: [0, 1]: mean 1/2, std sqrt(1/2)
    got = adv([0.0, 0.0, 1.0, 0.0, 1.0], [0, 0, 0, 1, 1], eps=0.0)
    want = [-1 / 3 / S3, -1 / 3 / S3, 2 / 3 / S3, -0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)]
    assert got.values.tolist() == pytest.approx(want, abs=1e-6)
    assert got.values.dtype == torch.float32
    assert (got.num_groups, got.num_degenerate, got.degenerate_rate) == (2, 0, 0.0)


def test_grpo_eps_is_added_to_std():
    got = adv([1.0, 0.0, 0.5, 0.5], [0, 0, 0, 0], eps=0.1)
    s = math.sqrt(0.5 / 3)  # deviations ±0.5, 0, 0 -> unbiased var 0.5/3
    assert got.values.tolist() == pytest.approx([0.5 / (s + 0.1), -0.5 / (s + 0.1), 0.0, 0.0], abs=1e-6)


def test_grpo_without_std_is_dr_grpo():
    got = adv([0.0, 0.0, 1.0, 0.25, 0.75], [0, 0, 0, 1, 1], normalize_std=False)
    assert got.values.tolist() == pytest.approx([-1 / 3, -1 / 3, 2 / 3, -0.25, 0.25], abs=1e-6)


def test_rloo_leave_one_out():
    # [1, 0.5, 0]: 1 - (0.5+0)/2, 0.5 - (1+0)/2, 0 - (1+0.5)/2 ; [0, 0, 1, 1]: 0 - 2/3, 1 - 1/3
    got = adv([1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1, 1], method="rloo")
    assert got.values.tolist() == pytest.approx([0.75, 0.0, -0.75, -2 / 3, -2 / 3, 2 / 3, 2 / 3], abs=1e-6)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_masked_sample_gets_zero_and_is_out_of_the_baseline(method):
    # valid rewards of the group are [1, 0, 0]; the masked 0.5 must not move the baseline
    got = adv([1.0, 0.0, 0.5, 0.0], [0, 0, 0, 0], valid=[True, True, False, True], method=method, eps=0.0)
    if method == "grpo":
        want = [2 / 3 / S3, -1 / 3 / S3, 0.0, -1 / 3 / S3]
    else:
        want = [1.0, -0.5, 0.0, -0.5]
    assert got.values.tolist() == pytest.approx(want, abs=1e-6)
    assert got.num_degenerate == 0


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_degenerate_groups_are_zero_and_counted(method):
    rewards = [
        *[0.7, 0.7, 0.7],  # group 0: std 0
        *[1.0, 0.0],  # group 1: one valid sample left
        *[0.5, 0.5005],  # group 2: std 3.5e-4 < 1e-3
        *[0.5, 0.502],  # group 3: std 1.41e-3 >= 1e-3, not degenerate
        *[0.2, 0.9],  # group 4: every sample masked
    ]
    groups = [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    valid = [True] * 3 + [True, False] + [True] * 4 + [False, False]
    got = adv(rewards, groups, valid=valid, method=method)
    assert got.values[:7].tolist() == [0.0] * 7
    assert got.values[9:].tolist() == [0.0, 0.0]
    assert got.values[7].item() < 0 < got.values[8].item()
    if method == "rloo":
        assert got.values[7:9].tolist() == pytest.approx([-0.002, 0.002], abs=1e-6)
    else:
        x = 0.001 / (0.002 / math.sqrt(2) + 1e-6)  # deviation / (unbiased std + eps), about 0.7066
        assert got.values[7:9].tolist() == pytest.approx([-x, x], rel=1e-3)
    assert (got.num_groups, got.num_degenerate) == (5, 4)
    assert got.degenerate_rate == pytest.approx(4 / 5)


def test_degenerate_std_threshold_is_configurable():
    got = adv([0.0, 0.1], [0, 0], degenerate_std=0.1)  # std 0.0707 < 0.1
    assert got.values.tolist() == [0.0, 0.0] and got.num_degenerate == 1


def test_non_contiguous_group_ids():
    # groups are identified by id, not by position: 7 -> [0, 1, 0.5], 3 -> [1, 0]
    got = adv([0.0, 1.0, 1.0, 0.0, 0.5], [7, 3, 7, 3, 7], normalize_std=False)
    assert got.values.tolist() == pytest.approx([-0.5, 0.5, 0.5, -0.5, 0.0], abs=1e-6)
    got_t = adv([0.0, 1.0, 1.0, 0.0, 0.5], torch.tensor([7, 3, 7, 3, 7]), normalize_std=False)
    assert torch.equal(got.values, got_t.values)
    assert got.num_groups == 2


def test_identical_rewards_in_other_groups_do_not_mix():
    # the same rewards split into two groups give different advantages than one big group
    one = adv([0.0, 1.0, 0.0, 1.0], [0, 0, 0, 0], method="rloo")
    two = adv([0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1], method="rloo")
    assert one.values.tolist() == pytest.approx([-2 / 3, 2 / 3, -2 / 3, 2 / 3])
    assert two.values.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    ("rewards", "groups", "valid"),
    [
        (torch.zeros(3), [0, 0], torch.ones(3, dtype=torch.bool)),
        (torch.zeros(3), [0, 0, 0], torch.ones(2, dtype=torch.bool)),
        (torch.zeros(2, 2), [[0, 0], [1, 1]], torch.ones(2, 2, dtype=torch.bool)),
    ],
)
def test_mismatched_shapes_raise(rewards, groups, valid):
    with pytest.raises(ValueError, match="same length"):
        compute_advantages(rewards, groups, valid)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown advantage method 'ppo'"):
        adv([0.0, 1.0], [0, 0], method="ppo")
