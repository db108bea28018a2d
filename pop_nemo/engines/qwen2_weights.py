"""Qwen2 (and Llama-layout) weights between Megatron-core names and Hugging Face names.

A rollout engine that loads HF checkpoints (TensorRT-LLM's PyTorch backend, vLLM, HF) takes
refitted weights under HF names. Megatron-Bridge does this conversion when it is installed
(``MegatronPolicy.engine_weights`` uses it); this module is the dependency-free path for a
Megatron state dict that arrives without the bridge, and the place where the rules are written
down and tested:

* ``embedding.word_embeddings.weight`` → ``model.embed_tokens.weight``;
  ``output_layer.weight`` → ``lm_head.weight`` (absent with tied embeddings);
  ``decoder.final_layernorm.weight`` → ``model.norm.weight``.
* per layer ``i`` (Transformer Engine spec and the local spec both appear):
  ``self_attention.linear_qkv.layer_norm_weight`` or ``input_layernorm.weight`` →
  ``input_layernorm.weight``; ``mlp.linear_fc1.layer_norm_weight`` or
  ``pre_mlp_layernorm.weight`` → ``post_attention_layernorm.weight``;
  ``self_attention.linear_proj.weight`` → ``self_attn.o_proj.weight``;
  ``mlp.linear_fc2.weight`` → ``mlp.down_proj.weight``.
* ``self_attention.linear_qkv.{weight,bias}`` is interleaved per query group,
  ``[q_g0 (heads_per_group·d), k_g0 (d), v_g0 (d), q_g1, k_g1, v_g1, …]``, and is split into
  ``self_attn.{q,k,v}_proj.{weight,bias}``.
* ``mlp.linear_fc1.weight`` is ``[gate; up]`` and is split into ``mlp.{gate,up}_proj.weight``.

The name rules are plain string functions; the tensor work uses torch views only. Works on
full (TP-gathered) tensors: a tensor-parallel shard must be gathered first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Qwen2Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2: biases on q/k/v; Llama: none

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> Qwen2Shape:
        """From an HF ``config.json`` (dict) or a ``PretrainedConfig``."""
        get = config.get if isinstance(config, Mapping) else lambda k, default=None: getattr(config, k, default)
        model_type = get("model_type", "qwen2")
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            num_heads=int(get("num_attention_heads")),
            num_kv_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")),
            head_dim=get("head_dim"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", model_type == "qwen2")) or model_type == "qwen2",
        )


# ------------------------------------------------------------------ names


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_FUSED = {
    "self_attention.linear_qkv.weight": ("qkv", "weight"),
    "self_attention.linear_qkv.bias": ("qkv", "bias"),
    "mlp.linear_fc1.weight": ("gate_up", "weight"),
}
# Megatron keeps fp8/TE bookkeeping next to weights; none of it is a weight of the HF model.
_SKIP = re.compile(r"(_extra_state$|\._amax|\.scale_inv$|^rotary_pos_emb\.)")


def strip_wrappers(name: str) -> str:
    """``module.module.decoder...`` (DDP / Float16Module wrappers) → ``decoder...``."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def megatron_to_hf_names(name: str) -> list[str]:
    """The HF names a Megatron parameter becomes (empty for non-weights such as TE extra state).

    Raises ``KeyError`` for a name this mapping does not know."""
    name = strip_wrappers(name)
    if _SKIP.search(name):
        return []
    if name in _GLOBAL:
        return [_GLOBAL[name]]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"not a Qwen2 Megatron parameter: {name!r}")
    i, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{i}."
    if rest in _PER_LAYER:
        return [prefix + _PER_LAYER[rest]]
    if rest in _FUSED:
        kind, suffix = _FUSED[rest]
        parts = ("q_proj", "k_proj", "v_proj") if kind == "qkv" else ("gate_proj", "up_proj")
        group = "self_attn" if kind == "qkv" else "mlp"
        return [f"{prefix}{group}.{p}.{suffix}" for p in parts]
    raise KeyError(f"not a Qwen2 Megatron parameter: {name!r}")


def hf_names(shape: Qwen2Shape) -> list[str]:
    """Every parameter name of the HF model, in the order HF lists them."""
    names = ["model.embed_tokens.weight"]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if shape.qkv_bias:
                names.append(f"{p}self_attn.{proj}.bias")
        names.append(f"{p}self_attn.o_proj.weight")
        names += [f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight", f"{p}mlp.down_proj.weight"]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not shape.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def check_complete(names: Iterable[str], shape: Qwen2Shape) -> None:
    """Raise ``ValueError`` naming what is missing or unexpected (a tied ``lm_head`` may be present)."""
    have = set(names)
    want = set(hf_names(shape))
    missing = sorted(want - have)
    unexpected = sorted(have - want - ({"lm_head.weight"} if shape.tie_word_embeddings else set()))
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit this Qwen2 model ({shape.num_layers} layers): "
            f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}"
        )


# ------------------------------------------------------------------ tensors


def split_qkv(qkv: torch.Tensor, shape: Qwen2Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's group-interleaved QKV (weight ``[(h+2g)·d, H]`` or bias ``[(h+2g)·d]``) → q, k, v."""
    g, hpg, d = shape.num_kv_heads, shape.heads_per_group, shape.d
    rows = (shape.num_heads + 2 * g) * d
    if qkv.shape[0] != rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows; this shape needs (heads + 2·kv_heads)·d = {rows}")
    grouped = qkv.reshape(g, (hpg + 2) * d, *qkv.shape[1:])
    q = grouped[:, : hpg * d].reshape(shape.num_heads * d, *qkv.shape[1:])
    k = grouped[:, hpg * d : (hpg + 1) * d].reshape(g * d, *qkv.shape[1:])
    v = grouped[:, (hpg + 1) * d :].reshape(g * d, *qkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Qwen2Shape) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    g, hpg, d = shape.num_kv_heads, shape.heads_per_group, shape.d
    tail = q.shape[1:]
    parts = [q.reshape(g, hpg * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)]
    return torch.cat(parts, dim=1).reshape((shape.num_heads + 2 * g) * d, *tail).contiguous()


def megatron_to_hf(state: Mapping[str, torch.Tensor], shape: Qwen2Shape) -> dict[str, torch.Tensor]:
    """A full (TP-gathered) Megatron GPTModel state dict → the HF Qwen2 state dict.

    Checks that the result is exactly the HF model's parameter set."""
    out: dict[str, torch.Tensor] = {}
    for raw, t in state.items():
        names = megatron_to_hf_names(raw)
        if not names:
            continue
        if len(names) == 1:
            out[names[0]] = t
        elif len(names) == 3:
            for n, part in zip(names, split_qkv(t, shape)):
                out[n] = part
        else:
            if t.shape[0] != 2 * shape.intermediate_size:
                raise ValueError(f"{raw} has {t.shape[0]} rows; expected 2·intermediate_size")
            gate, up = t.chunk(2, dim=0)
            out[names[0]], out[names[1]] = gate.contiguous(), up.contiguous()
    if shape.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    check_complete(out, shape)
    return out


def hf_to_megatron(
    state: Mapping[str, torch.Tensor], shape: Qwen2Shape, te_layernorm_names: bool = True
) -> dict[str, torch.Tensor]:
    """The HF Qwen2 state dict → Megatron names (``te_layernorm_names``: Transformer Engine spec
    fuses the norms into the following linear layer; else the local spec's separate norms)."""
    check_complete(state, shape)
    out = {
        "embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": state["model.norm.weight"],
    }
    if not shape.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    for i in range(shape.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        if te_layernorm_names:
            out[m + "self_attention.linear_qkv.layer_norm_weight"] = state[h + "input_layernorm.weight"]
            out[m + "mlp.linear_fc1.layer_norm_weight"] = state[h + "post_attention_layernorm.weight"]
        else:
            out[m + "input_layernorm.weight"] = state[h + "input_layernorm.weight"]
            out[m + "pre_mlp_layernorm.weight"] = state[h + "post_attention_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = merge_qkv(
            *(state[f"{h}self_attn.{p}_proj.weight"] for p in "qkv"), shape
        )
        if shape.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = merge_qkv(
                *(state[f"{h}self_attn.{p}_proj.bias"] for p in "qkv"), shape
            )
        out[m + "self_attention.linear_proj.weight"] = state[h + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [state[h + "mlp.gate_proj.weight"], state[h + "mlp.up_proj.weight"]], dim=0
        )
        out[m + "mlp.linear_fc2.weight"] = state[h + "mlp.down_proj.weight"]
    return out


def is_megatron_state(names: Iterable[str]) -> bool:
    """True when the names are Megatron's (``decoder.layers…``/``embedding…``), not HF's."""
    for n in names:
        n = strip_wrappers(n)
        if n.startswith(("decoder.", "embedding.", "output_layer.")):
            return True
        if n.startswith(("model.", "lm_head.")):
            return False
    return False


# ------------------------------------------------------------------ transfer buckets

_FUSION_GROUP = re.compile(r"^(model\.layers\.\d+\.)(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")


def fusion_key(name: str) -> str:
    """Engines fuse q/k/v and gate/up on load; tensors with the same key travel together."""
    m = _FUSION_GROUP.match(name)
    if not m:
        return name
    kind = "qkv" if m.group(2).startswith("self_attn") else "gate_up"
    return f"{m.group(1)}{kind}.{m.group(4)}"


def buckets(sizes: Iterable[tuple[str, int]], max_bytes: int) -> Iterator[list[str]]:
    """Group ``(name, nbytes)`` into transfer buckets of at most ``max_bytes`` (a single larger
    tensor or fusion group gets a bucket of its own), never splitting a fusion group."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, n in sizes:
        groups.setdefault(fusion_key(name), []).append((name, n))
    current: list[str] = []
    used = 0
    for members in groups.values():
        size = sum(n for _, n in members)
        if current and used + size > max_bytes:
            yield current
            current, used = [], 0
        current += [name for name, _ in members]
        used += size
    if current:
        yield current
