"""Rubric benchmarks in HealthBench format, judged item by item by any Engine.

File format (OpenAI's HealthBench JSONL, one conversation per line)::

    {"prompt_id": "...", "prompt": [{"role": "user", "content": "..."}, ...],
     "rubrics": [{"criterion": "...", "points": 7, "tags": ["axis:accuracy"]}, ...],
     "example_tags": ["theme:..."]}

The evaluated model replies to the conversation; a grader decides for every rubric item
whether the reply meets it (``criteria_met``; for a negative item, "met" means the reply does
the undesirable thing). Score of one conversation::

    score = clip(Σ points of met items / Σ positive points, 0, 1)

An unmet item adds nothing, a met negative item subtracts. A rubric without positive points
has no score (None: left out of the mean and counted as ``unscorable``), as in OpenAI's
simple-evals. A conversation with any item the grader failed to judge has no score either
(counted in ``judge_failures``): guessing "unmet" for it would bias the score. Unlike
simple-evals, which clips only the final mean, each conversation's score is clipped, so a
conversation's mistakes cannot cancel another's credit; ``raw_score`` keeps the unclipped value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pop_nemo.engines.base import Engine, Guide, Message, Request, Sampling
from pop_nemo.eval.stats import bootstrap_mean
from pop_nemo.jsonl import read_lines
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.stage import request_seed

EXAMPLE = "example"
ROLES = {"system", "developer", "user", "assistant"}


class HealthBenchError(ValueError):
    """The benchmark file breaks the format; the message names the line and field."""


@dataclass(frozen=True)
class RubricPoint:
    criterion: str
    points: float
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[Message]
    rubric: list[RubricPoint]
    tags: tuple[str, ...] = ()


def example_path() -> Path:
    return Path(str(resources.files("pop_nemo") / "data" / "healthbench_example.jsonl"))


def resolve_path(spec: str) -> Path:
    return example_path() if spec == EXAMPLE else Path(spec).expanduser()


def _parse_line(obj: Any, where: str) -> Conversation:
    if not isinstance(obj, dict):
        raise HealthBenchError(f"{where}: a line must be a JSON object")
    messages = obj.get("prompt", obj.get("messages"))
    if not isinstance(messages, list) or not messages:
        raise HealthBenchError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise HealthBenchError(f"{where}: prompt[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': str}}")
    if messages[-1]["role"] != "user":
        raise HealthBenchError(f"{where}: the conversation must end with a user message (the model replies to it)")
    items = obj.get("rubrics")
    if not isinstance(items, list) or not items:
        raise HealthBenchError(f"{where}: 'rubrics' must be a non-empty list of {{criterion, points}}")
    rubric = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("criterion"), str) or not it["criterion"].strip():
            raise HealthBenchError(f"{where}: rubrics[{i}] needs a non-empty 'criterion' string")
        pts = it.get("points")
        if isinstance(pts, bool) or not isinstance(pts, (int, float)) or not math.isfinite(pts):
            raise HealthBenchError(f"{where}: rubrics[{i}].points must be a finite number, got {pts!r}")
        rubric.append(RubricPoint(it["criterion"].strip(), float(pts), tuple(str(t) for t in it.get("tags") or ())))
    cid = obj.get("prompt_id", obj.get("id"))
    if not isinstance(cid, (str, int)) or isinstance(cid, bool):
        raise HealthBenchError(f"{where}: needs a 'prompt_id' (string)")
    msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
    return Conversation(str(cid), msgs, rubric, tuple(str(t) for t in obj.get("example_tags") or ()))


def load(path: Path, limit: int | None = None) -> list[Conversation]:
    if not path.is_file():
        raise HealthBenchError(f"HealthBench file {str(path)!r} does not exist (eval.healthbench)")
    out: list[Conversation] = []
    seen: set[str] = set()
    for n, obj in read_lines(path, HealthBenchError):
        conv = _parse_line(obj, f"{path}:{n}")
        if conv.id in seen:
            raise HealthBenchError(f"{path}:{n}: prompt_id {conv.id!r} repeats an earlier line")
        seen.add(conv.id)
        out.append(conv)
        if limit and len(out) >= limit:
            break
    if not out:
        raise HealthBenchError(f"{path} holds no conversation")
    return out


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    score: float | None  # clipped to [0, 1]; None: unscorable or a judge failure
    raw_score: float | None  # unclipped
    achieved: float  # Σ points of met items (judged ones)
    possible: float  # Σ positive points
    judge_failures: int  # items the grader failed to judge

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "raw_score": self.raw_score,
            "achieved": self.achieved,
            "possible": self.possible,
            "judge_failures": self.judge_failures,
        }


def score(rubric: list[RubricPoint], met: list[bool | None]) -> Score:
    """``met[i]`` is the grader's verdict on item ``i``; None when the grader failed."""
    if len(met) != len(rubric):
        raise ValueError(f"{len(met)} verdicts for {len(rubric)} rubric items")
    possible = sum(r.points for r in rubric if r.points > 0)
    achieved = sum(r.points for r, m in zip(rubric, met) if m is True)
    failures = sum(m is None for m in met)
    if possible <= 0 or failures:
        return Score(None, None, achieved, possible, failures)
    raw = achieved / possible
    return Score(min(max(raw, 0.0), 1.0), raw, achieved, possible, failures)


# ---------------------------------------------------------------- the grader

