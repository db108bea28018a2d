"""Batched generation with transformers on CPU or one GPU, with xgrammar guides.

A plain decode loop over a KV cache instead of ``model.generate``: one batch mixes requests
with different temperatures, seeds and grammars, and we need untempered token logprobs and
per-request seeds (so a resumed run samples exactly what the uninterrupted run sampled).
Finished rows are dropped from the cache, so short judge answers do not pay for long ones.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pop_nemo.engines.base import Completion, Request, Sampling
from pop_nemo.engines.grammar import GrammarCache, apply_bitmask


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


class HFEngine:
    """The Engine protocol over a transformers causal LM (shared with the HF policy when colocated)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
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
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "calls": 0}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        # Similar prompt lengths batch together (less padding); the order is deterministic.
        order = sorted(range(len(rows)), key=lambda j: (len(rows[j].prompt), j))
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

    def _decode(self, rows: list[_Row]) -> list[Completion]:
        dev = self.device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
            attn[b, width - len(r.prompt) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        matchers = [self.grammars.matcher(r.sampling.guide) if r.sampling.guide else None for r in rows]
        bitmask = self.grammars.allocate_bitmask(len(rows)) if any(matchers) else None
        out_ids: list[list[int]] = [[] for _ in rows]
        out_lp: list[list[float]] = [[] for _ in rows]
        finish: list[str] = ["length"] * len(rows)
        active = list(range(len(rows)))  # row index of each batch position
        cache = None
        step_input = ids
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        while active:
            out = self.model(
                input_ids=step_input,
                attention_mask=attn,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill needs only the last position's logits
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
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
            if len(keep) < len(active):
                if not keep:
                    break
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                attn = attn[idx]
                positions = positions[idx]
                next_tokens = [next_tokens[p] for p in keep]
                active = [active[p] for p in keep]
            step_input = torch.tensor(next_tokens, device=dev).unsqueeze(-1)
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=dev)], dim=-1)
            positions = positions[:, -1:] + 1
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
