"""``pop-nemo synthesize | pairs | dpo``: the paper's offline recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from pop_nemo.commands import add_run_options


def _config(args: argparse.Namespace, extra: list[str] | None = None):
    from pop_nemo.config import load_config

    return load_config(args.config, list(extra or []) + list(args.overrides))


def run_synthesize(args: argparse.Namespace) -> int:
    from pop_nemo.selfplay.synthesize import synthesize

    cfg = _config(args)
    synthesize(cfg, args.output_dir or cfg.output_dir, fresh=args.fresh)
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from pop_nemo.rl.pairs import PairFilter, make_pairs, read_records, stats_table, write_pairs
    from pop_nemo.run_output import console

    cfg = _config(args)
    records = read_records(Path(args.input))
    pairs, stats = make_pairs(records, PairFilter.from_config(cfg.offline), task=args.task)
    out = Path(args.output) if args.output else Path(args.input).with_name("pairs.jsonl")
    stats_path = write_pairs(out, pairs, stats)
    console.print(stats_table(stats))
    console.print(f"{stats.pairs} pairs → {out} (statistics: {stats_path})")
    return 0


def run_dpo(args: argparse.Namespace) -> int:
    from pop_nemo import launch
    from pop_nemo.rl.dpo import train_dpo

    if args.nproc:
        return launch.relaunch(args)
    cfg = launch.rank_config(args.config, args.overrides, args.output_dir)
    train_dpo(cfg, args.pairs, cfg.output_dir, fresh=args.fresh, require_resume=args.resume)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "synthesize",
        help="offline self-play over a corpus: problems, N answers, rubrics and scores → DIR/records.jsonl",
    )
    s.add_argument("--config", required=True, help="YAML config, e.g. conf/offline/smoke_cpu.yaml")
    s.add_argument("--output-dir", help="output folder (default: output_dir of the config); reruns resume")
    s.add_argument("--fresh", action="store_true", help="discard the folder's records and progress first")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. offline.num_documents=64 offline.n=8")
    s.set_defaults(func=run_synthesize)

    p = sub.add_parser("pairs", help="the paper's filter: best/worst DPO pairs from synthesized records")
    p.add_argument("--input", required=True, help="records.jsonl written by `pop-nemo synthesize` (or `train`)")
    p.add_argument("--output", help="pairs JSONL (default: pairs.jsonl beside --input)")
    p.add_argument("--config", help="YAML config whose offline.* filter settings to use (default: the paper's)")
    p.add_argument("--task", help="task of records that do not name theirs (records of `pop-nemo train`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. offline.best_of_n=16")
    p.set_defaults(func=run_pairs)

    d = sub.add_parser("dpo", help="DPO on pairs (sigmoid loss, reference = the initial model)")
    d.add_argument("--config", required=True, help="YAML config, e.g. conf/offline/dpo_smoke_cpu.yaml")
    d.add_argument("--pairs", required=True, help="pairs JSONL written by `pop-nemo pairs`")
    d.add_argument("--output-dir", help="run folder (default: output_dir of the config)")
    add_run_options(d)
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.05 dpo.batch_size=8")
    d.set_defaults(func=run_dpo)
