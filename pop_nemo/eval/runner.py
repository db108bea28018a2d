"""Run the evaluation suites on one model, write their outputs, and compare two models.

Used by ``pop-nemo eval`` and, every ``eval.every_steps``, by the online loop
(:func:`evaluate_during_training`). Output folder of one evaluation::

    summary.json      numbers only (deterministic given the config and models)
    heldout.jsonl     one row per evaluated answer: reply, extracted answer, ratings, reward
    problems.jsonl    the cached problems and rubrics it was scored against
    healthbench.jsonl one row per conversation: reply, verdict per rubric item, score
    comparison.json   with ``--compare``: paired differences and win rates against a baseline
    timing.json       seconds per part (kept out of summary.json, which must not vary)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pop_nemo.config import Config, ConfigError
from pop_nemo.critic.base import Critic
from pop_nemo.engines.base import Engine, Sampling
from pop_nemo.eval import healthbench as hb
from pop_nemo.eval import heldout
from pop_nemo.eval.stats import paired_comparison
from pop_nemo.jsonl import read_rows
from pop_nemo.run_output import append_jsonl, console
from pop_nemo.selfplay.stage import request_seed

SUMMARY = "summary.json"


class EvalError(ValueError):
    """Inputs of an evaluation that the user must fix (a baseline of other problems, a bad file)."""


def eval_config(cfg: Config) -> Config:
    """``cfg`` with the eval-specific token limits of the rubric writer and the judge applied."""
    r, e = cfg.rollout, cfg.eval
    rubric = r.rubric.model_copy(update={"max_new_tokens": e.rubric_max_new_tokens or r.rubric.max_new_tokens})
    judge = r.judge.model_copy(update={"max_new_tokens": e.judge_max_new_tokens or r.judge.max_new_tokens})
    return cfg.model_copy(update={"rollout": r.model_copy(update={"rubric": rubric, "judge": judge})})


def build_reference_critic(cfg: Config, reference: Engine, tokenizer: Any) -> Critic:
    """Rubric writer and judge on the frozen reference (or on the critic server, ``critic.url``).

    Never the evaluated model: a model that judged itself would move its own yardstick.
    """
    from pop_nemo import build

    ecfg = eval_config(cfg)
    return build.build_critic(ecfg, build.Backends(None, reference, reference, tokenizer))  # type: ignore[arg-type]


class Evaluator:
    """Holds the reference model's roles (problem writer, rubric writer, judge, grader)."""

    def __init__(self, cfg: Config, reference_path: str, reference: Engine, tokenizer: Any, log=None):
        self.cfg = eval_config(cfg)
        self.reference_path, self.reference, self.tokenizer = reference_path, reference, tokenizer
        self.critic = build_reference_critic(cfg, reference, tokenizer)
        self.log = log or (lambda msg: console.print(msg))
        self._grader: Engine | None = None
        self._problems: tuple[str, Path, list[dict[str, Any]]] | None = None
        e = self.cfg.eval
        self.conversations = hb.load(hb.resolve_path(e.healthbench), e.healthbench_limit) if e.healthbench else []

    def grader(self) -> Engine:
        if self._grader is None:
            self._grader = build_grader(self.cfg, self.reference)
            if hasattr(self._grader, "wait_ready"):
                self._grader.wait_ready(300.0)
        return self._grader

    def problems(self) -> tuple[str, Path, list[dict[str, Any]]]:
        if self._problems is None:
            self._problems = heldout.load_or_write_problems(
                self.cfg, self.reference_path, self.reference, self.critic, self.log
            )
        return self._problems

    def run(self, model: Engine, out_dir: Path, label: str, step: int | None = None) -> dict[str, Any]:
        cfg, e = self.cfg, self.cfg.eval
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("heldout.jsonl", "healthbench.jsonl", "problems.jsonl", "comparison.json"):
            (out_dir / name).unlink(missing_ok=True)
        summary: dict[str, Any] = {"label": label, "step": step, "task": cfg.task, "seed": e.seed}
        timing: dict[str, float] = {}
        if e.num_documents > 0:
            t = time.perf_counter()
            key, path, rows = self.problems()
            timing["problems"] = time.perf_counter() - t
            shutil.copyfile(path, out_dir / "problems.jsonl")
            problems = heldout.valid_problems(rows)
            t = time.perf_counter()
            answers = heldout.answer_and_judge(cfg, problems, model, self.critic)
            timing["heldout"] = time.perf_counter() - t
            append_jsonl(out_dir / "heldout.jsonl", answers)
            summary["heldout"] = {
                "problems_key": key,
                **heldout.summarize(cfg, answers, num_problems=len(problems), num_docs=len(rows)),
            }
        if self.conversations:
            t = time.perf_counter()
            graded = hb.evaluate(
                self.conversations,
                model,
                self.grader(),
                Sampling(temperature=0.0, max_new_tokens=e.healthbench_max_new_tokens),
                e.grader_max_new_tokens,
                e.grader_explanation_chars if cfg.rollout.guide.enabled and e.judge_guide_format != "none" else None,
                seed=e.seed,
            )
            timing["healthbench"] = time.perf_counter() - t
            records = [g.to_record() for g in graded]
            append_jsonl(out_dir / "healthbench.jsonl", records)
            path = hb.resolve_path(e.healthbench or "")
            summary["healthbench"] = {
                "file": str(path),
                "digest": hb.file_digest(path),
                **hb.summarize(records, e.bootstrap, e.confidence, e.seed),
            }
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        (out_dir / "timing.json").write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
        return summary


