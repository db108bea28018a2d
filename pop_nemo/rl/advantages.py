"""Group-relative advantages over explicit group ids, with masks (DESIGN §2).

A sample whose ``valid`` is False (failed judge, invalid rubric) is out of the baseline and gets
advantage 0. A group with fewer than two valid samples, or whose valid rewards have
std < ``degenerate_std``, is degenerate: all its advantages are 0, and it is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["grpo", "rloo"]


@dataclass(frozen=True)
class Advantages:
    values: torch.Tensor  # [B] float
    num_groups: int
    num_degenerate: int

    @property
    def degenerate_rate(self) -> float:
        return self.num_degenerate / self.num_groups if self.num_groups else 0.0


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor,
    valid: torch.Tensor,
    method: Method = "grpo",
    normalize_std: bool = True,
    eps: float = 1e-6,
    degenerate_std: float = 1e-3,
) -> Advantages:
    """GRPO: ``A = (r - mean_g) / (std_g + eps)`` (std unbiased; ``normalize_std=False`` drops
    the division, as Dr. GRPO). RLOO: ``A = r - mean_{j≠i} r_j`` (NeMo-Aligner REINFORCE)."""
    rewards = rewards.to(torch.float64)
    gids = torch.as_tensor(group_ids, dtype=torch.long)
    valid = valid.to(torch.bool)
    if not (rewards.shape == gids.shape == valid.shape) or rewards.dim() != 1:
        raise ValueError("rewards, group_ids and valid must be 1-D tensors of the same length")
    out = torch.zeros_like(rewards)
    groups = torch.unique(gids)
    degenerate = 0
    for g in groups.tolist():
        idx = ((gids == g) & valid).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        if r.numel() < 2 or r.std(unbiased=True).item() < degenerate_std:
            degenerate += 1
            continue
        if method == "grpo":
            a = r - r.mean()
            if normalize_std:
                a = a / (r.std(unbiased=True) + eps)
        elif method == "rloo":
            k = r.numel()
            a = r - (r.sum() - r) / (k - 1)
        else:
            raise ValueError(f"unknown advantage method {method!r}; use 'grpo' or 'rloo'")
        out[idx] = a
    return Advantages(values=out.to(torch.float32), num_groups=len(groups), num_degenerate=degenerate)
