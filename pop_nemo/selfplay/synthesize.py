"""Offline synthesis (the paper's data): propose → solve ×N → rubric → judge over a corpus.

``synthesize(cfg, DIR)`` takes the first ``offline.num_documents`` documents of the corpus'
deterministic order and runs :class:`~pop_nemo.selfplay.stage.SelfPlay` on them
``offline.chunk_size`` documents at a time: every stage is one batched engine call across the
chunk's documents (proposer retries and solver re-samples batch the failures only). Each
document's group id is its index in that order, and every request's seed is
``request_seed(seed, 0, group_id, role, attempt)``, so what a document gets does not depend on
where a run was interrupted.

No example is lost or duplicated after ``kill -9``: each chunk is committed through
:mod:`~pop_nemo.selfplay.synthesis_log`, and a restart continues with the next uncommitted
document. A restart with settings that would change the records is refused (``--fresh`` starts
over); ``offline.num_documents`` may grow, to synthesize more.

Roles can be played by an OpenAI-compatible endpoint (``offline.teacher``; the engines come
from ``build.synthesis_engines``); the paper's ablations are ``offline.proposer_knowledge``,
``offline.rubric_knowledge`` (:mod:`~pop_nemo.selfplay.knowledge_ablation`) and
``offline.scoring`` (pointwise, or :mod:`~pop_nemo.selfplay.comparative`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pop_nemo import build
from pop_nemo.checkpoint import atomic_write_text, resume_guard
from pop_nemo.config import SELFPLAY_ROLES, Config
from pop_nemo.corpus import Document
from pop_nemo.critic.base import Critic
from pop_nemo.engines.base import Engine
from pop_nemo.run_output import console
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.comparative import ComparativeJudge
from pop_nemo.selfplay.knowledge_ablation import NONE_KNOWLEDGE, BlindRubricWriter
from pop_nemo.selfplay.stage import Example
from pop_nemo.selfplay.synthesis_log import RECORDS, CommitLog, Progress, count


def role_sources(cfg: Config) -> dict[str, str]:
    """Who played each role (recorded with every example): the teacher's model or the configured one."""
    t = cfg.offline.teacher
    return {r: (t.model if r in t.roles else cfg.model.path) for r in SELFPLAY_ROLES}


class Synthesizer:
    """Self-play for a list of documents, batched per chunk (used by the CLI and the benchmark)."""

    def __init__(self, cfg: Config, engines: dict[str, Engine]):
        off = cfg.offline
        self.cfg, self.off, self.engines = cfg, off, engines
        task = roles.get_task(cfg.task)
        limits = build.guide_limits(cfg)
        critic: Critic = build.local_critic(cfg, engines["rubric"], engines["judge"])
        if not (off.rubric_knowledge and off.proposer_knowledge):
            critic = BlindRubricWriter(critic)
        self.selfplay = build.build_selfplay(
            cfg,
            engines["proposer"],
            engines["solver"],
            critic,
            n=off.n,
            proposer_retries=off.proposer_retries,
            solver_resample=off.solver_resample,
        )
        self.comparative = (
            ComparativeJudge(off.scoring, engines["judge"], build.sampling(cfg.rollout.judge), limits, cfg.seed)
            if off.scoring != "pointwise"
            else None
        )
        self.extra = {
            "step": 0,
            "model": cfg.model.path,
            "task": cfg.task,
            "solver_system": task.solver_system,
            "roles": role_sources(cfg),
            "scoring": off.scoring,
        }

    def run(self, docs: list[Document], first_group_id: int) -> tuple[list[Example], dict[str, float]]:
        sp = self.selfplay
        shown = docs if self.off.proposer_knowledge else [Document(d.id, NONE_KNOWLEDGE) for d in docs]
        examples = [Example(first_group_id + i, d) for i, d in enumerate(shown)]
        seconds: dict[str, float] = {}
        stages = [("propose", sp.propose), ("solve", sp.solve), ("rubric", sp.rubric)]
        stages.append(("judge", sp.judge if self.comparative is None else lambda ex, _s: self.comparative.judge(ex)))
        for name, fn in stages:
            t = time.perf_counter()
            fn(examples, 0)
            seconds[name] = time.perf_counter() - t
            if name == "propose":  # the record keeps the real document
                for e, d in zip(examples, docs):
                    e.doc = d
        return examples, seconds

    def records(self, examples: list[Example]) -> list[dict[str, Any]]:
        return [e.to_record(**self.extra) for e in examples]


