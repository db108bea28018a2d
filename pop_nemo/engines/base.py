"""The Engine protocol: every generation backend (HF, TensorRT-LLM, OpenAI-compatible) speaks it.

The self-play stages and the online loop only ever see these types, so a backend is a config
switch. A request carries its own sampling and optional grammar, because one batch mixes roles
(greedy guided judges next to sampled solvers is the common case on a shared server).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Guide:
    """A decoding constraint understood by xgrammar (and so by TRT-LLM and vLLM)."""

    kind: Literal["json_schema", "ebnf", "regex"]
    spec: str


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None  # per-request seed: the same request samples the same tokens
    guide: Guide | None = None


@dataclass(frozen=True)
class Request:
    messages: list[Message]
    sampling: Sampling = Sampling()
    id: str = ""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the untempered model, one per token
    prompt_ids: list[int]
    finish_reason: Literal["stop", "length", "error"] = "stop"
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """Batched generation. ``generate`` returns, per request, ``sampling.n`` completions.

    Everything callers use is declared here, so no caller probes an engine with ``getattr``:
    ``pad_id`` pads training batches built from its token ids (``None`` when it has no tokenizer),
    ``stats["generated_tokens"]`` counts what it generated (the loop's throughput), ``placement``
    says where it runs (startup line, ``pop-nemo doctor``), ``close`` releases what it holds."""

    pad_id: int | None
    stats: dict[str, Any]

    @property
    def placement(self) -> str:
        """Where it runs, in words: ``cpu``, ``cuda:0``, a TensorRT-LLM layout, an endpoint URL."""
        ...

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]: ...

    def update_weights(self, source: Any) -> None:
        """Take new policy weights (a state dict, or a path to an exported HF folder)."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None:
        """Release threads, connections or GPU engines; the engine is not used afterwards."""
        ...
