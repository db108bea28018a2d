"""Rubric validation and the pointwise weighted score (DESIGN §2), with hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from pop_nemo.selfplay.roles import parse_rubric
from pop_nemo.selfplay.rubric import (
    NOT_APPLICABLE,
    Criterion,
    Rating,
    RubricError,
    reward_from_score,
    validate_ratings,
    validate_rubric,
    weighted_score,
)


def crit(name: str, weight: float) -> Criterion:
    return Criterion(name=name, gold="g", description="d", weight=weight)


def raw(name: str = "Accuracy", weight=1, **extra) -> dict:
    return {"name": name, "gold": "g", "description": "d", "weight": weight, **extra}


ABC = [crit("A", 1), crit("B", 2), crit("C", 3)]


# ---------------------------------------------------------------- weighted_score


def test_weighted_score_weights_123_ratings_210():
    got = weighted_score(ABC, [Rating("A", 2), Rating("B", 1), Rating("C", 0)])
    assert got == pytest.approx((1 * 2 + 2 * 1 + 3 * 0) / 6)  # 4/6


def test_weighted_score_all_two_is_two_and_all_zero_is_zero():
    assert weighted_score(ABC, [Rating(n, 2) for n in "ABC"]) == pytest.approx(2.0)
    assert weighted_score(ABC, [Rating(n, 0) for n in "ABC"]) == 0.0


def test_weighted_score_non_integer_weights():
    criteria = [crit("x", 0.5), crit("y", 1.5)]
    assert weighted_score(criteria, [Rating("x", 1), Rating("y", 2)]) == pytest.approx((0.5 + 3.0) / 2.0)


def test_names_match_case_insensitively_after_strip():
    criteria = [crit("Factual Accuracy", 1), crit("Safety", 3)]
    ratings = [Rating("  factual ACCURACY ", 2), Rating("SAFETY\n", 1)]
    assert weighted_score(criteria, ratings) == pytest.approx((1 * 2 + 3 * 1) / 4)


def test_judged_name_not_in_rubric_is_ignored():
    ratings = [Rating("A", 2), Rating("B", 1), Rating("C", 0), Rating("Invented", 2)]
    assert weighted_score(ABC, ratings) == pytest.approx(4 / 6)


def test_unrated_criterion_counts_zero():
    # C (weight 3) unrated: (1*2 + 2*1 + 3*0) / 6
    assert weighted_score(ABC, [Rating("A", 2), Rating("B", 1)]) == pytest.approx(4 / 6)
    # A and B unrated: (0 + 0 + 3*1) / 6
    assert weighted_score(ABC, [Rating("C", 1)]) == pytest.approx(3 / 6)
    assert weighted_score(ABC, []) == 0.0


def test_ratings_are_clipped_to_0_2():
    # A: -3 -> 0, B: 7 -> 2, C: 1.5 stays
    got = weighted_score(ABC, [Rating("A", -3), Rating("B", 7), Rating("C", 1.5)])
    assert got == pytest.approx((1 * 0 + 2 * 2 + 3 * 1.5) / 6)


def test_duplicate_rating_last_counts_as_in_the_papers_dict():
    got = weighted_score(ABC, [Rating("B", 2), Rating("b", 0), Rating("A", 0), Rating("A", 2)])
    assert got == pytest.approx((1 * 2 + 2 * 0) / 6)


def test_reward_from_score_is_half():
    assert reward_from_score(0.0) == 0.0
    assert reward_from_score(2.0) == 1.0
    assert reward_from_score(4 / 6) == pytest.approx(1 / 3)


def test_score_and_reward_of_a_validated_rubric():
    criteria = validate_rubric([raw("Dose", 2), raw("Warning signs", "1")])
    ratings = validate_ratings(
        {"evaluation": [{"name": "dose", "rating": "1"}, {"name": "Warning Signs", "rating": 2}]}
    )
    assert weighted_score(criteria, ratings) == pytest.approx((2 * 1 + 1 * 2) / 3)
    assert reward_from_score(weighted_score(criteria, ratings)) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- validate_rubric


@pytest.mark.parametrize(("n", "msg"), [(0, "no criteria"), (6, "6 criteria")])
def test_criteria_count_outside_1_to_5_is_invalid(n, msg):
    with pytest.raises(RubricError, match=msg):
        validate_rubric([raw(f"c{i}") for i in range(n)])


@pytest.mark.parametrize("n", [1, 5])
def test_criteria_count_1_and_5_are_valid(n):
    assert [c.name for c in validate_rubric([raw(f"c{i}") for i in range(n)])] == [f"c{i}" for i in range(n)]


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan"), float("inf"), "abc", True, None, [1], "nan"])
def test_bad_weight_is_invalid_and_names_the_criterion(weight):
    with pytest.raises(RubricError, match="'Accuracy'.*weight"):
        validate_rubric([raw("Ok", 1), raw("Accuracy", weight)])


def test_missing_weight_is_invalid():
    with pytest.raises(RubricError, match="weight"):
        validate_rubric([{"name": "A", "gold": "g", "description": "d"}])


def test_numeric_string_weights_are_accepted():
    got = validate_rubric([raw("A", "3"), raw("B", " 0.5 "), raw("C", 2)])
    assert [c.weight for c in got] == [3.0, 0.5, 2.0]


@pytest.mark.parametrize("gold", ["", "   ", None])
def test_empty_gold_becomes_not_applicable(gold):
    assert validate_rubric([raw(gold=gold)])[0].gold == NOT_APPLICABLE == "Not applicable"


def test_missing_gold_becomes_not_applicable_and_non_string_gold_is_text():
    got = validate_rubric([{"name": "A", "description": "d", "weight": 1}, raw("B", gold=42)])
    assert got[0].gold == "Not applicable"
    assert got[1].gold == "42"


def test_duplicate_names_are_one_criterion_first_place_last_fields():
    got = validate_rubric([raw("Accuracy", 1), raw("Safety", 2), raw(" accuracy ", 3), raw("ACCURACY", 5)])
    assert got == [Criterion("ACCURACY", "g", "d", 5.0), Criterion("Safety", "g", "d", 2.0)]
    # the paper's weights dict: Σw counts the name once, with its last weight
    assert weighted_score(got, [Rating("accuracy", 2), Rating("safety", 1)]) == pytest.approx((5 * 2 + 2 * 1) / 7)


def test_name_is_stripped_and_required():
    assert validate_rubric([raw("  Safety  ")])[0].name == "Safety"
    with pytest.raises(RubricError, match="criterion 1 has no name"):
        validate_rubric([raw("A"), raw("   ")])
    with pytest.raises(RubricError, match="criterion 0 has no name"):
        validate_rubric([{"gold": "g", "description": "d", "weight": 1}])


def test_rubric_shape_errors():
    with pytest.raises(RubricError, match="object or list of criteria"):
        validate_rubric("not a rubric")
    with pytest.raises(RubricError, match="criterion 0 is not an object"):
        validate_rubric(["Accuracy"])
    with pytest.raises(RubricError, match="description must be a string"):
        validate_rubric([raw(description=3)])


def test_criteria_wrapper_is_accepted():
    assert validate_rubric({"criteria": [raw("A", 2)]}) == [Criterion("A", "g", "d", 2.0)]


def test_paper_keyed_form_through_parse_rubric():
    body = {
        "criterion_1": {"name": "Dose", "gold": "500 mg", "description": "states the dose", "weight": 3},
        "criterion_2": {"name": "Safety", "gold": "", "description": "mentions risks", "weight": "1"},
        "criterion_3": {"gold": "yes", "description": "no name given", "weight": 2},
    }
    got = parse_rubric(f"<rubric>\n{json.dumps(body)}\n</rubric>")
    assert got == [
        Criterion("Dose", "500 mg", "states the dose", 3.0),
        Criterion("Safety", "Not applicable", "mentions risks", 1.0),
        Criterion("criterion_3", "yes", "no name given", 2.0),
    ]


# ---------------------------------------------------------------- validate_ratings


def test_validate_ratings_numbers_and_strings():
    got = validate_ratings([{"name": "A", "rating": 2, "thoughts": "ok"}, {"name": "B", "rating": "1"}])
    assert got == [Rating("A", 2.0, "ok"), Rating("B", 1.0, "")]


@pytest.mark.parametrize("rating", ["good", None, True, float("nan"), float("inf")])
def test_non_numeric_rating_is_an_error(rating):
    with pytest.raises(RubricError, match="rating 0 \\('A'\\) is not a finite number"):
        validate_ratings([{"name": "A", "rating": rating}])


def test_out_of_range_rating_is_kept_for_clipping():
    got = validate_ratings([{"name": "A", "rating": 5}, {"name": "B", "rating": -1}])
    assert [r.rating for r in got] == [5.0, -1.0]
    assert weighted_score([crit("A", 1), crit("B", 1)], got) == pytest.approx(1.0)


@pytest.mark.parametrize(("rating", "score"), [(100.0, 2.0), (-100.0, 0.0), (math.pi, 2.0), (0.25, 0.25)])
def test_single_criterion_score_is_the_clipped_rating(rating, score):
    assert weighted_score([crit("A", 7)], [Rating("A", rating)]) == pytest.approx(score)


def test_weights_near_the_float_limit():
    # one huge weight: w/Σw first, so the score is 2, not inf (the paper's Σ w·r overflows)
    assert weighted_score([crit("A", 1e308)], [Rating("A", 2)]) == 2.0
    with pytest.raises(RubricError, match="sum to more than a float holds"):
        validate_rubric([raw("A", 1e308), raw("B", 1e308)])


def test_empty_evaluation_is_an_error_not_a_zero():
    with pytest.raises(RubricError, match="empty evaluation"):
        validate_ratings({})
