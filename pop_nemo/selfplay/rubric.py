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


def _number(value: Any, paper: bool = False) -> float | None:
    """A float, or None. Default: JSON numbers and numeric strings, never booleans. ``paper``:
    what Python's ``float()`` takes (booleans included), as the paper's code converts."""
    if isinstance(value, bool) and not paper:
        return None
    if not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        return None


def _criteria_items(obj: Any, what: str, paper: bool) -> list[tuple[str | None, Any]]:
    """``(key, item)`` pairs. The paper takes only ``{"criterion_1": {...}, ...}``; pop_nemo
    also takes a list, ``{"criteria": [...]}`` or ``{"evaluation": [...]}``."""
    if not paper and isinstance(obj, dict) and isinstance(obj.get(what), list):
        obj = obj[what]
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, list) and not paper:
        return [(None, item) for item in obj]
    return _not_object(what, paper)


def _not_object(what: str, paper: bool) -> list:
    form = "a JSON object of criteria" if paper else "a JSON object or list of criteria"
    raise RubricError(f"{'rubric' if what == 'criteria' else 'evaluation'} must be {form}")


def _fields(key: str | None, item: Any, i: int, kind: str, exact: tuple[set[str], ...] | None) -> dict[str, Any]:
    """The item as a dict with ``name`` filled from its key (both codes do this)."""
    if not isinstance(item, dict):
        raise RubricError(f"{kind} {i} is not an object")
    if "name" not in item and key is not None:
        item = {**item, "name": key}
    if exact is not None and set(item) not in exact:
        want = " or ".join(str(sorted(e)) for e in exact)
        raise RubricError(f"{kind} {i} has keys {sorted(item)}; the paper's rules want exactly {want}")
    return item


def validate_rubric(obj: Any, paper: bool = False) -> list[Criterion]:
    """Return the criteria of a parsed rubric, or raise RubricError naming what is wrong.

    Both rule sets (DESIGN §6): a criterion's ``name`` defaults to its key; names match
    case-folded after strip, and a repeated name is one criterion at its first position with
    the fields of its last occurrence (the paper keeps a dict by name); each weight is finite
    and > 0.
    Default: 1 to 5 criteria, a non-empty name, extra keys ignored, ``gold`` optional ("Not
    applicable"), weight a finite number > 0 (no boolean). ``paper``: the key set is exactly
    {name, gold or ground_truth, weight, description} with ``name`` present, all strings but
    the weight, which is anything ``float()`` takes (booleans, numeric strings) that is > 0.
    """
    exact = ({"name", "gold", "weight", "description"}, {"name", "ground_truth", "weight", "description"})
    merged: dict[str, Criterion] = {}
    for i, (key, raw) in enumerate(_criteria_items(obj, "criteria", paper)):
        if paper and isinstance(raw, dict) and "name" not in raw:
            # The paper fills it from the key, but its scorer reads names from the raw rubric
            # text, so every judgement of such a rubric fails there.
            raise RubricError(f"criterion {i} has no name key (the paper's scorer needs one)")
        c = _fields(key, raw, i, "criterion", exact if paper else None)
        name = c.get("name")
        if not isinstance(name, str) or (not paper and not name.strip()):
            raise RubricError(f"criterion {i} has no name (a string)")
        name = name.strip()
        description = c.get("description", "")
        if not isinstance(description, str):
            raise RubricError(f"criterion {name!r}: description must be a string")
        gold = c.get("gold", c.get("ground_truth", NOT_APPLICABLE))
        if paper and not isinstance(gold, str):
            raise RubricError(f"criterion {name!r}: gold must be a string")
        if gold is None or (isinstance(gold, str) and not gold.strip()):
            gold = NOT_APPLICABLE
        weight = _number(c.get("weight"), paper)
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise RubricError(f"criterion {name!r}: weight must be a finite number > 0, got {c.get('weight')!r}")
        crit = Criterion(name=name, gold=str(gold), description=description, weight=weight)
        merged[_key(name)] = crit  # first position, last occurrence's fields
    criteria = list(merged.values())
    if not criteria:
        raise RubricError("rubric has no criteria")
    if not math.isfinite(sum(c.weight for c in criteria)):
        raise RubricError("rubric weights sum to more than a float holds")
    if not paper and len(criteria) > MAX_CRITERIA:
        raise RubricError(f"rubric has {len(criteria)} criteria; expected {MIN_CRITERIA} to {MAX_CRITERIA}")
    return criteria