# ---------------------------------------------------------------- comparing two evaluations


def load_eval_dir(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(summary, held-out answer rows, HealthBench rows)`` of an evaluation folder."""
    s = path / SUMMARY
    if not s.is_file():
        raise EvalError(f"{path} is not an evaluation folder (no {SUMMARY}); run `pop-nemo eval` into it first")

    def rows(name: str) -> list[dict[str, Any]]:
        f = path / name
        return read_rows(f) if f.is_file() else []

    return json.loads(s.read_text(encoding="utf-8")), rows("heldout.jsonl"), rows("healthbench.jsonl")


def compare(cfg: Config, baseline_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Paired comparison of ``model_dir`` (B) against ``baseline_dir`` (A), written to B/comparison.json.

    Held-out: per problem, the mean reward of each mode; HealthBench: per conversation score.
    Both sides must have been scored on the same cached problems (and the same benchmark file).
    """
    e = cfg.eval
    sa, ha, ba = load_eval_dir(baseline_dir)
    sb, hb_rows, bb = load_eval_dir(model_dir)
    out: dict[str, Any] = {"baseline": sa["label"], "model": sb["label"], "baseline_dir": str(baseline_dir)}
    if "heldout" in sa and "heldout" in sb:
        ka, kb = sa["heldout"]["problems_key"], sb["heldout"]["problems_key"]
        if ka != kb:
            raise EvalError(
                f"{baseline_dir} was scored on other problems (key {ka}) than this evaluation (key {kb}): "
                "compare evaluations made with the same reference model and eval settings"
            )
        out["heldout"] = {}
        for mode in heldout.MODES:
            if mode in sa["heldout"] and mode in sb["heldout"]:
                seed = request_seed(e.seed, "paired", mode)
                p = paired_comparison(
                    heldout.per_problem_reward(ha, mode),
                    heldout.per_problem_reward(hb_rows, mode),
                    e.bootstrap,
                    e.confidence,
                    seed,
                )
                out["heldout"][mode] = p.to_dict()
    if "healthbench" in sa and "healthbench" in sb:
        da, db = sa["healthbench"]["digest"], sb["healthbench"]["digest"]
        if da != db:
            raise EvalError(f"{baseline_dir} used another HealthBench file (digest {da}) than this evaluation ({db})")
        p = paired_comparison(
            hb.per_conversation_score(ba),
            hb.per_conversation_score(bb),
            e.bootstrap,
            e.confidence,
            request_seed(e.seed, "paired", "healthbench"),
        )
        out["healthbench"] = p.to_dict()
    (model_dir / "comparison.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- flat metrics (for the training log)


def flat_metrics(summary: dict[str, Any], prefix: str = "eval/") -> dict[str, float | int | None]:
    """``eval/greedy/reward``, ``eval/greedy/reward_ci_low``, ..., ``eval/healthbench/score``."""
    m: dict[str, float | int | None] = {}
    h = summary.get("heldout")
    if h:
        m[f"{prefix}num_problems"] = h["num_problems"]
        for mode in heldout.MODES:
            if mode not in h:
                continue
            s = h[mode]
            for name in ("reward", "format_valid_rate", "length_tokens"):
                m[f"{prefix}{mode}/{name}"] = s[name]["mean"]
                m[f"{prefix}{mode}/{name}_ci_low"] = s[name]["low"]
                m[f"{prefix}{mode}/{name}_ci_high"] = s[name]["high"]
            m[f"{prefix}{mode}/judge_failures"] = s["judge_failures"]
    b = summary.get("healthbench")
    if b:
        m[f"{prefix}healthbench/score"] = b["score"]["mean"]
        m[f"{prefix}healthbench/score_ci_low"] = b["score"]["low"]
        m[f"{prefix}healthbench/score_ci_high"] = b["score"]["high"]
        m[f"{prefix}healthbench/judge_failures"] = b["judge_failures"]
        m[f"{prefix}healthbench/unscorable"] = b["unscorable"]
    return m


# ---------------------------------------------------------------- models


def resolve_model(spec: str) -> tuple[str, str, int | None]:
    """``(weights path or hub id, label, checkpoint step)`` for ``--model``.

    Accepts a run folder (its latest checkpoint), a checkpoint folder (``step_000002``), an HF
    folder, a hub id, or ``smollm2``.
    """
    from pop_nemo.models import resolve_model_path

    p = Path(spec).expanduser()
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    if (p / "policy" / "model" / "config.json").is_file():
        state = p / "state.json"
        step = json.loads(state.read_text())["step"] if state.is_file() else None
        return str(p / "policy" / "model"), spec, step
    return resolve_model_path(spec), spec, None


def load_engine(cfg: Config, path: str, tokenizer_fallback: str, max_batch: int):
    """An HF engine on ``path`` (this rank's GPU when there is one); the tokenizer comes from
    ``path`` if it has one (checkpoints do not)."""
    from pop_nemo import build
    from pop_nemo.models import load_tokenizer, resolve_model_path

    p = Path(path)
    has_tok = not p.is_dir() or any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(path if has_tok else resolve_model_path(tokenizer_fallback))
    weights = resolve_model_path(path) if not p.is_dir() else path
    device = build.this_rank_engine_device()
    return build.hf_engine(weights, tok, dtype=cfg.model.dtype, max_batch=max_batch, seed=cfg.eval.seed, device=device)


def build_grader(cfg: Config, reference: Engine) -> Engine:
    """The HealthBench grader: an OpenAI-compatible endpoint (``eval.judge_url``), another HF
    model (``eval.judge_model``), or the reference model itself."""
    e = cfg.eval
    if e.judge_url:
        from pop_nemo.engines.openai import OpenAIEngine

        return OpenAIEngine.from_env(
            e.judge_url, e.judge_model or "default", e.judge_api_key_env, guide_format=e.judge_guide_format
        )
    if e.judge_model is None or e.judge_model == cfg.model.path:
        return reference
    return load_engine(cfg, e.judge_model, cfg.model.path, cfg.rollout.max_batch)


def check_backends(cfg: Config) -> None:
    if cfg.rollout.backend != "hf":
        raise ConfigError(f"pop-nemo eval runs models with the 'hf' engine; rollout.backend={cfg.rollout.backend!r}")


# ---------------------------------------------------------------- the online loop's hook

_IN_LOOP: dict[tuple[int, int], Evaluator] = {}


def evaluate_during_training(
    cfg: Config, model: Engine, reference: Engine, tokenizer: Any, step: int, run_dir: Path
) -> dict[str, Any]:
    """Evaluate the current policy's engine (``model``) on the cached held-out problems, graded
    by the ``reference`` engine (``tokenizer`` is the reference critic's).

    Called by the online loop every ``eval.every_steps``; writes ``run_dir/eval/step_XXXXXX/`` and
    returns flat ``eval/...`` metrics for the step's metrics row. Problems and rubrics come from
    the same cache as ``pop-nemo eval`` with this config, so the numbers are comparable.
    """
    from pop_nemo.models import resolve_model_path

    key = (id(cfg), id(reference))
    if key not in _IN_LOOP:
        _IN_LOOP.clear()
        _IN_LOOP[key] = Evaluator(cfg, resolve_model_path(cfg.model.path), reference, tokenizer)
    t = time.perf_counter()
    summary = _IN_LOOP[key].run(model, Path(run_dir) / "eval" / f"step_{step:06d}", f"step {step}", step)
    return {**flat_metrics(summary), "eval/time_s": time.perf_counter() - t}


# ---------------------------------------------------------------- console


def _fmt(est: dict[str, Any] | None, pct: bool = False) -> str:
    if not est or est.get("mean") is None:
        return "—"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    return f"{f(est['mean'])} [{f(est['low'])}, {f(est['high'])}]"


def _width() -> int | None:
    """Tables keep one line per row in logs (rich wraps at 80 columns when not on a terminal)."""
    return None if console.is_terminal else 160


def print_summary(summary: dict[str, Any], comparison: dict[str, Any] | None = None) -> None:
    from rich.table import Table

    h = summary.get("heldout")
    if h:
        t = Table(title=f"held-out self-play: {summary['label']} ({h['num_problems']}/{h['num_documents']} problems)")
        for col in ("mode", "reward", "format valid", "length (tokens)", "judge failures"):
            t.add_column(col)
        for mode in heldout.MODES:
            if mode in h:
                s = h[mode]
                t.add_row(
                    mode,
                    _fmt(s["reward"]),
                    _fmt(s["format_valid_rate"], pct=True),
                    _fmt(s["length_tokens"]),
                    str(s["judge_failures"]),
                )
        console.print(t, width=_width())
    b = summary.get("healthbench")
    if b:
        console.print(
            f"HealthBench-format: score {_fmt(b['score'])} over {b['scored']}/{b['num_conversations']} conversations"
            f" ({b['unscorable']} unscorable, {b['judge_failures']} item judge failures)"
        )
    if comparison:
        t = Table(title=f"paired: {comparison['model']} vs {comparison['baseline']}")
        for col in ("suite", "n", "baseline", "model", "difference", "win rate", "W/L/T", "sign test p"):
            t.add_column(col)
        rows = [(f"held-out {m}", p) for m, p in comparison.get("heldout", {}).items()]
        if "healthbench" in comparison:
            rows.append(("healthbench", comparison["healthbench"]))
        for name, p in rows:
            ma, mb, sp = p["mean_a"], p["mean_b"], p["sign_test_p"]
            t.add_row(
                name,
                str(p["n"]),
                "—" if ma is None else f"{ma:.3f}",
                "—" if mb is None else f"{mb:.3f}",
                _fmt(p["diff"]),
                _fmt(p["win_rate"], pct=True),
                f"{p['wins']}/{p['losses']}/{p['ties']}",
                "—" if sp is None else f"{sp:.3g}",
            )
        console.print(t, width=_width())
