"""xgrammar glue for engines that mask logits themselves (the HF engine).

TRT-LLM and vLLM take a :class:`~pop_nemo.engines.base.Guide` spec directly and run the same
xgrammar inside, so a guide means the same thing on every backend.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from pop_nemo.engines.base import Guide

# Compact separators: fewer tokens, and one canonical form for every engine.
JSON_SEPARATORS = (",", ":")


def _pre_tokenizer_types(node) -> set[str]:
    if isinstance(node, dict):
        return ({node["type"]} if isinstance(node.get("type"), str) else set()) | _pre_tokenizer_types(
            node.get("pretokenizers")
        )
    return set().union(*map(_pre_tokenizer_types, node)) if isinstance(node, list) else set()


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary.

    xgrammar 0.1 (TensorRT-LLM 1.2's) reads the vocabulary type from the decoder, and SmolLM2's
    tokenizer as transformers 4 converts it from GGUF has a ByteFallback decoder in front of its
    byte-level one, so every "Ġword" token was read literally and grammars rejected valid text.
    The pre-tokenizer is what turns text into tokens: when it is byte-level, the vocabulary is.
    """
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if info.vocab_type == xgr.VocabType.BYTE_LEVEL or backend is None:
        return info
    if "ByteLevel" not in _pre_tokenizer_types(json.loads(backend.to_str()).get("pre_tokenizer")):
        return info
    vocab = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            vocab[i] = token
    return xgr.TokenizerInfo(
        vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=stop_token_ids, add_prefix_space=False
    )


class GrammarCache:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_entries: int = 1024):
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        # One judge grammar per rubric: bounded, least recently used goes first.
        self._cache: OrderedDict[Guide, xgr.CompiledGrammar] = OrderedDict()
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def compile(self, guide: Guide) -> xgr.CompiledGrammar:
        with self._lock:
            got = self._cache.get(guide)
            if got is None:
                if guide.kind == "json_schema":
                    got = self.compiler.compile_json_schema(
                        guide.spec, any_whitespace=False, separators=JSON_SEPARATORS
                    )
                elif guide.kind == "ebnf":
                    got = self.compiler.compile_grammar(guide.spec)
                elif guide.kind == "regex":
                    got = self.compiler.compile_regex(guide.spec)
                else:
                    raise ValueError(f"unknown guide kind {guide.kind!r}")
                self._cache[guide] = got
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(guide)
            return got

    def clear(self) -> None:
        """Forget every compiled grammar (ours and xgrammar's own cache); benchmarks start cold."""
        with self._lock:
            self._cache.clear()
            self.compiler.clear_cache()

    def matcher(self, guide: Guide) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(guide))

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.info.vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set disallowed tokens of ``rows`` of ``logits`` to -inf, in place."""
    if rows:
        if bitmask.device != logits.device:  # matchers fill the mask on the CPU; the logits may be on a GPU
            bitmask = bitmask.to(logits.device)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
