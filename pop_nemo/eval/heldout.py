"""Held-out self-play evaluation: a fixed document split, cached problems and rubrics, scored answers.

* **Split.** A document is held out when ``hash(split_salt, doc id) < heldout_fraction``: a
  property of its id alone, so the split is the same for every seed, rank, corpus size and
  run; the corpus owns it (``pop_nemo.corpus``) and hands training the complement.
* **Problems.** For the first ``eval.num_documents`` held-out documents (in hash order, so a
  larger corpus keeps the same ones first), the reference model proposes a problem and a
  reference answer, answers it ``eval.rubric_answers`` times, and writes a rubric from those
  answers (the paper's rubric writer inputs) — never from the evaluated model's answers, so
  two models meet exactly the same rubric. Written once, cached as JSONL under a key that
  hashes the reference model and every setting that shapes them.
* **Scoring.** The evaluated model answers each problem greedily and ``eval.samples`` times;
  the reference judge rates every answer against the cached rubric with the shared scoring
  (``selfplay.rubric.weighted_score``). A reply without an extractable answer gets
  ``algo.format_reward`` as in training; a failed judge call is left out and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pop_nemo import build
from pop_nemo.config import Config
from pop_nemo.corpus import Corpus, Document
from pop_nemo.critic.base import Critic, JudgeItem
from pop_nemo.engines.base import Engine, Request, Sampling
from pop_nemo.eval.stats import bootstrap_mean
from pop_nemo.jsonl import read_rows
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion
from pop_nemo.selfplay.stage import Example, request_seed

CACHE_VERSION = 1
MODES = ("greedy", "sampled")


# ---------------------------------------------------------------- the split (owned by the corpus)


def heldout_ids(cfg: Config) -> set[str]:
    """Ids of the corpus documents reserved for evaluation (training never samples them)."""
    return build.build_corpus(cfg).heldout_ids


def heldout_documents(cfg: Config, corpus: Corpus | None = None) -> list[Document]:
    """The held-out documents that pass the corpus filters, in split-hash order. ``corpus``: the
    run's corpus when it is at hand, so the documents are not read a second time."""
    return (corpus or build.build_corpus(cfg)).heldout_documents()


# ---------------------------------------------------------------- cached problems and rubrics


@dataclass(frozen=True)
class Problem:
    doc_id: str
    problem: str
    reference: str
    rubric: list[Criterion]


def model_fingerprint(path: str) -> str:
    """Identity of a model for cache keys: the folder, its config and its weight files' sizes."""
    p = Path(path)
    if not p.is_dir():
        return path  # a hub id
    parts = [str(p.resolve())]
    if (p / "config.json").is_file():
        parts.append(hashlib.sha256((p / "config.json").read_bytes()).hexdigest())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


