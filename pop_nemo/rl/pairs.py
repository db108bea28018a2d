"""Offline DPO pairs from self-play records: the paper's filter and pairing (DESIGN §2).

Per record, in this order (the paper's ``filter_and_pair.py``):

1. drop when the proposer failed, or the rubric is invalid;
2. scored answers = those the judge scored validly, in generation order; drop when none;
3. keep the first ``best_of_n`` of them; drop when the population std of their scores is
   below ``std_threshold`` or all are equal (a single scored answer has std 0 and goes here too);
4. chosen = the first argmax, rejected = the first argmin of the scores;
5. drop when the full solver outputs (reasoning included) of chosen and rejected differ by
   more than ``max_length_diff_words`` words, counted as the paper does with ``split(" ")``
   (``length_words: whitespace`` counts ``split()`` words instead).

The kept pairs are shuffled with ``random.Random(shuffle_seed)`` (= ``random.seed(42);
random.shuffle``) and cut to ``max_pairs``. A pair is written in the conversational
preference format TRL's ``DPOTrainer`` reads (explicit prompt): ``prompt`` = [system, user]
messages the solver saw, ``chosen`` / ``rejected`` = one assistant message each with the full
solver output; the scores, the reference answer and the record's ids ride along.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pop_nemo.config import ConfigError
from pop_nemo.jsonl import read_lines
from pop_nemo.selfplay.roles import get_task

DROP_REASONS = ("proposer_invalid", "rubric_invalid", "no_scored_answer", "scores_tied", "length_diff")


class PairsInputError(ConfigError):
    """The records file is missing or not in the record schema (a user error: exit 2)."""


@dataclass(frozen=True)
class PairFilter:
    """The filter and pairing settings. No defaults here: the ``offline`` config section declares
    them (with their bounds) once, and :meth:`from_config` reads them field by field."""

    best_of_n: int
    std_threshold: float
    max_length_diff_words: int
    length_words: Literal["whitespace", "space"]  # 'space': the paper's split(" ")
    shuffle_seed: int
    max_pairs: int

    @classmethod
    def from_config(cls, off: Any) -> PairFilter:
        """The filter an ``offline`` section sets (every field here is one of its fields, same name)."""
        return cls(**{f.name: getattr(off, f.name) for f in fields(cls)})

    def words(self, text: str) -> int:
        return len(text.split(" ") if self.length_words == "space" else text.split())


@dataclass
class PairStats:
    records: int = 0
    dropped: Counter = field(default_factory=Counter)
    pairs_before_cap: int = 0
    pairs: int = 0
    scored_answers: int = 0  # over the records that reached the std test (first best_of_n each)
    score_sum: float = 0.0
    score_sq_sum: float = 0.0
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    chosen_words: list[int] = field(default_factory=list)
    rejected_words: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def mean(xs: list) -> float | None:
            return float(np.mean(xs)) if xs else None

        n = self.scored_answers
        score_mean = self.score_sum / n if n else None
        score_std = float(np.sqrt(max(self.score_sq_sum / n - score_mean**2, 0.0))) if n else None
        return {
            "records": self.records,
            "pairs": self.pairs,
            "pairs_before_cap": self.pairs_before_cap,
            "dropped": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
            "scored_answers": n,
            "score_mean": score_mean,
            "score_std": score_std,
            "chosen_score_mean": mean(self.chosen_scores),
            "rejected_score_mean": mean(self.rejected_scores),
            "chosen_words_mean": mean(self.chosen_words),
            "rejected_words_mean": mean(self.rejected_words),
        }


def scored_answers(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The answers the judge scored validly, in generation order."""
    return [a for a in record.get("answers") or [] if a.get("judge_valid") and a.get("score") is not None]


def solver_prompt(record: dict[str, Any], task: str | None = None) -> list[dict[str, str]]:
    """The [system, user] messages the solver saw for this record."""
    system = record.get("solver_system")
    if system is None:
        name = record.get("task") or task
        if name is None:
            raise PairsInputError(
                f"record {record.get('group_id')!r} names no task (records of `pop-nemo train` do not): "
                "pass --task health_care|creative_writing|instruction_following"
            )
        system = get_task(name).solver_system
    return [{"role": "system", "content": system}, {"role": "user", "content": record["problem"]}]


