"""Batched generation with transformers on CPU or one GPU, with xgrammar guides.

A plain decode loop over a KV cache instead of ``model.generate``: one batch mixes requests
with different temperatures, seeds and grammars, and we need untempered token logprobs and
per-request seeds (so a resumed run samples exactly what the uninterrupted run sampled).
Finished rows are dropped from the cache, so short judge answers do not pay for long ones, and
a prompt prefix that rows share (a problem's N solver rows, its N judge prompts) is prefilled
once (``engines/prefix.py``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from pop_nemo.compat import init_cache_layer
from pop_nemo.engines.base import Completion, Request, Sampling
from pop_nemo.engines.grammar import GrammarCache, apply_bitmask
from pop_nemo.engines.prefix import order_rows, plan_prefill


@dataclass
class _Row:
    request: int
    sample: int
    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Pick one token from 1-D ``logits`` (already grammar-masked): greedy at T=0, else top-p."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into room kept free for them.

    transformers' DynamicLayer concatenates, which copies the layer's whole cache every decode
    step. Here a buffer is allocated with room for ``reserve`` more tokens (the chunk's largest
    ``max_new_tokens``), so decoding never copies; the cache is the buffer's first ``length``
    positions. Dropping finished rows copies the kept rows once, as before.
    """

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            init_cache_layer(self, key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self.length + n > self._k.shape[-2]:
            self._k, self._v = self._grow(self._k, key_states), self._grow(self._v, value_states)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def _grow(self, buf: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        b, h, n, d = new.shape
        out = new.new_empty(b, h, self.length + n + self.reserve, d)
        if buf is not None:
            out[:, :, : self.length] = buf[:, :, : self.length]
        return out

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()


class _GrowingCache(DynamicCache):
    """A DynamicCache of :class:`_GrowingLayer` (for models without sliding-window layers)."""

    def __init__(self, reserve: int):
        Cache.__init__(self, layer_class_to_replicate=partial(_GrowingLayer, reserve))


def _full_attention_only(config) -> bool:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []):
        return False
    return not (getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True))