def problems_key(cfg: Config, reference_path: str, docs: list[Document]) -> str:
    """Hash of everything that shapes the cached problems and rubrics."""
    d = cfg.to_dict()
    e, r = d["eval"], d["rollout"]
    shaping = {
        "version": CACHE_VERSION,
        "reference": model_fingerprint(reference_path),
        "dtype": d["model"]["dtype"],
        "task": d["task"],
        "eval": {k: e[k] for k in ("seed", "rubric_answers", "rubric_max_new_tokens")},
        "rollout": {k: r[k] for k in ("proposer", "solver", "rubric", "guide", "proposer_retries", "solver_resample")},
        "answer_fallback": d["algo"]["answer_fallback"],
        "critic_url": d["critic"]["url"],
        "docs": hashlib.sha256(json.dumps([[x.id, x.text] for x in docs]).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg: Config) -> Path:
    if cfg.eval.cache_dir:
        return Path(cfg.eval.cache_dir).expanduser()
    from pop_nemo.models import cache_dir

    return cache_dir() / "eval"


def _problem_row(e: Example) -> dict[str, Any]:
    valid = e.proposer_valid and e.rubric_valid
    error = None if valid else ("no valid problem" if not e.proposer_valid else e.rubric_error or "invalid rubric")
    return {
        "doc_id": e.doc.id,
        "valid": valid,
        "error": error,
        "problem": e.problem,
        "reference": e.reference,
        "rubric": [c.to_dict() for c in e.rubric] if e.rubric else None,
        "proposer_output": e.proposer_output,
        "proposer_attempts": e.proposer_attempts,
        "rubric_output": e.rubric_output,
        "reference_answers": [a.answer for a in e.answers],
        "document": e.doc.text,
    }


def write_problems(
    cfg: Config, docs: list[Document], reference: Engine, critic: Critic, seed: int
) -> list[dict[str, Any]]:
    """The reference model writes a problem and a rubric for each document (batched by stage)."""
    sp = build.build_selfplay(cfg, reference, reference, critic, n=cfg.eval.rubric_answers, seed=seed)
    examples = [Example(i, d) for i, d in enumerate(docs)]
    for stage in (sp.propose, sp.solve, sp.rubric):  # no judging: eval judges the evaluated model only
        stage(examples, 0)
    return [_problem_row(e) for e in examples]


def load_or_write_problems(
    cfg: Config, reference_path: str, reference: Engine, critic: Critic, log=print
) -> tuple[str, Path, list[dict[str, Any]]]:
    """``(key, cache file, rows)``; rows are written by the reference model on a cache miss."""
    docs = heldout_documents(cfg)[: cfg.eval.num_documents]
    if not docs:
        from pop_nemo.config import ConfigError

        raise ConfigError(
            f"no held-out document: corpus {cfg.corpus.source!r} has none with hash < eval.heldout_fraction="
            f"{cfg.eval.heldout_fraction} (and at least {cfg.corpus.min_words} words); raise eval.heldout_fraction"
        )
    key = problems_key(cfg, reference_path, docs)
    path = cache_root(cfg) / f"problems-{key}.jsonl"
    if path.is_file():
        rows = read_rows(path)
        log(f"eval problems: {sum(r['valid'] for r in rows)}/{len(rows)} valid, cached in {path}")
        return key, path, rows
    log(f"eval problems: writing {len(docs)} with the reference model (cached as {path})")
    rows = write_problems(cfg, docs, reference, critic, seed=cfg.eval.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    log(f"eval problems: {sum(r['valid'] for r in rows)}/{len(rows)} valid")
    return key, path, rows


def valid_problems(rows: list[dict[str, Any]]) -> list[Problem]:
    return [
        Problem(r["doc_id"], r["problem"], r["reference"], [Criterion(**c) for c in r["rubric"]])
        for r in rows
        if r["valid"]
    ]


# ---------------------------------------------------------------- answering and judging


def _sampling(s) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)


def answer_and_judge(cfg: Config, problems: list[Problem], model: Engine, judge: Critic) -> list[dict[str, Any]]:
    """One row per answer: the evaluated model's reply, its extracted answer, the judge's rating."""
    e = cfg.eval
    task = roles.get_task(cfg.task)
    max_new = e.max_new_tokens or cfg.rollout.solver.max_new_tokens
    requests, meta = [], []
    for p in problems:
        if e.greedy:
            s = Sampling(temperature=0.0, max_new_tokens=max_new, n=1, seed=request_seed(e.seed, "greedy", p.doc_id))
            requests.append(Request(task.solver_messages(p.problem), s, id=f"{p.doc_id}:greedy"))
            meta.append((p, "greedy"))
        if e.samples:
            s = Sampling(
                temperature=e.temperature,
                top_p=e.top_p,
                max_new_tokens=max_new,
                n=e.samples,
                seed=request_seed(e.seed, "sampled", p.doc_id),
            )
            requests.append(Request(task.solver_messages(p.problem), s, id=f"{p.doc_id}:sampled"))
            meta.append((p, "sampled"))
    rows: list[dict[str, Any]] = []
    items: list[JudgeItem] = []
    judged: list[int] = []
    for (p, mode), comps in zip(meta, model.generate(requests) if requests else []):
        for k, c in enumerate(comps):
            answer = roles.extract_answer(c.text)
            format_valid = answer is not None
            if answer is None and cfg.algo.answer_fallback:
                answer = roles.after_think(c.text).strip() or None
            row = {
                "doc_id": p.doc_id,
                "mode": mode,
                "sample": k,
                "output": c.text,
                "answer": answer,
                "format_valid": format_valid,
                "num_tokens": len(c.token_ids),
                "num_words": len(c.text.split()),
                "finish_reason": c.finish_reason,
                "judge_valid": None,
                "score": None,
                "reward": cfg.algo.format_reward if answer is None else None,
                "ratings": [],
                "judge_error": None,
            }
            if answer is not None:
                judged.append(len(rows))
                seed = request_seed(e.seed, "judge", p.doc_id, mode, k)
                items.append(JudgeItem(f"{p.doc_id}:{mode}:{k}", p.problem, p.rubric, answer, seed=seed))
            rows.append(row)
    for i, j in zip(judged, judge.judge(items) if items else []):
        rows[i].update(
            judge_valid=j.valid,
            score=j.score,
            reward=j.reward,
            ratings=[r.to_dict() for r in j.ratings],
            judge_error=j.error,
        )
    return rows


def _per_problem(rows: list[dict[str, Any]], value) -> dict[str, float | None]:
    by_doc: dict[str, list[float]] = {}
    for r in rows:
        v = value(r)
        by_doc.setdefault(r["doc_id"], [])
        if v is not None:
            by_doc[r["doc_id"]].append(float(v))
    return {k: (sum(v) / len(v) if v else None) for k, v in by_doc.items()}


def per_problem_reward(rows: list[dict[str, Any]], mode: str) -> dict[str, float | None]:
    """Mean reward per problem (doc id) over the mode's scored answers: the unit of comparison."""
    return _per_problem([r for r in rows if r["mode"] == mode], lambda r: r["reward"])


def summarize(cfg: Config, rows: list[dict[str, Any]], num_problems: int, num_docs: int) -> dict[str, Any]:
    """Per mode: reward, format validity and length (means with bootstrap CIs over problems)."""
    e = cfg.eval
    out: dict[str, Any] = {"num_documents": num_docs, "num_problems": num_problems}
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue

        def est(name: str, per: dict[str, float | None], mode: str = mode) -> dict[str, Any]:
            seed = request_seed(e.seed, "bootstrap", mode, name)
            return bootstrap_mean(list(per.values()), e.bootstrap, e.confidence, seed).to_dict()

        out[mode] = {
            "num_answers": len(mrows),
            "reward": est("reward", per_problem_reward(rows, mode)),
            "format_valid_rate": est("format", _per_problem(mrows, lambda r: float(r["format_valid"]))),
            "length_tokens": est("tokens", _per_problem(mrows, lambda r: r["num_tokens"])),
            "length_words": est("words", _per_problem(mrows, lambda r: r["num_words"])),
            "truncated_rate": sum(r["finish_reason"] == "length" for r in mrows) / len(mrows),
            "no_answer": sum(r["answer"] is None for r in mrows),
            "judge_failures": sum(r["judge_valid"] is False for r in mrows),
        }
    return out