def pair_record(record: dict[str, Any], flt: PairFilter, stats: PairStats, task: str | None = None) -> dict | None:
    """The pair of one record, or None (the reason is counted in ``stats.dropped``)."""
    stats.records += 1
    if not record.get("proposer_valid"):
        stats.dropped["proposer_invalid"] += 1
        return None
    if not record.get("rubric_valid"):
        stats.dropped["rubric_invalid"] += 1
        return None
    answers = scored_answers(record)
    if not answers:
        stats.dropped["no_scored_answer"] += 1
        return None
    answers = answers[: flt.best_of_n]
    scores = [float(a["score"]) for a in answers]
    stats.scored_answers += len(scores)
    stats.score_sum += sum(scores)
    stats.score_sq_sum += sum(s * s for s in scores)
    # Population std (numpy's default). ``max == min`` only matters at std_threshold=0: never pair an
    # answer with itself.
    if np.std(scores) < flt.std_threshold or max(scores) == min(scores):
        stats.dropped["scores_tied"] += 1
        return None
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))  # first occurrence of each
    chosen, rejected = answers[best]["output"], answers[worst]["output"]
    cw, rw = flt.words(chosen), flt.words(rejected)
    if abs(cw - rw) > flt.max_length_diff_words:
        stats.dropped["length_diff"] += 1
        return None
    stats.chosen_scores.append(scores[best])
    stats.rejected_scores.append(scores[worst])
    stats.chosen_words.append(cw)
    stats.rejected_words.append(rw)
    return {
        "prompt": solver_prompt(record, task),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_score": scores[best],
        "rejected_score": scores[worst],
        "ref_answer": record.get("reference"),
        "group_id": record.get("group_id"),
        "doc_id": record.get("doc_id"),
    }


def make_pairs(
    records: list[dict[str, Any]], flt: PairFilter, task: str | None = None
) -> tuple[list[dict[str, Any]], PairStats]:
    stats = PairStats()
    pairs = [p for r in records if (p := pair_record(r, flt, stats, task)) is not None]
    stats.pairs_before_cap = len(pairs)
    random.Random(flt.shuffle_seed).shuffle(pairs)
    pairs = pairs[: flt.max_pairs]
    stats.pairs = len(pairs)
    return pairs, stats


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PairsInputError(
            f"--input {str(path)!r} does not exist (it is DIR/records.jsonl of `pop-nemo synthesize`)"
        )
    records = []
    for n, rec in read_lines(path, PairsInputError):
        missing = [k for k in ("proposer_valid", "rubric_valid", "answers", "problem") if k not in rec]
        if missing:
            raise PairsInputError(f"{path}:{n}: not a self-play record (missing {', '.join(missing)})")
        records.append(rec)
    return records


def write_pairs(path: Path, pairs: list[dict[str, Any]], stats: PairStats) -> Path:
    """Write ``path`` (JSONL) and ``<path stem>.stats.json`` beside it, each atomically."""
    from pop_nemo.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    stats_path = path.with_name(path.stem + ".stats.json")
    atomic_write_text(stats_path, json.dumps(stats.to_dict(), indent=1))
    return stats_path


def stats_table(stats: PairStats):
    from rich.table import Table

    d = stats.to_dict()

    def f(v: float | None, fmt: str = ".3f") -> str:
        return "—" if v is None else format(v, fmt)

    t = Table(title="pairs", show_header=False)
    t.add_row("records", str(d["records"]))
    for reason in DROP_REASONS:
        t.add_row(f"dropped: {reason}", str(d["dropped"][reason]))
    t.add_row("pairs (after max_pairs)", f"{d['pairs']} (of {d['pairs_before_cap']})")
    t.add_row(
        "scores (first best_of_n per record)", f"{f(d['score_mean'])} ± {f(d['score_std'])} over {d['scored_answers']}"
    )
    t.add_row("chosen / rejected score", f"{f(d['chosen_score_mean'])} / {f(d['rejected_score_mean'])}")
    t.add_row("chosen / rejected words", f"{f(d['chosen_words_mean'], '.1f')} / {f(d['rejected_words_mean'], '.1f')}")
    return t