class HFEngine:
    """The Engine protocol over a transformers causal LM (shared with the HF policy when colocated)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, seed: int = 0, share_prefixes: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.share_prefixes = share_prefixes
        self._rng = random.Random(seed)
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(gen_eos)
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        vocab = model.get_output_embeddings().weight.shape[0]
        self.grammars = GrammarCache(tokenizer, vocab, self.eos_ids)
        # prompt_tokens: summed over rows; prefill_tokens: what the forward passes processed (padding
        # included, shared prefixes once), the number prefix sharing shrinks.
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "prefill_tokens": 0, "calls": 0}
        self.growing_cache = _full_attention_only(model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def placement(self) -> str:
        return str(self.device)

    def encode(self, request: Request) -> list[int]:
        out = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        rows: list[_Row] = []
        for i, req in enumerate(requests):
            prompt = self.encode(req)
            base = req.sampling.seed if req.sampling.seed is not None else self._rng.getrandbits(62)
            for k in range(req.sampling.n):
                gen = torch.Generator().manual_seed((base * 1_000_003 + k) % (2**63))
                rows.append(_Row(i, k, prompt, req.sampling, gen))
        results: list[list[Completion | None]] = [[None] * r.sampling.n for r in requests]
        # Rows that share a prefix batch together, the rest by length (less padding); deterministic.
        order = order_rows([r.prompt for r in rows])
        for start in range(0, len(order), self.max_batch):
            chunk = [rows[j] for j in order[start : start + self.max_batch]]
            for row, comp in zip(chunk, self._generate_chunk(chunk)):
                results[row.request][row.sample] = comp
        self.stats["calls"] += 1
        return [[c for c in rs if c is not None] for rs in results]

    @torch.no_grad()
    def _generate_chunk(self, rows: list[_Row]) -> list[Completion]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._decode(rows)
        finally:
            model.train(was_training)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[b, width - len(p) :] = 1
        self.stats["prefill_tokens"] += ids.numel()
        return ids.to(self.device), attn.to(self.device)

    def _new_cache(self, rows: list[_Row]) -> Cache | None:
        if not self.growing_cache:
            return None  # the model's own DynamicCache (sliding-window layers)
        return _GrowingCache(reserve=max(r.sampling.max_new_tokens for r in rows) + 1)

    def _prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Forward the prompts; returns the model output, the attention mask and the last positions.

        With a shared-prefix plan: forward each group's prefix once, copy its KV cache to the
        group's rows, then forward each row's remaining tokens. Between a row's prefix and its
        suffix sit masked pads, so the positions are given explicitly and stay contiguous.
        """
        prompts = [r.prompt for r in rows]
        plan = plan_prefill(prompts) if self.share_prefixes else None
        if plan is not None:  # first the groups' prefixes
            first = {g: b for b, g in reversed(list(enumerate(plan.group_of)))}
            prompts = [prompts[first[g]][:n] for g, n in enumerate(plan.prefix_len)]
        ids, attn = self._left_pad(prompts)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=self._new_cache(rows),
            use_cache=True,
            logits_to_keep=1,
        )
        if plan is None:
            return out, attn, positions[:, -1:]
        group = torch.tensor(plan.group_of, device=self.device)
        out.past_key_values.batch_select_indices(group)
        starts = torch.tensor([plan.prefix_len[g] for g in plan.group_of], device=self.device)
        ids, suffix_attn = self._left_pad([r.prompt[plan.prefix_len[g] :] for r, g in zip(rows, plan.group_of)])
        attn = torch.cat([attn[group], suffix_attn], dim=-1)
        positions = starts[:, None] + (suffix_attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )
        return out, attn, positions[:, -1:]

    def _decode(self, rows: list[_Row]) -> list[Completion]:
        dev = self.device
        matchers = [self.grammars.matcher(r.sampling.guide) if r.sampling.guide else None for r in rows]
        bitmask = self.grammars.allocate_bitmask(len(rows)) if any(matchers) else None
        out_ids: list[list[int]] = [[] for _ in rows]
        out_lp: list[list[float]] = [[] for _ in rows]
        finish: list[str] = ["length"] * len(rows)
        active = list(range(len(rows)))  # row index of each batch position
        out, attn, positions = self._prefill(rows)
        while True:
            cache = out.past_key_values
            # Rows sample on the CPU with their own seeded generators: one transfer per step on a GPU.
            logits = out.logits[:, -1, :].float().cpu()
            logp = torch.log_softmax(logits, dim=-1)
            guided = [p for p, b in enumerate(active) if matchers[b] is not None]
            for p in guided:
                matchers[active[p]].fill_next_token_bitmask(bitmask, p)
            if guided:
                apply_bitmask(logits, bitmask[: len(active)], guided)
            next_tokens: list[int] = []
            keep: list[int] = []
            for p, b in enumerate(active):
                r = rows[b]
                tok = sample_token(logits[p], r.sampling, r.generator)
                next_tokens.append(tok)
                out_ids[b].append(tok)
                out_lp[b].append(float(logp[p, tok]))
                m = matchers[b]
                done = False
                if m is not None:
                    m.accept_token(tok)
                    done = m.is_terminated()
                if tok in self.eos_ids:
                    done = True
                if done:
                    finish[b] = "stop"
                elif len(out_ids[b]) >= r.sampling.max_new_tokens:
                    done = True
                if not done:
                    keep.append(p)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                attn = attn[idx]
                positions = positions[idx]
                next_tokens = [next_tokens[p] for p in keep]
                active = [active[p] for p in keep]
            step_input = torch.tensor(next_tokens, device=dev).unsqueeze(-1)
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=dev)], dim=-1)
            positions = positions + 1
            out = self.model(
                input_ids=step_input, attention_mask=attn, position_ids=positions, past_key_values=cache, use_cache=True
            )
        comps = []
        for b, r in enumerate(rows):
            toks = out_ids[b]
            text_ids = toks[:-1] if finish[b] == "stop" and toks and toks[-1] in self.eos_ids else toks
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            comps.append(
                Completion(text=text, token_ids=toks, logprobs=out_lp[b], prompt_ids=r.prompt, finish_reason=finish[b])
            )
            self.stats["generated_tokens"] += len(toks)
            self.stats["prompt_tokens"] += len(r.prompt)
        return comps

    def update_weights(self, source: Any) -> None:
        if source is None or source is self.model:
            return
        if isinstance(source, Mapping):
            self.model.load_state_dict(source)
            return
        from pop_nemo.models import load_causal_lm

        fresh = load_causal_lm(str(source), dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."))
        self.model.load_state_dict(fresh.state_dict())

    def sleep(self) -> None:  # CPU/colocated HF: nothing to release
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:  # nothing held beyond the model, which the caller owns
        pass
