"""Self-play overhead: generated tokens/s of the whole self-play stage vs the raw engine.

Runs ``SelfPlay.run`` (propose → solve ×N → rubric → judge) on real documents while
recording every ``Engine.generate`` call, then replays exactly those request batches on the raw
engine. The ratio (stage tokens/s ÷ raw tokens/s) is what the orchestration costs: prompt
building, parsing, scoring and batching decisions. Target ≥ 0.85. Compiled grammars are
cleared before each half, so both pay the same xgrammar compiles.

    .venv/bin/python bench/pipeline.py --docs 2 --n 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pop_nemo import build
from pop_nemo.config import load_config
from pop_nemo.engines.hf import HFEngine
from pop_nemo.models import load_causal_lm, load_tokenizer, resolve_model_path
from pop_nemo.selfplay.roles import get_task
from pop_nemo.selfplay.stage import SelfPlay


class Recording:
    """An Engine proxy that remembers each batch of requests it was given."""

    def __init__(self, inner: HFEngine):
        self.inner, self.calls = inner, []

    def generate(self, requests):
        self.calls.append(list(requests))
        return self.inner.generate(requests)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="conf/smoke_cpu.yaml")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the model runs (cuda: the GPU; sampling stays on the CPU)")
    ap.add_argument("--json", help="also write the final result here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"rollout.n={args.n}", f"rollout.docs_per_step={args.docs}", *args.overrides])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, cfg.model.dtype).to(args.device)
    engine = HFEngine(model, tok, max_batch=cfg.rollout.max_batch)
    rec = Recording(engine)
    from pop_nemo.critic.local import LocalCritic

    critic = LocalCritic(
        rec,
        rec,
        build.sampling(cfg.rollout.rubric),
        build.sampling(cfg.rollout.judge),
        writing=get_task(cfg.task).writing,
        limits=build.guide_limits(cfg),
    )
    sp = SelfPlay(
        get_task(cfg.task),
        rec,
        rec,
        critic,
        build.sampling(cfg.rollout.proposer),
        build.sampling(cfg.rollout.solver),
        n=cfg.rollout.n,
        limits=build.guide_limits(cfg),
        seed=cfg.seed,
        answer_fallback=cfg.algo.answer_fallback,
    )
    corpus = build.build_corpus(cfg)
    rows = []
    for rep in range(args.repeats):
        docs = corpus.take(args.docs)
        rec.calls.clear()
        engine.grammars.clear()
        before = engine.stats["generated_tokens"]
        t = time.perf_counter()
        sp.run(docs, step=rep)
        stage_s = time.perf_counter() - t
        stage_tokens = engine.stats["generated_tokens"] - before
        calls = list(rec.calls)
        engine.grammars.clear()
        before = engine.stats["generated_tokens"]
        t = time.perf_counter()
        for reqs in calls:
            engine.generate(reqs)
        raw_s = time.perf_counter() - t
        raw_tokens = engine.stats["generated_tokens"] - before
        rows.append(
            {
                "stage_tok_s": stage_tokens / stage_s,
                "raw_tok_s": raw_tokens / raw_s,
                "stage_tokens": stage_tokens,
                "raw_tokens": raw_tokens,
                "engine_calls": len(calls),
            }
        )
        print(json.dumps(rows[-1]))
    stage = sum(r["stage_tokens"] for r in rows) / sum(r["stage_tokens"] / r["stage_tok_s"] for r in rows)
    raw = sum(r["raw_tokens"] for r in rows) / sum(r["raw_tokens"] / r["raw_tok_s"] for r in rows)
    result = {
        "ratio": stage / raw,
        "stage_tok_s": stage,
        "raw_tok_s": raw,
        "docs": args.docs,
        "n": args.n,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
    }
    if args.device != "cpu":
        result["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        result["dtype"] = cfg.model.dtype
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
