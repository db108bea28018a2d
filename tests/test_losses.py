"""Clipped policy-gradient loss, k3 KL and KL reward shaping against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pop_nemo.rl.losses import LossConfig, aggregate, k3_kl, kl_shaped_rewards, normalizer, policy_loss

F64 = torch.float64
LN = math.log

# Two sequences of three tokens; row 0 has advantage +1, row 1 has -1.
# ratios pi/old: row 0 [1.5, 0.5, 1.1], row 1 [1.5, 0.5, 0.9]
RATIO = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 0.9]], dtype=F64)
ADV = torch.tensor([1.0, -1.0], dtype=F64)
MASK = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)  # row 0, token 0 is prompt
# With eps 0.2, per token -min(rA, clip(r)A):
#   A=+1: 1.5 -> -1.2 (clipped), 0.5 -> -0.5 (not clipped: min picks the lower), 1.1 -> -1.1
#   A=-1: 1.5 -> +1.5 (not clipped), 0.5 -> +0.8 (clipped), 0.9 -> +0.9
PG = [[-1.2, -0.5, -1.1], [1.5, 0.8, 0.9]]
# d = ref - pi per token; k3 = e^d - d - 1
D = torch.tensor([[0.0, LN(2), -LN(2)], [0.0, 0.0, 1.0]], dtype=F64)
K3 = [[0.0, 1 - LN(2), LN(2) - 0.5], [0.0, 0.0, math.e - 2]]


def close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=F64), rtol=0, atol=1e-12)


def tensors(requires_grad: bool = False):
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.3, -3.0]], dtype=F64, requires_grad=requires_grad)
    old = logprobs.detach() - torch.log(RATIO)
    ref = logprobs.detach() + D
    return logprobs, old, ref


def test_k3_kl_values():
    lp, _, ref = tensors()
    close(k3_kl(lp, ref), K3)
    # k3 >= 0 and zero only when the policies agree
    x = torch.tensor([0.0, 0.3, -0.3], dtype=F64)
    assert k3_kl(x, x).tolist() == [0.0, 0.0, 0.0]


def test_token_mean_no_kl():
    lp, old, _ = tensors()
    loss, m = policy_loss(lp, old, ADV, MASK, LossConfig(clip_eps=0.2, kl_coef=0.0, kl_mode="none"))
    want = (-0.5 - 1.1 + 1.5 + 0.8 + 0.9) / 5  # 5 completion tokens
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["pg_loss"] == pytest.approx(want, abs=1e-12)
    assert m["kl"] == 0.0
    # |r - 1| > 0.2 on completion tokens: row 0 [0.5], row 1 [1.5, 0.5] -> 3 of 5
    assert m["clip_frac"] == pytest.approx(3 / 5)


def test_seq_mean_no_kl():
    lp, old, _ = tensors()
    cfg = LossConfig(clip_eps=0.2, kl_mode="none", aggregation="seq_mean")
    loss, _ = policy_loss(lp, old, ADV, MASK, cfg)
    want = ((-0.5 - 1.1) / 2 + (1.5 + 0.8 + 0.9) / 3) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12)


def test_k3_loss_term():
    lp, old, ref = tensors()
    cfg = LossConfig(clip_eps=0.2, kl_coef=0.1, kl_mode="k3_loss")
    loss, m = policy_loss(lp, old, ADV, MASK, cfg, ref_logprobs=ref)
    kl = (K3[0][1] + K3[0][2] + K3[1][0] + K3[1][1] + K3[1][2]) / 5
    pg = (-0.5 - 1.1 + 1.5 + 0.8 + 0.9) / 5
    assert m["kl"] == pytest.approx(kl, abs=1e-12)
    assert m["pg_loss"] == pytest.approx(pg, abs=1e-12)
    assert loss.item() == pytest.approx(pg + 0.1 * kl, abs=1e-12)


@pytest.mark.parametrize("mode", ["reward_shaping", "none"])
def test_kl_is_reported_but_not_in_the_loss_outside_k3_mode(mode):
    lp, old, ref = tensors()
    loss, m = policy_loss(lp, old, ADV, MASK, LossConfig(kl_coef=0.1, kl_mode=mode), ref_logprobs=ref)
    assert loss.item() == pytest.approx((-0.5 - 1.1 + 1.5 + 0.8 + 0.9) / 5, abs=1e-12)
    assert m["kl"] == pytest.approx((K3[0][1] + K3[0][2] + K3[1][2]) / 5, abs=1e-12)


def test_per_token_values_through_a_one_token_mask():
    """Each token's clipped surrogate, isolated by a one-hot mask."""
    lp, old, _ = tensors()
    cfg = LossConfig(clip_eps=0.2, kl_mode="none")
    for b in range(2):
        for t in range(3):
            mask = torch.zeros(2, 3, dtype=F64)
            mask[b, t] = 1
            loss, _ = policy_loss(lp, old, ADV, mask, cfg)
            assert loss.item() == pytest.approx(PG[b][t], abs=1e-12), (b, t)


