"""Role parsers, rubric-writer / judge inputs, and the xgrammar guides (DESIGN §1-2)."""

from __future__ import annotations

import json

import pytest

from pop_nemo.config import GuideConfig
from pop_nemo.selfplay.roles import (
    TASKS,
    GuideLimits,
    extract_answer,
    extract_tag,
    get_task,
    judge_guide,
    judge_messages,
    parse_evaluation,
    parse_proposal,
    parse_rubric,
    proposer_guide,
    rubric_guide,
    rubric_messages,
    subsample_answers,
)
from pop_nemo.selfplay.rubric import Criterion, Rating, RubricError

# ---------------------------------------------------------------- extract_tag


def test_extract_tag_one_match_is_stripped():
    assert extract_tag("blah <answer>\n  42 \n</answer> tail", "answer") == "42"


def test_extract_tag_multiline_content():
    assert extract_tag("<answer>line 1\nline 2</answer>", "answer") == "line 1\nline 2"


@pytest.mark.parametrize(
    "text",
    [
        "no tag at all",
        "<answer>1</answer> and <answer>2</answer>",
        "<answer>...</answer>",
        "<answer> ... </answer>",
        "<answer></answer>",
        "<answer>   \n </answer>",
        "<answer>unclosed",
        "<problem>wrong tag</problem>",
    ],
)
def test_extract_tag_rejects(text):
    assert extract_tag(text, "answer") is None


def test_text_before_last_think_is_ignored():
    text = "<think>draft <answer>wrong</answer></think> more <think>x</think> <answer>right</answer>"
    assert extract_tag(text, "answer") == "right"
    # a tag only inside the thinking does not count
    assert extract_tag("<think><answer>hidden</answer></think> no answer here", "answer") is None
    # two answers, one of them before </think>: exactly one remains
    assert extract_answer("<answer>a</answer></think><answer>b</answer>") == "b"


def test_parse_proposal():
    text = "<problem>What dose of X is safe?</problem>\n<answer>At most 4 g a day.</answer>"
    assert parse_proposal(text) == ("What dose of X is safe?", "At most 4 g a day.")


@pytest.mark.parametrize(
    "text",
    [
        "<problem>Only a problem</problem>",
        "<answer>Only an answer</answer>",
        "<problem>...</problem><answer>x</answer>",
        "<problem>p1</problem><problem>p2</problem><answer>x</answer>",
    ],
)
def test_parse_proposal_rejects(text):
    assert parse_proposal(text) is None


# ---------------------------------------------------------------- parse_rubric / parse_evaluation

RUBRIC_OBJ = {
    "criterion_1": {"name": "Dose", "gold": "4 g", "description": "states the maximum dose", "weight": 3},
    "criterion_2": {"name": "Liver", "gold": "", "description": "warns about the liver", "weight": 1},
}
RUBRIC = [
    Criterion("Dose", "4 g", "states the maximum dose", 3.0),
    Criterion("Liver", "Not applicable", "warns about the liver", 1.0),
]
EVAL_OBJ = {
    "criterion_1": {"name": "Dose", "thoughts": "right dose", "rating": 2},
    "criterion_2": {"name": "Liver", "thoughts": "not mentioned", "rating": 0},
}
EVAL = [Rating("Dose", 2.0, "right dose"), Rating("Liver", 0.0, "not mentioned")]


def test_parse_rubric_tagged():
    assert parse_rubric(f"Here it is:\n<rubric>\n{json.dumps(RUBRIC_OBJ)}\n</rubric>") == RUBRIC


def test_parse_rubric_bare_json_and_after_think():
    assert parse_rubric(json.dumps(RUBRIC_OBJ, separators=(",", ":"))) == RUBRIC
    assert parse_rubric(f"<think>plan {{</think>  {json.dumps(RUBRIC_OBJ)}") == RUBRIC


def test_parse_rubric_list_form():
    assert parse_rubric(f"<rubric>{json.dumps(list(RUBRIC_OBJ.values()))}</rubric>") == RUBRIC


def test_parse_evaluation_tagged_and_bare():
    assert parse_evaluation(f"<evaluation>{json.dumps(EVAL_OBJ)}</evaluation>") == EVAL
    assert parse_evaluation(json.dumps(EVAL_OBJ)) == EVAL
    assert parse_evaluation(json.dumps({"evaluation": list(EVAL_OBJ.values())})) == EVAL


def test_malformed_json_is_a_readable_rubric_error():
    with pytest.raises(RubricError, match=r"^<rubric> is not valid JSON: .+ at char \d+$"):
        parse_rubric('<rubric>{"criterion_1": {"name": "Dose",}</rubric>')
    with pytest.raises(RubricError, match=r"^<evaluation> is not valid JSON: .+ at char \d+$"):
        parse_evaluation('{"criterion_1": {"name": "Dose", "rating": 2')


def test_missing_block_is_a_rubric_error():
    with pytest.raises(RubricError, match=r"no single <rubric>\.\.\.</rubric> block"):
        parse_rubric("I would grade on accuracy and safety.")
    with pytest.raises(RubricError, match="no single <evaluation>"):
        parse_evaluation("<evaluation>{}</evaluation><evaluation>{}</evaluation>")


