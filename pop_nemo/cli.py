"""``pop-nemo``: the console script. Subcommands live in ``pop_nemo.commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pop_nemo import commands, distributed
from pop_nemo.errors import UserError
from pop_nemo.run_output import console


def _user_errors() -> tuple[type[BaseException], ...]:
    from pop_nemo.config import ConfigError
    from pop_nemo.corpus import CorpusError
    from pop_nemo.models import ModelPathError

    return (UserError, ConfigError, CorpusError, ModelPathError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pop-nemo", description="POP: rubric-based self-play on pretraining text")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"pop_nemo.commands.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        # A non-zero rank's console is quiet (rank 0 reports for all), but not for its own error:
        # a rank that fails alone must say why before torchrun/srun stops the others.
        console.quiet = False
        where = f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
        console.print(f"[red]error{where}:[/] {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; the last checkpoint is intact: run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
