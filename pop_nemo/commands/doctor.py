"""``pop-nemo doctor``: the software stack and the device."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pop_nemo.doctor import report

    return 0 if report() or not args.strict else 1


def register(sub) -> None:
    d = sub.add_parser("doctor", help="report the software stack and the device")
    d.add_argument("--strict", action="store_true", help="exit 1 when a required component is missing")
    d.set_defaults(func=run)
