"""Offline synthesis (the paper's data): propose → solve ×N → rubric → judge over a corpus.

``synthesize(cfg, DIR)`` takes the first ``offline.num_documents`` documents of the corpus'
deterministic order and runs :class:`~pop_nemo.selfplay.stage.SelfPlay` on them
``offline.chunk_size`` documents at a time: every stage is one batched engine call across the
chunk's documents (proposer retries and solver re-samples batch the failures only). Each
document's group id is its index in that order, and every request's seed is
``request_seed(seed, 0, group_id, role, attempt)``, so what a document gets does not depend on
where a run was interrupted.

**Commit protocol** (no example lost or duplicated after ``kill -9``): a chunk's records are
appended to ``DIR/records.jsonl`` in one write + fsync, then ``DIR/progress.json`` (documents
done, byte offset of the committed records, running counts, and the settings that shape a
record) is replaced atomically. A restart cuts ``records.jsonl`` back to the committed offset
(dropping a half-written chunk) and continues with the next uncommitted document. A restart
with settings that would change the records is refused (``--fresh`` starts over);
``offline.num_documents`` may grow, to synthesize more.

Roles can be played by an OpenAI-compatible endpoint (``offline.teacher``); the paper's
ablations are ``offline.proposer_knowledge``, ``offline.rubric_knowledge`` and
``offline.scoring`` (pointwise, median_anchor, pairwise).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pop_nemo import build
from pop_nemo.checkpoint import ResumeError, atomic_write_text, resume_guard
from pop_nemo.config import Config, ConfigError
from pop_nemo.corpus import Document
from pop_nemo.critic.base import Critic, JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.engines.base import Engine, Guide, Message, Request, Sampling
from pop_nemo.run_output import append_jsonl, console
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion
from pop_nemo.selfplay.stage import Example, request_seed

ROLES = ("proposer", "solver", "rubric", "judge")
PROGRESS = "progress.json"
RECORDS = "records.jsonl"
NONE_KNOWLEDGE = "None"  # what the paper's ablations put in place of the document / reference


# ---------------------------------------------------------------- engines


def build_teacher_engine(cfg: Config) -> Engine:
    """The OpenAI-compatible endpoint of ``offline.teacher`` as an Engine."""
    return build.endpoint_engine(cfg.offline.teacher)


def build_self_engine(cfg: Config) -> Engine:
    """The configured model (all roles the teacher does not play), on this rank's GPU when there is one."""
    from pop_nemo.models import load_tokenizer, resolve_model_path

    if cfg.rollout.backend != "hf":
        raise ConfigError(
            f"rollout.backend={cfg.rollout.backend!r}: synthesis runs the model in-process ('hf'); to serve roles "
            "from an OpenAI-compatible server (vLLM, trtllm-serve), set offline.teacher.url and offline.teacher.roles"
        )
    path = resolve_model_path(cfg.model.path)
    device = build.this_rank_engine_device()
    return build.hf_engine(
        path, load_tokenizer(path), dtype=cfg.model.dtype, max_batch=cfg.rollout.max_batch, seed=cfg.seed, device=device
    )


def role_engines(cfg: Config) -> dict[str, Engine]:
    teacher_roles = set(cfg.offline.teacher.roles)
    out: dict[str, Engine] = {}
    if teacher_roles:
        teacher = build_teacher_engine(cfg)
        out.update({r: teacher for r in teacher_roles})
    if teacher_roles != set(ROLES):
        own = build_self_engine(cfg)
        out.update({r: own for r in ROLES if r not in teacher_roles})
    return out


def role_sources(cfg: Config) -> dict[str, str]:
    t = cfg.offline.teacher
    return {r: (t.model if r in t.roles else cfg.model.path) for r in ROLES}


# ---------------------------------------------------------------- ablations of the rubric writer's inputs


