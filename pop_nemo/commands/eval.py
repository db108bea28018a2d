"""``pop-nemo eval``: held-out self-play and HealthBench-format rubric benchmarks, with CIs."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch

    from pop_nemo.config import load_config
    from pop_nemo.errors import UserError
    from pop_nemo.eval import healthbench as hb
    from pop_nemo.eval import runner
    from pop_nemo.models import resolve_model_path
    from pop_nemo.run_output import console

    overrides = list(args.overrides)
    if args.healthbench:
        overrides.append(f"eval.healthbench={args.healthbench}")
    if args.no_heldout:
        overrides.append("eval.num_documents=0")
    cfg = load_config(args.config, overrides)
    out = Path(args.output_dir)
    # Everything the user can get wrong fails here, before a model loads.
    try:
        runner.check_backends(cfg)
        if args.compare:
            runner.load_eval_dir(Path(args.compare))
            if Path(args.compare).resolve() == out.resolve():
                raise UserError("--compare must name another evaluation folder than --output-dir")
        if cfg.eval.healthbench:
            hb.load(hb.resolve_path(cfg.eval.healthbench), cfg.eval.healthbench_limit)
        if cfg.eval.num_documents == 0 and not cfg.eval.healthbench:
            raise UserError("nothing to evaluate: eval.num_documents=0 and no eval.healthbench file")
        weights, label, step = runner.resolve_model(args.model or cfg.model.path)
        reference_path = resolve_model_path(cfg.model.path)
    except (hb.HealthBenchError, runner.EvalError) as e:
        raise UserError(str(e)) from None
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.eval.seed)

    console.print(f"[bold]pop-nemo eval[/] model={label} reference={cfg.model.path} task={cfg.task} → {out}")
    reference = runner.load_engine(cfg, reference_path, cfg.model.path, cfg.rollout.max_batch)
    same = weights == reference_path or (
        Path(weights).exists() and Path(weights).resolve() == Path(reference_path).resolve()
    )
    model = reference if same else runner.load_engine(cfg, weights, cfg.model.path, cfg.rollout.max_batch)
    try:
        evaluator = runner.Evaluator(cfg, reference_path, reference, reference.tokenizer)
        summary = evaluator.run(model, out, label, step)
        comparison = runner.compare(cfg, Path(args.compare), out) if args.compare else None
    except (hb.HealthBenchError, runner.EvalError) as e:
        raise UserError(str(e)) from None
    runner.print_summary(summary, comparison)
    console.print(f"outputs in {out}")
    return 0


def register(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a model: held-out self-play (cached problems and rubrics) and HealthBench-format rubrics",
    )
    e.add_argument("--config", required=True, help="YAML config, e.g. conf/eval_cpu.yaml (model.path = the reference)")
    e.add_argument(
        "--model",
        help="model to evaluate: a run folder (latest checkpoint), a checkpoint folder, an HF folder, a hub id "
        "or 'smollm2' (default: model.path)",
    )
    e.add_argument("--output-dir", required=True, help="folder for summary.json and the per-answer JSONL")
    e.add_argument("--compare", help="a baseline's evaluation folder: paired differences and win rates against it")
    e.add_argument("--healthbench", help="HealthBench-format JSONL ('example' = the bundled tiny file)")
    e.add_argument("--no-heldout", action="store_true", help="skip the held-out self-play evaluation")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.samples=8 eval.num_documents=64")
    e.set_defaults(func=run)
