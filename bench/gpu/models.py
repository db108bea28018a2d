"""Random-weight stand-ins for the bundled SmolLM2, so the kit needs no 98 MB GGUF on the device.

The GPU machine cannot download and the kit's carry limit is 64 MiB, so the device builds the
model from SmolLM2's real ``config.json`` (or a tiny shape for the CPU rehearsal) with random
weights and the real tokenizer files that ``prepare`` wrote. It lands where ``model.path=smollm2``
resolves (``POP_NEMO_CACHE``), so the tests, the online loop and the benchmarks run unchanged.
Random weights give the real shapes and costs, not the real outputs: guided roles still parse
(their grammars), the solver writes until ``max_new_tokens``.

    python bench/gpu/models.py --template .gpu/smollm2 --shape smollm2-135m   # on the device
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

# The folder pop_nemo.models converts the bundled GGUF into, under POP_NEMO_CACHE. write_random
# checks that model.path=smollm2 resolves to it, so a rename there fails here loudly.
BUNDLED_DIR = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SHAPES: dict[str, dict] = {
    "smollm2-135m": {},  # the real config as it is
    # the CPU rehearsal: the same vocabulary and tokenizer, 2 narrow layers (~3 M parameters)
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
}


def write_random(template: Path, cache: Path, shape: str, seed: int = 0) -> Path:
    """Write a random-weight model of ``shape`` with ``template``'s tokenizer into ``cache``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pop_nemo.checkpoint import atomic_dir

    missing = [f for f in ("config.json", *TOKENIZER_FILES) if not (template / f).is_file()]
    if missing:
        raise SystemExit(f"{template} lacks {missing}: run `bash scripts/gpu_check.sh prepare` first")
    cfg = AutoConfig.from_pretrained(template)
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = cache / BUNDLED_DIR
    with atomic_dir(out, ".random-") as tmp:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            shutil.copy(template / f, tmp / f)
        (tmp / ".complete").write_text(json.dumps({"source": f"random weights, shape {shape}, seed {seed}"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--template", required=True, help="SmolLM2's config and tokenizer files (from prepare)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--cache", default=os.environ.get("POP_NEMO_CACHE"), help="default: $POP_NEMO_CACHE")
    args = ap.parse_args()
    if not args.cache:
        raise SystemExit("--cache: set it or POP_NEMO_CACHE (the kit never writes into the user's model cache)")
    os.environ["POP_NEMO_CACHE"] = args.cache
    out = write_random(Path(args.template), Path(args.cache), args.shape)
    from pop_nemo.models import resolve_model_path

    if Path(resolve_model_path("smollm2")) != out:
        raise SystemExit(f"model.path=smollm2 does not resolve to {out}: update BUNDLED_DIR in {__file__}")
    n = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(json.dumps({"model": str(out), "shape": args.shape, "safetensors_mb": round(n / 2**20, 1)}))


if __name__ == "__main__":
    main()
