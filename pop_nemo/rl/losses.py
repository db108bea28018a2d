"""Policy-gradient loss with KL to the reference, and the KL reward shaping alternative.

Token tensors are ``[B, T]`` aligned with the input ids: ``logprobs[:, t] = log p(x_t | x_<t)``
and ``mask[:, t] = 1`` where ``x_t`` is a trained completion token.

Aggregation is global: the caller passes ``normalizer`` (the token count, or the sequence count,
of the *whole* step batch), so gradient accumulation over micro-batches gives the same gradient
as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLMode = Literal["k3_loss", "reward_shaping", "none"]
Aggregation = Literal["token_mean", "seq_mean"]


@dataclass(frozen=True)
class LossConfig:
    clip_eps: float = 0.2
    kl_coef: float = 0.01
    kl_mode: KLMode = "k3_loss"
    aggregation: Aggregation = "token_mean"


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token: ``exp(d) - d - 1`` with ``d = ref - pi``."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def normalizer(mask: torch.Tensor, aggregation: Aggregation) -> float:
    """The divisor of the whole step batch for :func:`policy_loss`."""
    if aggregation == "token_mean":
        return float(mask.sum().item())
    return float((mask.sum(-1) > 0).sum().item())


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, norm: float) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    if aggregation == "token_mean":
        return (per_token * mask).sum() / max(norm, 1.0)
    if aggregation == "seq_mean":
        lengths = mask.sum(-1).clamp(min=1.0)
        return ((per_token * mask).sum(-1) / lengths).sum() / max(norm, 1.0)
    raise ValueError(f"unknown aggregation {aggregation!r}; use 'token_mean' or 'seq_mean'")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio surrogate ``-min(ρA, clip(ρ, 1±ε)A)`` plus ``kl_coef · k3`` in ``k3_loss`` mode.

    Returns the loss (scaled by ``1/norm``) and detached metrics scaled the same way (``pg_loss``,
    ``kl``, and ``clip_frac``: the share of trained tokens whose ratio left ``1 ± clip_eps``, a
    token share under ``token_mean``, a mean of per-sequence shares under ``seq_mean``). With the
    global ``norm``, summing a step's micro-batches (and ranks) gives the whole batch's values.
    """
    if norm is None:
        norm = normalizer(mask, cfg.aggregation)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
    pg = -torch.minimum(unclipped, clipped)
    per_token = pg
    kl = torch.zeros_like(pg)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if cfg.kl_mode == "k3_loss":
            per_token = pg + cfg.kl_coef * kl
    loss = aggregate(per_token, mask, cfg.aggregation, norm)
    with torch.no_grad():
        m = mask.to(pg.dtype)
        metrics = {
            "pg_loss": float(aggregate(pg, mask, cfg.aggregation, norm)),
            "kl": float(aggregate(kl, mask, cfg.aggregation, norm)),
            # Divided by the step batch's normalizer like the loss, so the sum over micro-batches
            # and data-parallel ranks (what the policies report) is the whole batch's fraction.
            "clip_frac": float(aggregate(((ratio - 1).abs() > cfg.clip_eps).to(pg.dtype), m, cfg.aggregation, norm)),
        }
    return loss, metrics


def kl_shaped_rewards(
    rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """NeMo-Aligner REINFORCE shaping: ``r - β · Σ_t |log π - log π_ref|`` over completion tokens."""
    kl = ((logprobs - ref_logprobs).abs() * mask.to(logprobs.dtype)).sum(-1)
    return rewards - kl_coef * kl
