"""Rubric schema, validation and the pointwise weighted score (DESIGN §2).

One implementation, used by the online loop, the offline synthesizer and the critic server.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

MIN_CRITERIA = 1
MAX_CRITERIA = 5
MAX_RATING = 2
NOT_APPLICABLE = "Not applicable"


@dataclass(frozen=True)
class Criterion:
    name: str
    gold: str
    description: str
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rating:
    name: str
    rating: float
    thoughts: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RubricError(ValueError):
    """The rubric (or a judgement of it) breaks the schema; the message says which part."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def validate_rubric(obj: Any) -> list[Criterion]:
    """Return the criteria of a parsed rubric, or raise RubricError naming what is wrong.

    Accepts a list of criteria, or ``{"criteria": [...]}``. Each criterion needs a non-empty
    ``name``, a ``description``, a ``gold`` (empty becomes "Not applicable") and a finite
    weight > 0. The judge matches by case-folded name, so a repeated name gets a suffix
    (" (2)") rather than sinking the whole rubric.
    """
    if isinstance(obj, dict) and "criteria" in obj:
        obj = obj["criteria"]
    if not isinstance(obj, list):
        raise RubricError("rubric must be a JSON list of criteria")
    if not MIN_CRITERIA <= len(obj) <= MAX_CRITERIA:
        raise RubricError(f"rubric has {len(obj)} criteria; expected {MIN_CRITERIA} to {MAX_CRITERIA}")
    criteria: list[Criterion] = []
    seen: set[str] = set()
    for i, c in enumerate(obj):
        if not isinstance(c, dict):
            raise RubricError(f"criterion {i} is not an object")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RubricError(f"criterion {i} has no name")
        name = name.strip()
        k = 2
        while _key(name) in seen:
            name = f"{c['name'].strip()} ({k})"
            k += 1
        seen.add(_key(name))
        description = c.get("description", "")
        if not isinstance(description, str):
            raise RubricError(f"criterion {name!r}: description must be a string")
        gold = c.get("gold", NOT_APPLICABLE)
        if gold is None or (isinstance(gold, str) and not gold.strip()):
            gold = NOT_APPLICABLE
        if not isinstance(gold, str):
            gold = str(gold)
        weight = _number(c.get("weight"))
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise RubricError(f"criterion {name!r}: weight must be a finite number > 0, got {c.get('weight')!r}")
        criteria.append(Criterion(name=name, gold=gold, description=description, weight=weight))
    return criteria


def validate_ratings(obj: Any) -> list[Rating]:
    """Parse a judge's evaluation: a list of ``{name, rating, thoughts}`` (or ``{"evaluation": [...]}``).

    A rating that is not a number is an error; out-of-range numbers are kept and clipped
    when scoring, as the paper's code does.
    """
    if isinstance(obj, dict) and "evaluation" in obj:
        obj = obj["evaluation"]
    if not isinstance(obj, list):
        raise RubricError("evaluation must be a JSON list of ratings")
    ratings: list[Rating] = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise RubricError(f"rating {i} is not an object")
        name = r.get("name")
        if not isinstance(name, str):
            raise RubricError(f"rating {i} has no name")
        value = _number(r.get("rating"))
        if value is None or not math.isfinite(value):
            raise RubricError(f"rating {i} ({name!r}) is not a number: {r.get('rating')!r}")
        thoughts = r.get("thoughts", "")
        ratings.append(Rating(name=name, rating=value, thoughts=str(thoughts)))
    return ratings


def _key(name: str) -> str:
    return name.strip().casefold()


def weighted_score(criteria: list[Criterion], ratings: list[Rating]) -> float:
    """``Σ w·clip(r, 0, 2) / Σ w`` in [0, 2].

    Names match case-insensitively after strip; a rated name not in the rubric is ignored; a
    criterion left unrated counts 0. If a name is rated twice, the first rating counts.
    """
    by_name: dict[str, float] = {}
    for r in ratings:
        by_name.setdefault(_key(r.name), r.rating)
    total = sum(c.weight for c in criteria)
    if total <= 0:
        raise RubricError("rubric weights sum to zero")
    got = sum(c.weight * min(max(by_name.get(_key(c.name), 0), 0), MAX_RATING) for c in criteria)
    return got / total


def reward_from_score(score: float) -> float:
    """Reward in [0, 1]."""
    return score / MAX_RATING
