"""Offline synthesis throughput: batched across documents vs a sequential per-example baseline.

Both run the same :class:`pop_nemo.selfplay.synthesize.Synthesizer` (propose → solve ×N →
rubric → judge, the same seeds per document) on the same engine and model, in one process:

* **batched** — all ``--docs`` documents in one chunk: every stage is one engine call across
  the documents (what ``pop-nemo synthesize`` does per chunk);
* **sequential** — one document at a time (every stage still batches that document's own N
  solver samples and N judge calls, as the paper's per-example pipeline does).

Reported: examples/s and generated tokens/s of each (median over ``--repeats``, the two modes
interleaved so that machine load hits both alike), and the ratio batched ÷ sequential
(target ≥ 3×). Compiled grammars are cleared before every run, so neither mode inherits the
other's. On a GPU the model runs there. ``--no-share-prefixes`` turns off the engine's
shared-prefix prefill in both modes (its own effect is the ratio of two such runs).

    .venv/bin/python bench/synthesis.py        # CPU: SmolLM2-135M, conf/offline/tiny_cpu.yaml, 8 docs, N=4
    .venv/bin/python bench/synthesis.py --config conf/offline/smoke_cpu.yaml --docs 16 --n 8 --max-batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from pop_nemo import build
from pop_nemo.config import load_config
from pop_nemo.selfplay.synthesis_log import count
from pop_nemo.selfplay.synthesize import Synthesizer


def run_once(synth: Synthesizer, engine, docs, batched: bool) -> dict:
    engine.grammars.clear()
    before = dict(engine.stats)
    t, cpu = time.perf_counter(), time.process_time()
    examples = []
    if batched:
        examples, _ = synth.run(docs, first_group_id=0)
    else:
        for i, d in enumerate(docs):
            examples += synth.run([d], first_group_id=i)[0]
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = engine.stats["generated_tokens"] - before["generated_tokens"]
    return {
        "seconds": dt,
        "cpu_seconds": cpu,  # this process's CPU time (other jobs on the machine slow the wall clock)
        "load_1min": os.getloadavg()[0],  # the machine's load when the run ended
        "examples_per_s": len(docs) / dt,
        "tokens_per_s": tokens / dt,
        "tokens": tokens,
        "prompt_tokens": engine.stats["prompt_tokens"] - before["prompt_tokens"],  # summed over rows
        "prefill_tokens": engine.stats["prefill_tokens"] - before["prefill_tokens"],  # what was computed
        **count(examples),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="conf/offline/tiny_cpu.yaml")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=None, help="engine rows per forward (default: the config's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-share-prefixes", action="store_true", help="plain padded prefill in the engine")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = [f"offline.n={args.n}", f"offline.num_documents={args.docs}", *args.overrides]
    if args.max_batch:
        over.append(f"rollout.max_batch={args.max_batch}")
    cfg = load_config(args.config, over)
    docs = build.build_corpus(cfg).take(args.docs)
    engine = build.synthesis_self_engine(cfg)
    engine.share_prefixes = not args.no_share_prefixes
    synth = Synthesizer(cfg, dict.fromkeys(("proposer", "solver", "rubric", "judge"), engine))
    synth.run(docs[:1], first_group_id=10_000)  # warm-up: allocator, kernels (not timed)

    runs: dict[str, list[dict]] = {"sequential": [], "batched": []}
    for _ in range(args.repeats):
        for mode in ("sequential", "batched"):
            r = run_once(synth, engine, docs, batched=mode == "batched")
            runs[mode].append(r)
            print(json.dumps({"mode": mode, **r}), flush=True)
    med = {
        m: {
            k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "examples_per_s", "tokens_per_s")
        }
        for m, rs in runs.items()
    }
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({_cpu_name()}, {os.cpu_count()} cores), {args.threads} threads"
    )
    result = {
        "device": device,
        "model": cfg.model.path,
        "docs": args.docs,
        "n": args.n,
        "max_batch": cfg.rollout.max_batch,
        "share_prefixes": engine.share_prefixes,
        "repeats": args.repeats,
        "sequential": med["sequential"],
        "batched": med["batched"],
        "ratio_examples_per_s": med["batched"]["examples_per_s"] / med["sequential"]["examples_per_s"],
        "ratio_tokens_per_s": med["batched"]["tokens_per_s"] / med["sequential"]["tokens_per_s"],
        "ratio_cpu_seconds": med["sequential"]["cpu_seconds"] / med["batched"]["cpu_seconds"],
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    s, b = med["sequential"], med["batched"]
    print(
        f"| {device} | {cfg.model.path} | {args.docs} × N={args.n} | {cfg.rollout.max_batch} | "
        f"{s['examples_per_s']:.4f} ({s['tokens_per_s']:.2f} tok/s) | {b['examples_per_s']:.4f} ({b['tokens_per_s']:.2f} tok/s) | "
        f"**{result['ratio_examples_per_s']:.2f}×** |"
    )


if __name__ == "__main__":
    main()