class BlindRubricWriter:
    """The paper's ``--no_know_in_rubric`` (and ``--use_knowledge 0``): the rubric writer sees
    "None" for the document and the reference answer. Judging is unchanged."""

    def __init__(self, inner: Critic):
        self.inner = inner

    def write_rubrics(self, items: Sequence[RubricItem]) -> list[RubricResult]:
        return self.inner.write_rubrics(
            [replace(it, document=NONE_KNOWLEDGE, reference=NONE_KNOWLEDGE) for it in items]
        )

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        return self.inner.judge(items)

    def step_metrics(self) -> dict[str, Any]:
        return self.inner.step_metrics()


# ---------------------------------------------------------------- pairwise scoring modes (paper ablations)

ANCHOR_SYSTEM = """You compare two candidate answers to a problem, using an evaluation rubric as the reference. Each criterion of the rubric has a "gold" standard answer where one applies and a "weight" for how much it matters: use both.

First write brief thoughts on how each answer does on the rubric and how they compare. Then, on separate lines, rate each answer with an integer from 0 to 10 (higher is better; equal ratings mean a tie) in exactly these tags:
<rating_A>INTEGER</rating_A>
<rating_B>INTEGER</rating_B>"""

PAIRWISE_SYSTEM = """You compare two candidate answers to a problem, using an evaluation rubric as the reference. Each criterion of the rubric has a "gold" standard answer where one applies and a "weight" for how much it matters: use both.

First write brief thoughts on how each answer does on the rubric and how they compare. Then, on a separate line, name the better answer, A or B, in exactly this tag:
<better_answer>A or B</better_answer>"""


