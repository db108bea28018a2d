"""The critic server's wire format: pydantic models with length limits, unknown fields rejected.

The rubric on the wire is the shared schema of :mod:`pop_nemo.selfplay.rubric` (a list of
``{name, gold, description, weight}``); requests are also checked with its
``validate_rubric``, so the server accepts exactly the rubrics the loop can score.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from pop_nemo.critic.base import Judgement, RubricResult
from pop_nemo.selfplay.rubric import MAX_CRITERIA, NOT_APPLICABLE, Criterion, RubricError, validate_rubric

TOKEN_ENV = "POP_NEMO_CRITIC_TOKEN"  # the bearer token, for the server and its clients
TIMEOUT_HEADER = "X-Pop-Timeout-S"  # seconds the caller will wait; the server times items out by then

# Field limits (characters). Generous for real use; the body limit (serve.max_body_mb) caps the total.
MAX_ID = 256
MAX_NAME = 256
MAX_CRITERION_TEXT = 8_192  # gold, description
MAX_PROBLEM = 32_768
MAX_REFERENCE = 32_768
MAX_ANSWER = 65_536
MAX_DOCUMENT = 131_072
MAX_ANSWERS = 256  # answers shown to one rubric request
MAX_ITEMS = 256  # judge items in one score request
MAX_SEED = 2**63


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (it holds a lone surrogate)") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be blank")
    return value


def Text(max_length: int, min_length: int = 0):  # noqa: N802 - a type factory
    """A string with a length limit, valid UTF-8; ``min_length`` >= 1 also means not blank."""
    checks = (AfterValidator(_utf8), AfterValidator(_not_blank)) if min_length else (AfterValidator(_utf8),)
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length), *checks]


Seed = Annotated[int, Field(ge=0, lt=MAX_SEED)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CriterionIn(_Strict):
    name: Text(MAX_NAME, 1)
    gold: Text(MAX_CRITERION_TEXT) = NOT_APPLICABLE
    description: Text(MAX_CRITERION_TEXT) = ""
    weight: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]


def _criteria(rubric: list[CriterionIn]) -> list[Criterion]:
    return validate_rubric([c.model_dump() for c in rubric])


class ScoreItemIn(_Strict):
    id: Text(MAX_ID, 1)
    problem: Text(MAX_PROBLEM, 1)
    rubric: Annotated[list[CriterionIn], Field(min_length=1, max_length=MAX_CRITERIA)]
    answer: Text(MAX_ANSWER, 1)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _shared_schema(self) -> ScoreItemIn:
        try:
            _criteria(self.rubric)
        except RubricError as e:
            raise ValueError(f"rubric: {e}") from None
        return self

    def criteria(self) -> list[Criterion]:
        return _criteria(self.rubric)


class ScoreRequest(_Strict):
    items: Annotated[list[ScoreItemIn], Field(min_length=1, max_length=MAX_ITEMS)]


class RubricRequest(_Strict):
    id: Text(MAX_ID, 1)
    document: Text(MAX_DOCUMENT, 1)
    problem: Text(MAX_PROBLEM, 1)
    reference: Text(MAX_REFERENCE, 1)
    answers: Annotated[list[Text(MAX_ANSWER, 1)], Field(min_length=1, max_length=MAX_ANSWERS)]
    seed: Seed | None = None


# ---------------------------------------------------------------- responses (lenient: extra fields ignored)


class CriterionOut(BaseModel):
    name: str
    gold: str
    description: str
    weight: float


class RatingOut(BaseModel):
    name: str
    rating: float
    thoughts: str = ""


class ScoreItemOut(BaseModel):
    id: str
    valid: bool
    score: float | None = Field(None, description="weighted score in [0, 2]")
    reward: float | None = Field(None, description="score / 2, in [0, 1]")
    ratings: list[RatingOut] = []
    error: str | None = None
    timed_out: bool = False
    raw: str = Field("", description="the judge's output")

    @classmethod
    def from_judgement(cls, j: Judgement) -> ScoreItemOut:
        return cls(
            id=j.id,
            valid=j.valid,
            score=j.score,
            reward=j.reward,
            ratings=[RatingOut(name=r.name, rating=r.rating, thoughts=r.thoughts) for r in j.ratings],
            error=j.error,
            timed_out=j.timed_out,
            raw=j.raw,
        )


class ScoreResponse(BaseModel):
    items: list[ScoreItemOut]


class RubricResponse(BaseModel):
    id: str
    valid: bool
    rubric: list[CriterionOut] | None = None
    error: str | None = None
    timed_out: bool = False
    raw: str = Field("", description="the rubric writer's output")

    @classmethod
    def from_result(cls, r: RubricResult, timed_out: bool = False) -> RubricResponse:
        return cls(
            id=r.id,
            valid=r.valid,
            rubric=[CriterionOut(**c.to_dict()) for c in r.rubric] if r.rubric else None,
            error=r.error,
            timed_out=timed_out,
            raw=r.raw,
        )


class Health(BaseModel):
    status: str
    model: str | None = None
    task: str | None = None
    max_batch: int | None = None
    queue_depth: int | None = None
    detail: str | None = None
