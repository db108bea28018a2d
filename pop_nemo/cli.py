"""``pop-nemo``: train | doctor (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import sys

from pop_nemo.logging import console


def _train(args: argparse.Namespace) -> int:
    from pop_nemo.config import load_config
    from pop_nemo.rl.grpo import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    train(cfg, fresh=args.fresh, require_resume=args.resume)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pop_nemo.doctor import report

    ok = report()
    return 0 if ok or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pop-nemo", description="POP: rubric-based self-play on pretraining text")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="online POP (GRPO / RLOO), self-play every step")
    t.add_argument("--config", required=True, help="YAML config, e.g. conf/smoke_cpu.yaml")
    t.add_argument("--output-dir", help="run folder (overrides output_dir)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (default: resume if one exists)")
    g.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoints and outputs first")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10 rollout.n=8")
    t.set_defaults(func=_train)

    d = sub.add_parser("doctor", help="report the software stack and the device")
    d.add_argument("--strict", action="store_true", help="exit 1 when a required component is missing")
    d.set_defaults(func=_doctor)

    args = parser.parse_args(argv)
    from pop_nemo.checkpoint import ResumeError
    from pop_nemo.config import ConfigError
    from pop_nemo.corpus import CorpusError
    from pop_nemo.models import ModelPathError

    try:
        return args.func(args)
    except (ConfigError, CorpusError, ModelPathError, ResumeError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; the last checkpoint is intact, run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
