"""The commit log of ``pop-nemo synthesize``: ``DIR/records.jsonl`` plus ``DIR/progress.json``.

A chunk's records are appended in one write + fsync, then ``progress.json`` (documents done,
byte offset of the committed records, running counts, and the settings that shape a record) is
replaced atomically. Opening the log cuts ``records.jsonl`` back to the committed offset
(dropping a half-written chunk) and refuses settings or a corpus that would change the records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pop_nemo.checkpoint import ResumeError, atomic_write_text
from pop_nemo.corpus import Document
from pop_nemo.run_output import append_jsonl, console
from pop_nemo.selfplay.stage import Example

PROGRESS = "progress.json"
RECORDS = "records.jsonl"


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