def test_invalid_rubric_content_is_a_rubric_error():
    bad = {"criterion_1": {"name": "Dose", "gold": "4 g", "description": "d", "weight": 0}}
    with pytest.raises(RubricError, match="'Dose': weight"):
        parse_rubric(f"<rubric>{json.dumps(bad)}</rubric>")
    with pytest.raises(RubricError, match="no criteria"):
        parse_rubric("<rubric>{}</rubric>")


def test_evaluation_with_non_numeric_rating_is_a_rubric_error():
    with pytest.raises(RubricError, match="not a finite number"):
        parse_evaluation(json.dumps({"criterion_1": {"name": "Dose", "rating": "excellent"}}))


# ---------------------------------------------------------------- rubric writer inputs


def test_subsample_32_answers_every_third_shortest_first():
    answers = ["x" * (32 - i) for i in range(32)]  # longest first; lengths 32..1
    got = subsample_answers(answers, writing=False)
    assert [len(a) for a in got] == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31]


def test_subsample_writing_every_eighth_capped_at_2048_words():
    answers = [" ".join(["w"] * (3000 - 10 * i)) for i in range(32)]  # word counts 3000, 2990, ..., 2690
    got = subsample_answers(answers, writing=True)
    assert len(got) == 4
    # sorted ascending: 2690 (i=31), 2770 (i=23), 2850 (i=15), 2930 (i=7) words; each cut to 2048
    assert [len(a.split(" ")) for a in got] == [2048] * 4
    short = subsample_answers(["a b c", "a b", "a b c d e"], writing=True)
    assert short == ["a b", "a b c", "a b c d e"]  # n//4 = 0 -> every answer, uncut


def test_subsample_writing_picks_every_eighth():
    answers = [f"{i:02d}" + "x" * i for i in range(32)]
    got = subsample_answers(list(reversed(answers)), writing=True)
    assert [a[:2] for a in got] == ["00", "08", "16", "24"]


@pytest.mark.parametrize(("n", "count"), [(1, 1), (4, 4), (9, 9), (10, 10), (20, 10), (25, 13), (31, 11)])
def test_subsample_general_counts(n, count):
    # step = max(n // 10, 1): n<20 -> every answer; 20, 25 -> every 2nd; 31 -> every 3rd
    got = subsample_answers(["y" * i for i in range(n, 0, -1)], writing=False)
    assert len(got) == count
    assert got[0] == "y" and all(len(a) < len(b) for a, b in zip(got, got[1:]))


def test_rubric_messages_show_everything_the_writer_needs():
    msgs = rubric_messages("DOC-TEXT", "PROBLEM-TEXT", "REFERENCE-TEXT", ["ans one", "ans two"])
    user = msgs[-1]["content"]
    for part in ("DOC-TEXT", "PROBLEM-TEXT", "REFERENCE-TEXT", "ans one", "ans two"):
        assert part in user
    assert "<candidate_answer_2>\nans two\n</candidate_answer_2>" in user


def test_judge_never_sees_document_or_reference():
    task = get_task("health_care")
    doc = "SECRET-DOCUMENT about paracetamol"
    proposal = parse_proposal("<problem>PROBLEM-42 how much?</problem><answer>REFERENCE-99 at most 4 g</answer>")
    assert proposal is not None
    problem, reference = proposal
    assert doc in task.proposer_messages(doc)[-1]["content"]
    solver_text = json.dumps(task.solver_messages(problem))
    assert "REFERENCE-99" not in solver_text and "SECRET-DOCUMENT" not in solver_text
    msgs = judge_messages(problem, RUBRIC, "ANSWER-7 four grams")
    text = "\n".join(m["content"] for m in msgs)
    assert "SECRET-DOCUMENT" not in text and "paracetamol" not in text
    assert "REFERENCE-99" not in text
    for part in ("PROBLEM-42", "ANSWER-7", '"name": "Dose"', '"gold": "4 g"'):
        assert part in text


def test_judge_rubric_text_parses_back_to_the_rubric():
    user = judge_messages("p", RUBRIC, "a")[-1]["content"]
    assert parse_rubric(user[user.index("<rubric>") : user.index("</rubric>") + len("</rubric>")]) == RUBRIC


def test_get_task_known_and_unknown():
    assert set(TASKS) == {"health_care", "creative_writing", "instruction_following"}
    assert get_task("creative_writing").writing is True
    assert get_task("health_care").writing is False
    with pytest.raises(ValueError, match="unknown task 'chess'.*creative_writing.*health_care.*instruction_following"):
        get_task("chess")


def test_a_task_owns_its_mini_corpus_domains():
    """Without ``corpus.domains``, a task trains on its own documents of the bundled corpus; an
    explicit list, or another source, is taken as given."""
    from pop_nemo.build import corpus_domains
    from pop_nemo.config import load_config
    from pop_nemo.corpus import Corpus

    want = {"health_care": ["health"], "creative_writing": ["books"], "instruction_following": ["web"]}
    for name, domains in want.items():
        assert corpus_domains(load_config(None, [f"task={name}"])) == domains
        assert len(Corpus(domains=domains)) > 0
    assert corpus_domains(load_config(None, ["task=health_care", "corpus.domains=[web]"])) == ["web"]
    assert corpus_domains(load_config(None, ["corpus.source=x.jsonl"])) is None


# ---------------------------------------------------------------- xgrammar guides

LIM = GuideLimits.from_section(
    GuideConfig(problem_chars=40, reference_chars=30, name_chars=16, gold_chars=20, description_chars=30)
)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    from pop_nemo.engines.grammar import GrammarCache

    return GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def accepts(grammars, guide, text: str, tokenizer=None) -> bool:
    """Whether ``text`` followed by eos is a complete output of ``guide``."""
    m = grammars.matcher(guide)
    if tokenizer is None:
        if not m.accept_string(text):
            return False
    else:
        for tok in tokenizer.encode(text, add_special_tokens=False):
            if not m.accept_token(tok):
                return False
    return m.accept_token(grammars.info.stop_token_ids[0]) and m.is_terminated()


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def test_proposer_guide(grammars, tokenizer):
    guide = proposer_guide(LIM)
    good = "<problem>What is the safe daily dose?</problem>\n<answer>At most 4 g.</answer>"
    assert accepts(grammars, guide, good)
    assert accepts(grammars, guide, good, tokenizer)
    assert parse_proposal(good) == ("What is the safe daily dose?", "At most 4 g.")
    assert not accepts(grammars, guide, "<problem> leading space</problem>\n<answer>x</answer>")
    assert not accepts(grammars, guide, "<problem>" + "q" * 41 + "</problem>\n<answer>x</answer>")
    assert accepts(grammars, guide, "<problem>" + "q" * 40 + "</problem>\n<answer>x</answer>")
    assert not accepts(grammars, guide, "<problem>no answer</problem>")
    assert not accepts(grammars, guide, "<problem>a <b></problem>\n<answer>x</answer>")


def test_rubric_guide(grammars, tokenizer):
    guide = rubric_guide(LIM)
    ok = {
        "criterion_1": {"name": "Dose", "gold": "4 g", "description": "states the dose", "weight": 3},
        "criterion_2": {"name": "Liver risk", "gold": "Not applicable", "description": "warns", "weight": 10},
    }
    assert accepts(grammars, guide, compact(ok))
    assert accepts(grammars, guide, compact(ok), tokenizer)
    assert [c.name for c in parse_rubric(compact(ok))] == ["Dose", "Liver risk"]
    assert not accepts(grammars, guide, json.dumps(ok))  # spaces after separators are not the canonical form

    def bad(**change):
        c = {**ok["criterion_1"], **change}
        return compact({"criterion_1": {k: v for k, v in c.items() if v is not None}})

    assert accepts(grammars, guide, bad())
    assert not accepts(grammars, guide, bad(weight=0))
    assert not accepts(grammars, guide, bad(weight=11))
    assert not accepts(grammars, guide, bad(weight=1.5))
    assert not accepts(grammars, guide, bad(name="1 starts with digit"))
    assert not accepts(grammars, guide, bad(name="N" * 17))
    assert not accepts(grammars, guide, bad(gold=None))
    assert not accepts(grammars, guide, bad(gold=""))
    assert not accepts(grammars, guide, bad(extra="x"))
    assert not accepts(grammars, guide, compact({"criterion_2": ok["criterion_2"]}))  # criterion_1 is required
    assert not accepts(grammars, guide, compact({**ok, "criterion_6": ok["criterion_1"]}))


def test_judge_guide(grammars, tokenizer):
    guide = judge_guide(RUBRIC, LIM)
    ok = {
        "criterion_1": {"name": "Dose", "thoughts": "correct", "rating": 2},
        "criterion_2": {"name": "Liver", "thoughts": "", "rating": 0},
    }
    assert accepts(grammars, guide, compact(ok))
    assert accepts(grammars, guide, compact(ok), tokenizer)
    assert parse_evaluation(compact(ok)) == [Rating("Dose", 2.0, "correct"), Rating("Liver", 0.0, "")]
    wrong_rating = {**ok, "criterion_2": {**ok["criterion_2"], "rating": 3}}
    wrong_name = {**ok, "criterion_2": {**ok["criterion_2"], "name": "Kidney"}}
    long_thoughts = {**ok, "criterion_2": {**ok["criterion_2"], "thoughts": "t" * 161}}
    assert not accepts(grammars, guide, compact(wrong_rating))
    assert not accepts(grammars, guide, compact(wrong_name))
    assert not accepts(grammars, guide, compact(long_thoughts))
    assert not accepts(grammars, guide, compact({"criterion_1": ok["criterion_1"]}))  # every criterion is rated


def test_grammar_cache_compiles_once(grammars):
    guide = proposer_guide(LIM)
    assert grammars.compile(guide) is grammars.compile(proposer_guide(LIM))
    from pop_nemo.engines.base import Guide

    with pytest.raises(ValueError, match="unknown guide kind 'yaml'"):
        grammars.compile(Guide("yaml", "x"))  # type: ignore[arg-type]
