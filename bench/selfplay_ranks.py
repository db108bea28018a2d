"""Data-parallel self-play: one step's self-play on 1 rank vs R ranks, each playing its share.

Every rank builds its own rollout engines (the policy's and the frozen reference, as the trainer
does) and an in-process critic, takes the step's documents, plays its contiguous share of the
groups (``pop_nemo.distributed.shard``) and gathers the shares, exactly as ``pop-nemo train`` does
with several ranks; there is no policy update. Reported per rank count: the self-play seconds
(the slowest rank's, what a step waits for), the tokens each rank generated, and whether the
gathered records equal the 1-rank run's. By default the threads are split so every rank count
uses the same cores; ``--threads-per-rank`` gives each rank its own (hardware that grows with
the ranks, as a GPU per rank does).

    .venv/bin/python bench/selfplay_ranks.py --docs 4 --ranks 1 2
    .venv/bin/python bench/selfplay_ranks.py --docs 4 --ranks 1 2 --threads-per-rank 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from pop_nemo.launch import torchrun_command


def worker(args: argparse.Namespace) -> None:
    """One rank (under torch.distributed.run): its share of the step's self-play."""
    from pop_nemo import build, distributed
    from pop_nemo.config import load_config
    from pop_nemo.models import load_tokenizer, resolve_model_path

    torch.set_num_threads(args.threads)
    distributed.init_distributed()
    cfg = load_config(args.config, [f"rollout.docs_per_step={args.docs}", f"rollout.n={args.answers}", *args.overrides])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    policy_engine, reference_engine = build.rollout_engines(cfg, path, tok)
    pick = {"policy": policy_engine, "reference": reference_engine}
    critic = build.local_critic(cfg, pick[cfg.roles.rubric], pick[cfg.roles.judge])
    selfplay = build.build_selfplay(cfg, pick[cfg.roles.proposer], policy_engine, critic)
    docs = build.build_corpus(cfg).take(args.docs)
    mine = distributed.shard(len(docs), distributed.world_size(), distributed.rank())
    distributed.all_gather(None)  # start together: model loading is not part of self-play
    t = time.perf_counter()
    examples, _ = selfplay.run(docs[mine.start : mine.stop], 0, mine.start)
    seconds = time.perf_counter() - t
    tokens = sum(e.stats["generated_tokens"] for e in {id(e): e for e in pick.values()}.values())
    shares = distributed.all_gather((seconds, tokens, [e.to_record() for e in examples]))
    if distributed.rank() == 0:
        records = [r for _, _, recs in shares for r in recs]
        digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
        result = {
            "ranks": len(shares),
            "selfplay_s": max(s for s, _, _ in shares),
            "tokens_per_rank": [t for _, t, _ in shares],
            "records_sha256": digest,
        }
        Path(args.out).write_text(json.dumps(result))


def run(ranks: int, args: argparse.Namespace, out: Path) -> dict:
    threads = args.threads_per_rank or max(1, args.cores // ranks)
    worker = [__file__, "--worker", "--out", str(out), "--config", args.config, "--docs", str(args.docs)]
    worker += ["--answers", str(args.answers), "--threads", str(threads), *args.overrides]
    cmd = torchrun_command(ranks, worker)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="conf/smoke_cpu.yaml")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--answers", type=int, default=4, help="rollout.n")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads in all, split over the ranks")
    ap.add_argument(
        "--threads-per-rank",
        type=int,
        help="every rank gets this many threads instead (hardware grows with the ranks, as GPUs do)",
    )
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            results.append(run(ranks, args, Path(tmp) / f"ranks_{ranks}.json"))
            r = results[-1]
            print(
                f"{ranks} rank(s): self-play {r['selfplay_s']:.1f} s, tokens per rank {r['tokens_per_rank']}, "
                f"records {'equal to' if r['records_sha256'] == results[0]['records_sha256'] else 'DIFFERENT from'} "
                f"the {args.ranks[0]}-rank run's",
                flush=True,
            )
    base = results[0]
    for r in results[1:]:
        print(f"speed-up {args.ranks[0]} → {r['ranks']} ranks: {base['selfplay_s'] / r['selfplay_s']:.2f}x")
    summary = {
        "machine": platform.processor() or platform.machine(),
        "cores": args.cores,
        "threads_per_rank": args.threads_per_rank,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
