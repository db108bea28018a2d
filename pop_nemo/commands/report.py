"""``pop-nemo report``: a self-contained HTML report (and PNGs) of a run."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from pop_nemo.errors import UserError
    from pop_nemo.run_output import console
    from pop_nemo.run_report import ReportError, build_report

    try:
        path = build_report(
            Path(args.run),
            Path(args.output) if args.output else None,
            [Path(d) for d in args.eval or []],
            examples=args.examples,
        )
    except ReportError as e:
        raise UserError(str(e)) from None
    console.print(f"report: {path} (PNGs in {path.parent})")
    return 0


def register(sub) -> None:
    r = sub.add_parser("report", help="HTML report (and PNGs) of a run: metrics over steps, examples, evaluations")
    r.add_argument("--run", required=True, help="run folder (metrics.jsonl, records.jsonl, pairs.jsonl) or eval folder")
    r.add_argument("--output", help="report folder (default: RUN/report)")
    r.add_argument("--eval", action="append", metavar="DIR", help="a `pop-nemo eval` folder to include (repeatable)")
    r.add_argument("--examples", type=int, default=6, help="example problems shown (default 6)")
    r.set_defaults(func=run)
