"""Tiny HF models and a byte-level tokenizer, made in milliseconds, for the Megatron tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 260  # 256 bytes + 4 specials


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(table))}
    specials = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|im_end|>"
    )


def make_tiny_qwen2(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random Qwen2 (bias in QKV, untied embeddings, GQA) saved as an HF folder."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF initialises biases to 0; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
