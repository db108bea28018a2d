"""An SDPA attention for transformers models that keeps grouped-query K/V grouped on CPU.

transformers' SDPA path repeats each K/V head for its query heads whenever an attention mask is
given (padding), which copies the whole KV cache once per layer per decode step. Batched
decoding always has a padding mask, so on CPU that copy is most of a step's cost at long
contexts. Here torch receives the K/V heads as they are (``enable_gqa``); the numbers are the
same. On other devices the stock path runs (torch's fused CUDA kernels do not take
``enable_gqa`` together with a mask).
"""

from __future__ import annotations

import torch

NAME = "pop_sdpa"
_registered = False


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=bool(causal and attention_mask is None and query.shape[2] > 1),
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def attn_implementation() -> str:
    """Register the attention (once per process) and return its name for ``from_pretrained``."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME
