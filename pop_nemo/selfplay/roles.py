"""Prompts, parsers and decoding guides for the four roles, per task.

The wording is ours; the semantics follow the paper's code (HCY123902/POP): tags
``<problem>``/``<answer>`` for the proposer, ``<answer>`` for the solver, ``<rubric>`` holding a
JSON object ``{"criterion_1": {name, gold, description, weight}, ...}`` and ``<evaluation>``
holding ``{"criterion_1": {name, thoughts, rating}, ...}``. A tag must occur exactly once; its
stripped content must not be empty or ``...``; text before the last ``</think>`` is ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

from pop_nemo.engines.base import Guide, Message
from pop_nemo.selfplay.rubric import (
    MAX_CRITERIA,
    MAX_RATING,
    Criterion,
    Rating,
    RubricError,
    validate_ratings,
    validate_rubric,
)

_GENERAL_PROPOSER = """You write exam problems from reference material. From the knowledge you are given, write one challenging, clear and unambiguous problem whose answer can be assessed.

Format:
- Put the problem in <problem>...</problem>. Make it self-contained: give the context a reader needs, and never refer to "the knowledge", "the text" or "as mentioned". Do not reveal the answer in the problem.
- Put a reference answer in <answer>...</answer>, without your reasoning."""

_HEALTH_PROPOSER = """You write health and medical questions from reference material. From the knowledge you are given, write one challenging, clear and unambiguous question whose answer can be assessed.

Guidelines:
- List for yourself the facts in the knowledge, then ask a question that needs one or more of them, and whose answer follows from them.
- Ask as a patient seeking advice, or as a clinician asking about professional knowledge.

Format:
- Put the question in <problem>...</problem>. Make it self-contained: give the context a reader needs, and never refer to "the knowledge", "the text" or "as mentioned". Do not reveal the answer in the question.
- Put a final, concise reference answer in <answer>...</answer>, without your reasoning."""

_WRITING_PROPOSER = """You write creative writing assignments from book descriptions. From the text sample you are given, write one challenging, clear creative writing task that builds on its characters, relations and setting (a story, a scene, a dialogue, a continuation, or an expansion of the setting).

Format:
- Put the task in <problem>...</problem>. Make it self-contained: give the context a writer needs, and never refer to "the text sample" or "as mentioned". End it with a length requirement such as "Length: 300 words."
- Put a reference answer (a response to the task) in <answer>...</answer>, without your reasoning."""

_GENERAL_SOLVER = "You are a helpful assistant. Answer the question. Think step by step, then give your answer inside <answer>...</answer>."
_HEALTH_SOLVER = (
    "You are an assistant that gives health and medical advice. Answer the question. "
    "Think step by step, then give your final answer inside <answer>...</answer>."
)

RUBRIC_SYSTEM = """You write grading rubrics. Given a piece of knowledge, a problem, its reference answer and some candidate answers, write a rubric of 1 to 5 criteria that separates good answers from bad ones.

Each criterion has a "name"; a "gold" standard answer taken or inferred from the knowledge, as short as possible ("Not applicable" when there is none); a "description" saying precisely what a good and a bad answer contain for this problem; and a numeric "weight" for how much it matters.

Prefer a few specific, discriminative criteria over generic ones like "clarity": two specific criteria beat five general ones. Criteria must not overlap.

Put the rubric in <rubric>...</rubric> as JSON:
<rubric>
{"criterion_1": {"name": "...", "gold": "...", "description": "...", "weight": 3}, "criterion_2": {...}}
</rubric>"""

JUDGE_SYSTEM = """You grade an answer with a rubric. For every criterion of the rubric, write brief thoughts (does the answer match the gold standard, if there is one?) and a rating: 0 (bad), 1 (medium) or 2 (good). Give 2 only when the answer fully matches the gold standard, 1 when it matches in part, 0 when it does not match.

