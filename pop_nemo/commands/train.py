"""``pop-nemo train``: online POP."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pop_nemo import launch
    from pop_nemo.config import load_config
    from pop_nemo.logging import console
    from pop_nemo.rl.grpo import train

    if getattr(args, "nproc", None):
        return launch.relaunch_train(args)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    launch.discover_env()  # torchrun / srun ranks: rank 0 owns the outputs
    if rank_overrides := launch.rank_overrides(cfg.output_dir):
        cfg = load_config(args.config, overrides + rank_overrides)
        console.quiet = True  # rank 0 reports; the other ranks' lines would repeat it
    train(cfg, fresh=args.fresh, require_resume=args.resume)
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="online POP (GRPO / RLOO): self-play with the current policy every step")
    t.add_argument("--config", required=True, help="YAML config, e.g. conf/smoke_cpu.yaml")
    t.add_argument("--output-dir", help="run folder (overrides output_dir)")
    g = t.add_mutually_exclusive_group()
    g.add_argument(
        "--resume", action="store_true", help="require a checkpoint to resume from (default: resume if one exists)"
    )
    g.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoints and outputs first")
    t.add_argument(
        "--nproc",
        type=int,
        help="run as this many ranks on this node (torchrun); for policy.backend=megatron. "
        "Under torchrun or srun, leave it out",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10 rollout.n=8")
    t.set_defaults(func=run)
