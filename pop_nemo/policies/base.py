"""The Policy protocol and the token batch it consumes.

Token tensors are right-padded ``[B, T]``; ``logprobs[:, t] = log p(x_t | x_<t)`` (column 0 is
0) and ``loss_mask[:, t] = 1`` on the trained completion tokens. Per-sequence tensors
(advantages) are ``[B]``. A loss function sees one micro-batch at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # advantages, old/ref logprobs, ...

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: slice | torch.Tensor) -> TokenBatch:
        return TokenBatch(
            **{f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "extras"},
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "extras"},
            extras={k: v.to(device) for k, v in self.extras.items()},
        )

    def micro_batches(self, size: int) -> list[TokenBatch]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def from_sequences(
        prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
    ) -> TokenBatch:
        """Right-pad ``prompt + completion``; only completion tokens are in the loss mask."""
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.float32)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            seq = list(p) + list(c)
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attn[b, : len(seq)] = 1
            mask[b, len(p) : len(seq)] = 1.0
        return TokenBatch(ids, attn, mask)


LossFn = Callable[[torch.Tensor, TokenBatch], tuple[torch.Tensor, dict[str, float]]]


class Policy(Protocol):
    @property
    def device(self) -> torch.device:
        """Where this rank's model lives (its rollout engines are placed next to it)."""
        ...

    def logprobs(self, batch: TokenBatch, reference: bool = False) -> torch.Tensor:
        """Token logprobs under the policy (or the frozen reference), no grad."""
        ...

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over all micro-batches of ``batch`` (gradient accumulation)."""
        ...

    def engine_weights(self) -> Any:
        """What ``Engine.update_weights`` takes to refit a rollout engine."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def export_hf(self, path: Path) -> None: ...


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each step: ``lr`` × :func:`warmup_cosine` over this run's steps.

    A function of the step count and the config only, never saved: a run resumed with a larger
    ``trainer.max_steps`` follows the longer schedule from where it stands, as an uninterrupted
    run of that length does (a saved scheduler would keep the shorter run's)."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def at(self, step: int) -> float:
        """The LR of the update after ``step`` updates."""
        return self.lr * warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` logprobs of each input token given the previous ones; column 0 is 0."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
