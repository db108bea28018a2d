"""Train-step throughput: Megatron policy vs HF policy, same model, same batch, one run.

    python bench/train_step.py                      # CPU: a small random Qwen2, fp32
    python bench/train_step.py --preset qwen2-0.5b --bf16 --batch 8 --seq 1024   # GPU, with MFU

Each backend runs ``--warmup`` untimed steps then ``--steps`` timed ``train_step`` calls of the
GRPO loss (no reference model) on one process (world 1, TP=PP=DP=1). Reported: seconds per
step, trained tokens/s (batch × sequence length / step time), the ratio megatron/HF, and on a
GPU the model FLOPs utilisation (``6·N·tokens + 12·L·h·T·tokens`` over the card's dense bf16
peak) and peak memory. On a CPU megatron needs the test-only CUDA shim, which this script
imports from tests/megatron (it is a benchmark, not package code).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
from tests.megatron import cpu_shim  # noqa: E402

cpu_shim.install()  # CPU: the CUDA shim; GPU without Transformer Engine: only the TE placeholder

PRESETS = {
    # ~9M params: CPU-sized
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8192),
    # Qwen2.5-0.5B's shape, random weights (494M params)
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # Qwen2.5-1.5B's shape, random weights (1.54B params)
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_model(preset: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(max_position_embeddings=32768, **{"tie_word_embeddings": False, **PRESETS[preset]})
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


def batch_and_loss(vocab: int, b: int, t: int):
    from pop_nemo.policies.base import TokenBatch
    from pop_nemo.rl.losses import LossConfig, normalizer, policy_loss

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (t // 2,), generator=g).tolist() for _ in range(b)]
    comps = [torch.randint(0, vocab, (t - t // 2,), generator=g).tolist() for _ in range(b)]
    batch = TokenBatch.from_sequences(prompts, comps, pad_id=0)
    cfg = LossConfig(kl_mode="none")
    norm = normalizer(batch.loss_mask, cfg.aggregation)

    def loss_fn(lp, mb):
        ex = {k: v.to(lp.device) for k, v in mb.extras.items()}  # HFPolicy passes CPU micro-batches
        return policy_loss(lp, ex["old_logprobs"], ex["advantages"], mb.loss_mask.to(lp.device), cfg, None, norm)

    return batch, loss_fn


def time_policy(policy, batch, loss_fn, warmup: int, steps: int) -> dict:
    batch.extras = {
        "old_logprobs": policy.logprobs(batch),
        "advantages": torch.randn(len(batch), generator=torch.Generator().manual_seed(1)),
    }
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = policy.train_step(batch, loss_fn)
        if CUDA:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = batch.input_ids.numel()
    out = {
        "s_per_step": statistics.mean(times),
        "s_per_step_min": min(times),
        "tokens_per_s": tokens / statistics.mean(times),
        "last_loss": m["loss"],
    }
    if CUDA:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def flops_per_token(cfg: dict, seq: int) -> float:
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter  # qkv, proj, gated MLP
    matmul_params = layers * per_layer + h * cfg["vocab_size"]  # + LM head
    return 6 * matmul_params + 12 * layers * h * seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-0.5b" if CUDA else "small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024 if CUDA else 256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5 if CUDA else 3)
    ap.add_argument("--warmup", type=int, default=2 if CUDA else 1)
    ap.add_argument("--bf16", action="store_true", help="megatron bf16 params; HF bf16 autocast")
    ap.add_argument("--backends", default="megatron,hf")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", help="also write the results here (JSON)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if CUDA else "cpu")
    opt = dict(lr=1e-5, total_steps=100, max_grad_norm=1.0, micro_batch_size=args.micro_batch)
    res: dict = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "dtype": "bf16" if args.bf16 else "fp32",
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(args.preset, Path(tmp) / "model")
        vocab = PRESETS[args.preset]["vocab_size"]
        batch, loss_fn = batch_and_loss(vocab, args.batch, args.seq)
        for backend in args.backends.split(","):
            if backend == "megatron":
                from pop_nemo.policies.megatron import MegatronPolicy

                pol = MegatronPolicy(str(path), with_reference=False, bf16=args.bf16, **opt)
                res["params"] = sum(p.numel() for m in pol.model for p in m.parameters())
            else:
                from transformers import AutoModelForCausalLM

                from pop_nemo.policies.hf import HFPolicy

                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
                pol = HFPolicy(model, None, None, bf16_autocast=args.bf16, **opt)
            res[backend] = time_policy(pol, batch, loss_fn, args.warmup, args.steps)
            del pol
            if CUDA:
                torch.cuda.empty_cache()
    if "megatron" in res and "hf" in res:
        res["megatron_over_hf_tokens_per_s"] = res["megatron"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    if CUDA:
        peak = next((v for k, v in PEAK_BF16.items() if k in res["device"]), None)
        fpt = flops_per_token({"tie_word_embeddings": False, **PRESETS[args.preset]}, args.seq)
        res["model_flops_per_token"] = fpt
        for backend in ("megatron", "hf"):
            if backend in res and peak:
                res[backend]["mfu_vs_bf16_dense_peak"] = res[backend]["tokens_per_s"] * fpt / peak
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