Put the evaluation in <evaluation>...</evaluation> as JSON:
<evaluation>
{"criterion_1": {"name": "...", "thoughts": "...", "rating": 2}, "criterion_2": {...}}
</evaluation>"""


@dataclass(frozen=True)
class Task:
    name: str
    proposer_system: str
    doc_tag: str  # how the document is shown to the proposer
    solver_system: str
    writing: bool  # writing tasks show fewer, word-capped answers to the rubric writer
    domains: tuple[str, ...]  # the bundled mini corpus's documents for this task (``corpus.domains`` unset)

    def proposer_messages(self, document: str) -> list[Message]:
        kind = "creative writing task" if self.writing else "problem"
        user = (
            f"<{self.doc_tag}>\n{document}\n</{self.doc_tag}>\n\n"
            f"Now write one challenging, clear {kind} and its reference answer, using the {self.doc_tag.replace('_', ' ')} above as context."
        )
        return [{"role": "system", "content": self.proposer_system}, {"role": "user", "content": user}]

    def solver_messages(self, problem: str) -> list[Message]:
        return [{"role": "system", "content": self.solver_system}, {"role": "user", "content": problem}]


TASKS: dict[str, Task] = {
    "health_care": Task(
        "health_care", _HEALTH_PROPOSER, "knowledge", _HEALTH_SOLVER, writing=False, domains=("health",)
    ),
    "creative_writing": Task(
        "creative_writing", _WRITING_PROPOSER, "text_sample", _GENERAL_SOLVER, writing=True, domains=("books",)
    ),
    "instruction_following": Task(
        "instruction_following", _GENERAL_PROPOSER, "knowledge", _GENERAL_SOLVER, writing=False, domains=("web",)
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


# ---------------------------------------------------------------- parsing

_PLACEHOLDERS = {"", "..."}


def after_think(text: str) -> str:
    pos = text.rfind("</think>")
    return text if pos < 0 else text[pos + len("</think>") :]


def extract_tag(text: str, tag: str) -> str | None:
    """The stripped content of the one ``<tag>...</tag>`` in ``text``, or None."""
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", after_think(text), flags=re.DOTALL)
    if len(matches) != 1:
        return None
    got = matches[0].strip()
    return None if got in _PLACEHOLDERS else got


def parse_proposal(text: str) -> tuple[str, str] | None:
    problem, reference = extract_tag(text, "problem"), extract_tag(text, "answer")
    if problem is None or reference is None:
        return None
    return problem, reference


def extract_answer(text: str) -> str | None:
    return extract_tag(text, "answer")


def _tagged_json(text: str, tag: str, paper: bool = False) -> Any:
    """The JSON in the one ``<tag>`` block; by default also a bare JSON output (guided decoding
    emits no tags), which the paper's code refuses. Raises only RubricError: json's
    ValueError (integers of thousands of digits too) and RecursionError (deep nesting) included."""
    body = extract_tag(text, tag)
    if body is None:
        stripped = after_think(text).strip()
        if not paper and stripped.startswith(("{", "[")):
            body = stripped
        else:
            raise RubricError(f"no single <{tag}>...</{tag}> block")
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise RubricError(f"<{tag}> is not valid JSON: {e.msg} at char {e.pos}") from None
    except (ValueError, RecursionError) as e:
        raise RubricError(f"<{tag}> is not usable JSON: {str(e)[:120]}") from None


def parse_rubric(text: str, paper: bool = False) -> list[Criterion]:
    """The rubric writer's criteria; raises RubricError (and nothing else) with the reason."""
    return validate_rubric(_tagged_json(text, "rubric", paper), paper)


def parse_evaluation(text: str, paper: bool = False) -> list[Rating]:
    """The judge's ratings; raises RubricError (and nothing else) with the reason."""
    return validate_ratings(_tagged_json(text, "evaluation", paper), paper)


# ---------------------------------------------------------------- rubric writer and judge inputs


def subsample_answers(answers: list[str], writing: bool) -> list[str]:
    """Length-stratified subset for the rubric writer (DESIGN §2): sort by length, every k-th."""
    ordered = sorted(answers, key=len)
    n = len(ordered)
    step = max(n // 4, 1) if writing else max(n // 10, 1)
    picked = ordered[::step]
    if writing:
        picked = [" ".join(a.split(" ")[:2048]) for a in picked]
    return picked


def rubric_messages(document: str, problem: str, reference: str, answers: list[str]) -> list[Message]:
    shown = "\n\n".join(f"<candidate_answer_{i}>\n{a}\n</candidate_answer_{i}>" for i, a in enumerate(answers, 1))
    user = (
        f"<knowledge>\n{document}\n</knowledge>\n\n<problem>\n{problem}\n</problem>\n\n"
        f"<reference_answer>\n{reference}\n</reference_answer>\n\n<candidate_answers>\n{shown}\n</candidate_answers>\n\n"
        "Now write the rubric."
    )
    return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]


def rubric_text(criteria: list[Criterion]) -> str:
    """The canonical JSON the judge sees (the paper's keyed form)."""
    return json.dumps({f"criterion_{i}": c.to_dict() for i, c in enumerate(criteria, 1)}, indent=1, ensure_ascii=False)


def judge_messages(problem: str, criteria: list[Criterion], answer: str) -> list[Message]:
    user = (
        f"<problem>\n{problem}\n</problem>\n\n<rubric>\n{rubric_text(criteria)}\n</rubric>\n\n"
        f"<candidate_answer>\n{answer}\n</candidate_answer>\n\nNow evaluate the candidate answer."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- guides (bounded, so output always ends)


@dataclass(frozen=True)
class GuideLimits:
    """Character bounds of guided fields: a guided output always finishes within
    ``max_new_tokens`` when that is at least the sum of its bounds. The bounds have no defaults
    here: ``rollout.guide`` declares them (with their limits) once, :meth:`from_section` reads them."""

    problem_chars: int
    reference_chars: int
    name_chars: int
    gold_chars: int
    description_chars: int
    thoughts_chars: int
    max_criteria: int
    max_weight: int = 10  # the weight bound of the rubric guide: not a setting

    @classmethod
    def from_section(cls, section: Any) -> GuideLimits:
        """The limits a ``rollout.guide`` section sets, field by field under the same names (all but
        ``max_weight``, which keeps its value here)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})

    def rubric_chars(self) -> int:
        """Upper bound on a guided rubric's length in characters (so in tokens)."""
        per = self.name_chars + self.gold_chars + self.description_chars + 80
        return self.max_criteria * per + 2

    def judge_chars(self, num_criteria: int) -> int:
        return num_criteria * (self.name_chars + self.thoughts_chars + 60) + 2

    def proposer_chars(self) -> int:
        return self.problem_chars + self.reference_chars + 40


def proposer_guide(lim: GuideLimits) -> Guide:
    ebnf = (
        'root ::= "<problem>" problem "</problem>\\n<answer>" reference "</answer>"\n'
        f"problem ::= [^< \\t\\n] [^<]{{0,{lim.problem_chars - 1}}}\n"
        f"reference ::= [^< \\t\\n] [^<]{{0,{lim.reference_chars - 1}}}\n"
    )
    return Guide("ebnf", ebnf)


def _name_schema(lim: GuideLimits) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^[A-Za-z][A-Za-z0-9 ,()'/-]{{1,{lim.name_chars - 1}}}$"}


def rubric_guide(lim: GuideLimits) -> Guide:
    crit = {
        "type": "object",
        "properties": {
            "name": _name_schema(lim),
            "gold": {"type": "string", "minLength": 1, "maxLength": lim.gold_chars},
            "description": {"type": "string", "minLength": 1, "maxLength": lim.description_chars},
            "weight": {"type": "integer", "minimum": 1, "maximum": lim.max_weight},
        },
        "required": ["name", "gold", "description", "weight"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {f"criterion_{i}": crit for i in range(1, min(lim.max_criteria, MAX_CRITERIA) + 1)},
        "required": ["criterion_1"],
        "additionalProperties": False,
    }
    return Guide("json_schema", json.dumps(schema))


def judge_guide(criteria: list[Criterion], lim: GuideLimits) -> Guide:
    """Rate every criterion of *this* rubric, by its exact name, with 0, 1 or 2."""
    props = {
        f"criterion_{i}": {
            "type": "object",
            "properties": {
                "name": {"const": c.name},
                "thoughts": {"type": "string", "maxLength": lim.thoughts_chars},
                "rating": {"enum": list(range(MAX_RATING + 1))},
            },
            "required": ["name", "thoughts", "rating"],
            "additionalProperties": False,
        }
        for i, c in enumerate(criteria, 1)
    }
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return Guide("json_schema", json.dumps(schema, ensure_ascii=False))