GRADER_SYSTEM = """You grade one reply of an AI assistant against one rubric item. You see the conversation, ending with the reply to grade, and the rubric item with its points.

Decide whether the reply meets the rubric item. A positive item describes something the reply should do: criteria_met is true only if the reply does it fully. A negative item (negative points) describes something undesirable: criteria_met is true if the reply does that undesirable thing. If the item says "such as" or lists examples, the reply need not cover every example.

Answer with JSON only: {"explanation": "...", "criteria_met": true or false}"""


def grader_messages(conv: Conversation, reply: str, item: RubricPoint) -> list[Message]:
    turns = [*conv.messages, {"role": "assistant", "content": reply}]
    shown = "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)
    points = f"{item.points:g}"
    user = (
        f"<conversation>\n{shown}\n</conversation>\n\n<rubric_item>\n[{points}] {item.criterion}\n</rubric_item>\n\n"
        "Does the last assistant reply meet this rubric item? Answer with the JSON object."
    )
    return [{"role": "system", "content": GRADER_SYSTEM}, {"role": "user", "content": user}]


def grader_guide(explanation_chars: int) -> Guide:
    schema = {
        "type": "object",
        "properties": {
            "explanation": {"type": "string", "maxLength": explanation_chars},
            "criteria_met": {"type": "boolean"},
        },
        "required": ["explanation", "criteria_met"],
        "additionalProperties": False,
    }
    return Guide("json_schema", json.dumps(schema))


class GradeError(ValueError):
    pass


def parse_grade(text: str) -> tuple[bool, str]:
    """``(criteria_met, explanation)`` from a grader reply: the JSON object, bare or fenced."""
    body = roles.after_think(text).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        m = re.search(r"\{.*\}", body, flags=re.DOTALL)
        if m is None:
            raise GradeError("no JSON object in the grader's reply") from None
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError as e:
            raise GradeError(f"grader JSON is not valid: {e.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("criteria_met"), bool):
        raise GradeError("grader JSON has no boolean 'criteria_met'")
    return obj["criteria_met"], str(obj.get("explanation", ""))


@dataclass
class Graded:
    conversation: Conversation
    reply: str
    num_tokens: int
    finish_reason: str
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    result: Score | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "prompt_id": self.conversation.id,
            "example_tags": list(self.conversation.tags),
            "reply": self.reply,
            "num_tokens": self.num_tokens,
            "num_words": len(self.reply.split()),
            "finish_reason": self.finish_reason,
            "items": self.verdicts,
            **(self.result.to_dict() if self.result else {}),
        }


def evaluate(
    conversations: list[Conversation],
    model: Engine,
    grader: Engine,
    reply_sampling: Sampling,
    grader_max_new_tokens: int,
    explanation_chars: int | None,
    seed: int,
) -> list[Graded]:
    """Replies by ``model`` (one batched call), then one batched grader call over every item.

    ``explanation_chars`` set = the grader is guided by a JSON schema (always parses on an
    engine that supports guides); None = free text, parsed leniently.
    """
    reqs = [
        Request(conv.messages, Sampling(**{**reply_sampling.__dict__, "n": 1, "seed": request_seed(seed, conv.id)}))
        for conv in conversations
    ]
    graded = []
    for conv, comps in zip(conversations, model.generate(reqs)):
        c = comps[0]
        graded.append(Graded(conv, roles.after_think(c.text).strip(), len(c.token_ids), c.finish_reason))
    guide = grader_guide(explanation_chars) if explanation_chars else None
    grader_reqs, where = [], []
    for g in graded:
        for k, item in enumerate(g.conversation.rubric):
            s = Sampling(
                temperature=0.0,
                max_new_tokens=grader_max_new_tokens,
                n=1,
                seed=request_seed(seed, "grade", g.conversation.id, k),
                guide=guide,
            )
            grader_reqs.append(Request(grader_messages(g.conversation, g.reply, item), s))
            where.append((g, item))
    for (g, item), comps in zip(where, grader.generate(grader_reqs) if grader_reqs else []):
        text = comps[0].text
        try:
            met, why = parse_grade(text)
            g.verdicts.append({"criterion": item.criterion, "points": item.points, "met": met, "explanation": why})
        except GradeError as e:
            g.verdicts.append(
                {"criterion": item.criterion, "points": item.points, "met": None, "error": str(e), "raw": text}
            )
    for g in graded:
        g.result = score(g.conversation.rubric, [v["met"] for v in g.verdicts])
    return graded


def per_conversation_score(records: list[dict[str, Any]]) -> dict[str, float | None]:
    return {r["prompt_id"]: r.get("score") for r in records}


def summarize(records: list[dict[str, Any]], resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    scores = per_conversation_score(records)
    by_tag: dict[str, list[float]] = {}
    for r in records:
        if r.get("score") is not None:
            for t in r["example_tags"]:
                by_tag.setdefault(t, []).append(r["score"])
    return {
        "num_conversations": len(records),
        "score": bootstrap_mean(list(scores.values()), resamples, confidence, request_seed(seed, "hb-score")).to_dict(),
        "raw_score_mean": _mean([r.get("raw_score") for r in records]),
        "scored": sum(v is not None for v in scores.values()),
        "unscorable": sum(r.get("possible", 0) <= 0 for r in records),
        "conversations_with_judge_failure": sum(r.get("judge_failures", 0) > 0 for r in records),
        "judge_failures": sum(r.get("judge_failures", 0) for r in records),
        "items_judged": sum(len(r["items"]) for r in records),
        "length_tokens_mean": _mean([r["num_tokens"] for r in records]),
        "by_tag": {t: sum(v) / len(v) for t, v in sorted(by_tag.items())},
    }


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None