def test_gradient_is_zero_exactly_where_clipping_binds():
    lp, old, ref = tensors(requires_grad=True)
    loss, _ = policy_loss(lp, old, ADV, MASK, LossConfig(clip_eps=0.2, kl_mode="none"))
    loss.backward()
    # d/dlp of -rA is -rA where the unclipped term is chosen, 0 where the clipped one is; / 5 tokens
    want = [[0.0, -0.5 / 5, -1.1 / 5], [1.5 / 5, 0.0, 0.9 / 5]]
    close(lp.grad, want)

    lp.grad = None
    loss, _ = policy_loss(lp, old, ADV, MASK, LossConfig(clip_eps=0.2, kl_coef=0.1), ref_logprobs=ref)
    loss.backward()
    # plus kl_coef * d k3 / d lp = kl_coef * (1 - e^d) on completion tokens
    close(lp.grad, torch.tensor(want, dtype=F64) + 0.1 * (1 - torch.exp(D)) * MASK / 5)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batch_losses_sum_to_the_full_batch_loss(aggregation):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 5, generator=g, dtype=F64) * 3
    old = lp - (torch.rand(6, 5, generator=g, dtype=F64) - 0.5)
    ref = lp + (torch.rand(6, 5, generator=g, dtype=F64) - 0.5)
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0, 0.0, 0.7], dtype=F64)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0]],
        dtype=F64,
    )
    cfg = LossConfig(aggregation=aggregation, kl_coef=0.05)
    norm = normalizer(mask, aggregation)
    assert norm == (13.0 if aggregation == "token_mean" else 5.0)  # row 4 has no completion tokens
    full, full_m = policy_loss(lp, old, adv, mask, cfg, ref_logprobs=ref)
    parts = [
        policy_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], cfg, ref[i : i + 2], norm=norm)
        for i in range(0, 6, 2)
    ]
    assert sum(p[0].item() for p in parts) == pytest.approx(full.item(), abs=1e-12)
    assert sum(p[1]["kl"] for p in parts) == pytest.approx(full_m["kl"], abs=1e-12)
    # without the global norm, each micro-batch divides by its own count and the sum is wrong
    local = sum(
        policy_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], cfg, ref[i : i + 2])[0].item()
        for i in range(0, 6, 2)
    )
    assert local != pytest.approx(full.item(), abs=1e-6)


def test_normalizer_and_aggregate():
    assert normalizer(MASK, "token_mean") == 5.0
    assert normalizer(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "seq_mean") == 1.0
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    assert aggregate(x, MASK, "token_mean", 5.0).item() == pytest.approx((2 + 3 + 4 + 5 + 6) / 5)
    assert aggregate(x, MASK, "seq_mean", 2.0).item() == pytest.approx((2.5 + 5.0) / 2)
    # an empty micro-batch divides by max(norm, 1), never by 0
    assert aggregate(x, torch.zeros_like(x), "token_mean", 0.0).item() == 0.0
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        aggregate(x, MASK, "sum", 1.0)  # type: ignore[arg-type]


def test_kl_shaped_rewards():
    rewards = torch.tensor([1.0, 0.5], dtype=F64)
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=F64)
    ref = lp - torch.tensor([[0.3, -0.2, 0.1], [0.5, -0.5, 0.0]], dtype=F64)
    # row 0: |-0.2| + |0.1| (token 0 is prompt) = 0.3 ; row 1: 0.5 + 0.5 + 0 = 1.0
    got = kl_shaped_rewards(rewards, lp, ref, MASK, kl_coef=0.1)
    assert got.tolist() == pytest.approx([1.0 - 0.03, 0.5 - 0.1], abs=1e-12)
    assert kl_shaped_rewards(rewards, lp, ref, MASK, kl_coef=0.0).tolist() == [1.0, 0.5]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_clip_frac_is_averaged_over_micro_batches_and_ranks(aggregation):
    """Each micro-batch's clip_frac is scaled by the step's normalizer, so the sum the policies
    report over micro-batches, and then over data-parallel ranks, is the whole batch's share."""
    from pop_nemo.distributed import sum_over_ranks

    lp = torch.zeros(4, 3, dtype=F64)
    old = lp - LN(2.0)  # ratio 2 on every token: all clipped at eps 0.2
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]], dtype=F64)
    cfg = LossConfig(clip_eps=0.2, kl_mode="none", aggregation=aggregation)
    norm = normalizer(mask, aggregation)
    _, full = policy_loss(lp, old, adv, mask, cfg, norm=norm)
    assert full["clip_frac"] == pytest.approx(1.0, abs=1e-12)

    def part(rows: slice) -> dict[str, float]:
        return policy_loss(lp[rows], old[rows], adv[rows], mask[rows], cfg, norm=norm)[1]

    # 2 ranks, each with 2 micro-batches of one row: what HFPolicy/MegatronPolicy sum up
    ranks = [sum_over_ranks([part(slice(i, i + 1)), part(slice(i + 1, i + 2))]) for i in (0, 2)]
    assert sum_over_ranks(ranks)["clip_frac"] == pytest.approx(1.0, abs=1e-12)
    assert sum_over_ranks(ranks)["pg_loss"] == pytest.approx(full["pg_loss"], abs=1e-12)
    # half the tokens clipped on rank 1 only: the reduced share is the token (or row) share
    old2 = old.clone()
    old2[2:] = lp[2:]  # ratio 1 on rows 2-3
    _, mixed = policy_loss(lp, old2, adv, mask, cfg, norm=norm)
    want = 5 / 8 if aggregation == "token_mean" else 2 / 4
    assert mixed["clip_frac"] == pytest.approx(want, abs=1e-12)


def test_sum_over_ranks_skips_ranks_that_report_nothing():
    from pop_nemo.distributed import sum_over_ranks

    assert sum_over_ranks([{"a": 1.0, "b": 0.5}, None, {}, {"a": 2.0}]) == {"a": 3.0, "b": 0.5}
