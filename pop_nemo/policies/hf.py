"""The HF policy: a transformers causal LM trained with AdamW on CPU or one GPU.

Holds the frozen reference model too (KL, and the rubric writer / judge by default).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pop_nemo.policies.base import LossFn, LRSchedule, TokenBatch, token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _train_pad_embedding(model: PreTrainedModel) -> None:
    """Give the pad token's input embedding its gradient, like any other token's.

    transformers builds ``nn.Embedding(padding_idx=pad_token_id)``, whose row never gets a
    gradient. Where pad is also a real token (SmolLM2: pad = eos = ``<|im_end|>``, in every ChatML
    prompt) that silently freezes it, and the step differs from Megatron's, which has no
    ``padding_idx``. Padding needs no such guard: it is right padding under causal attention and
    outside the loss mask, so its gradient is zero anyway."""
    emb = model.get_input_embeddings()
    if isinstance(emb, torch.nn.Embedding):
        emb.padding_idx = None


class HFPolicy:
    def __init__(
        self,
        model,
        reference,
        tokenizer,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 4,
        bf16_autocast: bool = False,
        gradient_checkpointing: bool = False,
    ):
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        _train_pad_embedding(model)
        if reference is not None:
            reference.eval().requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.bf16_autocast = bf16_autocast
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, weight_decay=weight_decay
        )
        self.schedule = LRSchedule(lr, warmup_steps, total_steps, min_lr_ratio)
        self.steps_done = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        if not self.bf16_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _forward_logprobs(self, model, mb: TokenBatch) -> torch.Tensor:
        dev = self.device
        with self._autocast():
            logits = model(input_ids=mb.input_ids.to(dev), attention_mask=mb.attention_mask.to(dev)).logits
        return token_logprobs(logits, mb.input_ids.to(dev))

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, reference: bool = False) -> torch.Tensor:
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("this policy has no reference model")
        was = model.training
        model.eval()
        try:
            return torch.cat(
                [self._forward_logprobs(model, mb).cpu() for mb in batch.micro_batches(self.micro_batch_size)]
            )
        finally:
            model.train(was)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for mb in batch.micro_batches(self.micro_batch_size):
            mb = mb.to(self.device)  # the loss function sees tensors on the model's device
            lp = self._forward_logprobs(self.model, mb)
            loss, metrics = loss_fn(lp, mb)
            loss.backward()
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        lr = self.schedule.at(self.steps_done)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.steps_done += 1
        return {**totals, "grad_norm": float(grad_norm), "lr": lr}

    def engine_weights(self) -> Any:
        return self.model  # colocated HF engine shares the module: refit is free

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "model")
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "steps_done": self.steps_done},
            path / "optimizer.pt",
        )

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        files = sorted((path / "model").glob("*.safetensors"))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Tied embeddings are saved once; anything else missing means a different model.
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        # Checkpoints before LRSchedule held a LambdaLR's state, whose last_epoch is the step count.
        self.steps_done = int(opt["steps_done"] if "steps_done" in opt else opt["scheduler"]["last_epoch"])

    def export_hf(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / "pop_nemo.json").write_text(json.dumps({"exported_by": "pop_nemo"}))