def validate_ratings(obj: Any, paper: bool = False) -> list[Rating]:
    """Parse a judge's evaluation into its ratings, in order (a name may repeat; the last counts).

    Both rule sets: an empty evaluation is a failed judge call (the paper's ``not evaluation``);
    ``name`` defaults to the key; out-of-range ratings are kept and clipped when scoring.
    Default: a list or object of ``{name, rating, thoughts}`` with extra keys ignored, a rating
    that is a finite number (no boolean). ``paper``: exactly the keys {name, rating, thoughts},
    name and thoughts strings, a rating ``float()`` takes (booleans, ±inf); NaN is refused.
    """
    ratings: list[Rating] = []
    for i, (key, raw) in enumerate(_criteria_items(obj, "evaluation", paper)):
        r = _fields(key, raw, i, "rating", ({"name", "rating", "thoughts"},) if paper else None)
        name = r.get("name")
        if not isinstance(name, str):
            raise RubricError(f"rating {i} has no name (a string)")
        thoughts = r.get("thoughts", "")
        if paper and not isinstance(thoughts, str):
            raise RubricError(f"rating {i} ({name!r}): thoughts must be a string")
        value = _number(r.get("rating"), paper)
        if value is None or math.isnan(value) or (not paper and math.isinf(value)):
            raise RubricError(f"rating {i} ({name!r}) is not a finite number: {r.get('rating')!r}")
        ratings.append(Rating(name=name, rating=value, thoughts=str(thoughts)))
    if not ratings:
        raise RubricError("empty evaluation: no criterion was rated (a failed judge call, as in the paper)")
    return ratings


def _key(name: str) -> str:
    return name.strip().casefold()


def weighted_score(criteria: list[Criterion], ratings: list[Rating]) -> float:
    """``Σ w·clip(r, 0, 2) / Σ w`` in [0, 2] (with weights > 0).

    Names match case-insensitively after strip; a rated name not in the rubric is ignored; a
    criterion left unrated counts 0; a name rated twice counts its last rating (the paper's dict).
    """
    by_name = {_key(r.name): r.rating for r in ratings}
    total = sum(c.weight for c in criteria)
    if not 0 < total < math.inf:
        raise RubricError("rubric weights must sum to a finite number > 0")
    # w/total first: no overflow for weights near the float limit
    return sum((c.weight / total) * min(max(by_name.get(_key(c.name), 0.0), 0.0), MAX_RATING) for c in criteria)


def reward_from_score(score: float) -> float:
    """Reward in [0, 1]."""
    return score / MAX_RATING


def tie_stats(groups: list[list[float]]) -> tuple[float | None, float | None]:
    """How much the judge still discriminates: ``(tie_rate, all_equal_rate)``.

    ``groups`` holds the judge scores of each group's validly judged answers. ``tie_rate`` is
    the share of within-group answer pairs with equal scores; ``all_equal_rate`` the share of
    groups (with at least 2 scores) whose scores are all equal. None where nothing counts.
    """
    pairs = ties = counted = equal = 0
    for scores in groups:
        n = len(scores)
        if n < 2:
            continue
        counted += 1
        equal += max(scores) == min(scores)
        pairs += n * (n - 1) // 2
        ties += sum(scores[i] == scores[j] for i in range(n) for j in range(i + 1, n))
    return (ties / pairs if pairs else None), (equal / counted if counted else None)