def _generated_tokens(engines: dict[str, Engine]) -> int:
    unique = {id(e): e for e in engines.values()}
    return sum(e.stats.get("generated_tokens", 0) for e in unique.values())


def _count_text(c: dict[str, int]) -> str:
    return (
        f"problems {c['problems']}/{c['documents']} · answers {c['valid_answers']}/{c['answers']} tagged"
        f" · rubrics {c['rubrics']} · scored {c['scored']}"
    )


def summarize(state: Progress, planned: int) -> dict[str, Any]:
    c = state.counts

    def rate(a: str, b: str) -> float | None:
        return c[a] / c[b] if c[b] else None

    return {
        "documents_planned": planned,
        **c,
        "problem_valid_rate": rate("problems", "documents"),
        "answer_format_valid_rate": rate("valid_answers", "answers"),
        "rubric_valid_rate": rate("rubrics", "problems"),
        "scored_rate": rate("scored", "answers"),
        "seconds": state.seconds,
        "examples_per_s": c["documents"] / state.seconds if state.seconds else None,
        "generated_tokens": state.generated_tokens,
        "tokens_per_s": state.generated_tokens / state.seconds if state.seconds else None,
    }


def synthesize(cfg: Config, output_dir: str | Path, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) synthesis into ``output_dir``; return the summary."""
    import torch
    import yaml
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    out = Path(output_dir)
    off = cfg.offline
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    for w in build.guide_budget_warnings(cfg):
        console.print(f"[yellow]warning:[/] {w}")
    corpus = build.build_corpus(cfg)
    if off.num_documents > len(corpus):
        console.print(
            f"[yellow]note:[/] offline.num_documents={off.num_documents} is more than the corpus' {len(corpus)} "
            "documents; later ones repeat documents (new seeds, so new problems)"
        )
    docs = corpus.take(off.num_documents)
    log = CommitLog(out)
    if fresh:
        log.reset()
    state = log.open(resume_guard(cfg, "synthesize"), docs)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    console.print(
        f"[bold]pop-nemo synthesize[/] task={cfg.task} corpus={cfg.corpus.source} documents={len(docs)} "
        f"n={off.n} scoring={off.scoring} roles={role_sources(cfg)} → {out / RECORDS}"
    )
    if state.docs_done:
        console.print(f"resuming after {state.docs_done} committed documents")
    if state.docs_done < len(docs):
        engines = build.synthesis_engines(cfg)
        synth = Synthesizer(cfg, engines)
        bar = Bar(
            TextColumn("[bold]synthesize"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} docs"),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not cfg.logging.progress,
            transient=True,
        )
        with bar:
            task_id = bar.add_task(
                "synthesize", total=len(docs), completed=state.docs_done, counts=_count_text(state.counts)
            )
            for start in range(state.docs_done, len(docs), off.chunk_size):
                chunk = docs[start : start + off.chunk_size]
                t, tok0 = time.perf_counter(), _generated_tokens(engines)
                examples, seconds = synth.run(chunk, first_group_id=start)
                for k, v in count(examples).items():
                    state.counts[k] += v
                state.seconds += time.perf_counter() - t
                state.generated_tokens += _generated_tokens(engines) - tok0
                log.commit(state, synth.records(examples), chunk[-1].id)
                bar.update(task_id, completed=state.docs_done, counts=_count_text(state.counts))
                if not cfg.logging.progress:
                    stage = " ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
                    console.print(f"chunk {start}–{start + len(chunk) - 1}: {_count_text(state.counts)} | {stage}")
        for e in {id(e): e for e in engines.values()}.values():
            e.close()
    summary = summarize(state, len(docs))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    console.print(summary_table(summary))
    return summary


def summary_table(s: dict[str, Any]):
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.0%}"

    t = Table(title="synthesis", show_header=False)
    t.add_row("documents", f"{s['documents']} of {s['documents_planned']}")
    t.add_row("valid problems", f"{s['problems']} ({pct(s['problem_valid_rate'])})")
    t.add_row("answers (tagged)", f"{s['answers']} ({pct(s['answer_format_valid_rate'])})")
    t.add_row("valid rubrics", f"{s['rubrics']} ({pct(s['rubric_valid_rate'])} of problems)")
    t.add_row("scored answers", f"{s['scored']} ({pct(s['scored_rate'])})")
    eps = s["examples_per_s"]
    t.add_row("time", f"{s['seconds']:.0f}s" + (f", {eps:.3f} examples/s" if eps else ""))
    return t