def comparison_messages(
    system: str, problem: str, criteria: list[Criterion], a: str, b: str, ask: str
) -> list[Message]:
    user = (
        f"<problem>\n{problem}\n</problem>\n\n<rubric>\n{roles.rubric_text(criteria)}\n</rubric>\n\n"
        f"<candidate_answer_A>\n{a}\n</candidate_answer_A>\n\n<candidate_answer_B>\n{b}\n</candidate_answer_B>\n\n{ask}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def anchor_guide(lim: roles.GuideLimits) -> Guide:
    return Guide(
        "ebnf",
        'root ::= thoughts "\\n<rating_A>" rating "</rating_A>\\n<rating_B>" rating "</rating_B>"\n'
        'rating ::= "10" | [0-9]\n'
        f"thoughts ::= [^<]{{0,{lim.thoughts_chars}}}\n",
    )


def pairwise_guide(lim: roles.GuideLimits) -> Guide:
    return Guide(
        "ebnf",
        f'root ::= thoughts "\\n<better_answer>" ("A" | "B") "</better_answer>"\nthoughts ::= [^<]{{0,{lim.thoughts_chars}}}\n',
    )


def parse_anchor_ratings(text: str) -> tuple[float, float] | None:
    """``(rating_A, rating_B)``: each tag exactly once, a number (the paper does not clip)."""
    got = []
    for tag in ("rating_A", "rating_B"):
        body = roles.extract_tag(text, tag)
        try:
            got.append(float(body) if body is not None else None)
        except ValueError:
            got.append(None)
    return None if None in got else (got[0], got[1])


def parse_better(text: str) -> float | None:
    """1.0 when A is better, 0.0 when B is, None otherwise."""
    body = roles.extract_tag(text, "better_answer")
    return {"a": 1.0, "b": 0.0}.get(body.casefold()) if body is not None else None


def anchor_index(answers: list[str]) -> int:
    """The paper's anchor: the median-length answer (characters; stable sort, index len//2)."""
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]))
    return order[len(order) // 2]


def anchor_score(forward: tuple[float, float] | None, backward: tuple[float, float] | None) -> float | None:
    """Answer i vs the anchor, as A (``forward``) and as B (``backward``): mean of r_i − r_anchor.
    Either order failing to parse makes the answer unscored, as in the paper."""
    if forward is None or backward is None:
        return None
    return ((forward[0] - forward[1]) + (backward[1] - backward[0])) / 2


def round_robin_scores(n: int, results: dict[tuple[int, int], list[float]]) -> list[float | None]:
    """Win rate of each answer: ``results[(i, j)]`` (i < j) holds, per valid comparison, 1.0 when
    i won and 0.0 when j won (0.5 for identical answers); the row mean over all entries."""
    rows: list[list[float]] = [[] for _ in range(n)]
    for (i, j), vals in results.items():
        rows[i].extend(vals)
        rows[j].extend(1.0 - v for v in vals)
    return [sum(r) / len(r) if r else None for r in rows]


class ComparativeJudge:
    """Scores every answer of a group by comparisons with the rubric (``median_anchor`` or
    ``pairwise``), batched across all groups of a chunk. Rewards are mapped to [0, 1]."""

    def __init__(self, mode: str, engine: Engine, sampling: Sampling, limits: roles.GuideLimits | None, seed: int):
        self.mode, self.engine, self.sampling, self.limits, self.seed = mode, engine, sampling, limits, seed

    def _request(self, e: Example, key: tuple, a: str, b: str) -> Request:
        if self.mode == "median_anchor":
            system, ask = ANCHOR_SYSTEM, "Now compare candidate answer A and candidate answer B and rate each of them."
            guide = anchor_guide(self.limits) if self.limits else None
        else:
            system, ask = (
                PAIRWISE_SYSTEM,
                "Now compare candidate answer A and candidate answer B and say which is better.",
            )
            guide = pairwise_guide(self.limits) if self.limits else None
        seed = request_seed(self.seed, 0, e.group_id, "judge", self.mode, *key)
        sampling = Sampling(**{**self.sampling.__dict__, "n": 1, "seed": seed, "guide": guide})
        return Request(comparison_messages(system, e.problem or "", e.rubric or [], a, b, ask), sampling)

    def judge(self, examples: list[Example]) -> None:
        plan: list[tuple[Example, list[int], tuple]] = []  # (example, answer indices, comparison key)
        requests: list[Request] = []
        groups = []
        for e in examples:
            if not e.rubric_valid:
                continue
            idx = [k for k, a in enumerate(e.answers) if a.answer is not None]
            texts = [e.answers[k].answer or "" for k in idx]
            groups.append((e, idx, texts))
            if self.mode == "median_anchor":
                anchor = anchor_index(texts)
                for i in range(len(texts)):
                    for order in ("ij", "ji"):
                        a, b = (texts[i], texts[anchor]) if order == "ij" else (texts[anchor], texts[i])
                        plan.append((e, idx, (i, order)))
                        requests.append(self._request(e, (i, order), a, b))
            else:
                for i in range(len(texts)):
                    for j in range(i + 1, len(texts)):
                        if texts[i].strip() == texts[j].strip():
                            continue  # identical answers tie without a call
                        for order in ("ij", "ji"):
                            a, b = (texts[i], texts[j]) if order == "ij" else (texts[j], texts[i])
                            plan.append((e, idx, (i, j, order)))
                            requests.append(self._request(e, (i, j, order), a, b))
        outputs = self.engine.generate(requests) if requests else []
        got: dict[tuple[int, tuple], str] = {
            (e.group_id, key): comps[0].text for (e, _, key), comps in zip(plan, outputs)
        }
        for e, idx, texts in groups:
            n = len(texts)
            if self.mode == "median_anchor":
                scores = [
                    anchor_score(
                        parse_anchor_ratings(got[(e.group_id, (i, "ij"))]),
                        parse_anchor_ratings(got[(e.group_id, (i, "ji"))]),
                    )
                    for i in range(n)
                ]
                rewards = [None if s is None else (s + 10) / 20 for s in scores]
            else:
                results: dict[tuple[int, int], list[float]] = {}
                for i in range(n):
                    for j in range(i + 1, n):
                        if texts[i].strip() == texts[j].strip():
                            results[(i, j)] = [0.5]
                            continue
                        ij, ji = (
                            parse_better(got[(e.group_id, (i, j, "ij"))]),
                            parse_better(got[(e.group_id, (i, j, "ji"))]),
                        )
                        results[(i, j)] = [v for v in (ij, None if ji is None else 1.0 - ji) if v is not None]
                scores = round_robin_scores(n, results)
                rewards = scores
            for k, s, r in zip(idx, scores, rewards):
                jid = f"{e.group_id}:{k}"
                e.answers[k].judgement = (
                    Judgement(jid, False, error=f"{self.mode}: a comparison did not parse")
                    if s is None
                    else Judgement(jid, True, score=s, reward=r)
                )


# ---------------------------------------------------------------- the commit log


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


COUNT_KEYS = ("documents", "problems", "answers", "valid_answers", "rubrics", "scored")


def count(examples: list[Example]) -> dict[str, int]:
    answers = [a for e in examples for a in e.answers]
    return {
        "documents": len(examples),
        "problems": sum(e.proposer_valid for e in examples),
        "answers": len(answers),
        "valid_answers": sum(a.format_valid for a in answers),
        "rubrics": sum(e.rubric_valid for e in examples),
        "scored": sum(bool(a.judgement and a.judgement.valid) for a in answers),
    }


@dataclass
class Progress:
    docs_done: int = 0
    records_bytes: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    seconds: float = 0.0
    generated_tokens: int = 0
    last_doc_id: str | None = None
    guarded: dict[str, Any] = field(default_factory=dict)


class CommitLog:
    """``records.jsonl`` plus ``progress.json``: a chunk is committed when progress says so."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.records = self.out / RECORDS
        self.progress_path = self.out / PROGRESS

    def reset(self) -> None:
        for name in (RECORDS, PROGRESS, "summary.json"):
            (self.out / name).unlink(missing_ok=True)

    def open(self, guarded: dict[str, Any], docs: list[Document]) -> Progress:
        """The committed state, with ``records.jsonl`` cut back to it; a new log when there is none."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.progress_path.is_file():
            if self.records.is_file() and self.records.stat().st_size > 0:
                raise ResumeError(
                    f"{self.records} exists but {self.progress_path} does not: it was not written by "
                    "`pop-nemo synthesize`. Use another --output-dir, or --fresh to discard it."
                )
            state = Progress(guarded=guarded)
            self.records.touch()
            self._write(state)
            return state
        state = Progress(**json.loads(self.progress_path.read_text()))
        before, now = _flatten(state.guarded), _flatten(guarded)
        diffs = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: before {before.get(k)!r}, now {now.get(k)!r}" for k in diffs[:4])
            raise ResumeError(
                f"cannot resume synthesis in {self.out}: settings that shape the records changed ({detail}). "
                "Use another --output-dir, or --fresh to start over."
            )
        if state.docs_done and state.docs_done <= len(docs) and docs[state.docs_done - 1].id != state.last_doc_id:
            raise ResumeError(
                f"cannot resume synthesis in {self.out}: document {state.docs_done - 1} of the corpus is now "
                f"{docs[state.docs_done - 1].id!r}, it was {state.last_doc_id!r}; the corpus changed. Use --fresh."
            )
        size = self.records.stat().st_size if self.records.is_file() else 0
        if size < state.records_bytes:
            raise ResumeError(
                f"{self.records} holds {size} bytes but {state.docs_done} committed documents need "
                f"{state.records_bytes}: the file was cut or replaced. Use --fresh to start over."
            )
        if size > state.records_bytes:
            console.print(f"discarding {size - state.records_bytes} bytes of an uncommitted chunk in {self.records}")
            with open(self.records, "r+b") as f:
                f.truncate(state.records_bytes)
                os.fsync(f.fileno())
        return state

    def commit(self, state: Progress, records: list[dict[str, Any]], last_doc_id: str) -> None:
        append_jsonl(self.records, records)
        state.records_bytes = self.records.stat().st_size
        state.docs_done += len(records)
        state.last_doc_id = last_doc_id
        self._write(state)

    def _write(self, state: Progress) -> None:
        atomic_write_text(self.progress_path, json.dumps(state.__dict__, indent=1))


# ---------------------------------------------------------------- the run


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
        engines = role_engines(cfg)
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
