"""``pop-nemo train``: online POP."""

from __future__ import annotations

import argparse

from pop_nemo.commands import add_run_options


def run(args: argparse.Namespace) -> int:
    from pop_nemo import launch
    from pop_nemo.rl.grpo import train

    if getattr(args, "nproc", None):
        return launch.relaunch(args)
    cfg = launch.rank_config(args.config, args.overrides, args.output_dir)
    train(cfg, fresh=args.fresh, require_resume=args.resume)
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="online POP (GRPO / RLOO): self-play with the current policy every step")
    t.add_argument("--config", required=True, help="YAML config, e.g. conf/smoke_cpu.yaml")
    t.add_argument("--output-dir", help="run folder (overrides output_dir)")
    add_run_options(t)
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10 rollout.n=8")
    t.set_defaults(func=run)
