"""The paper's filter and pairing (DESIGN §2), pinned on hand-built records."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pop_nemo.config import OfflineConfig, load_config
from pop_nemo.rl.pairs import (
    PairFilter,
    PairsInputError,
    make_pairs,
    read_records,
    solver_prompt,
    write_pairs,
)
from pop_nemo.selfplay.roles import get_task

SYSTEM = "You are a helpful assistant. Answer inside <answer>...</answer>."


def answer(score: float | None, output: str | None = None, judge_valid: bool = True) -> dict:
    return {
        "output": output if output is not None else f"reasoning <answer>{score}</answer>",
        "answer": str(score),
        "format_valid": True,
        "judge_valid": judge_valid if score is not None else False,
        "score": score if judge_valid else None,
    }


def record(scores_or_answers: list, gid: int = 0, proposer_valid: bool = True, rubric_valid: bool = True) -> dict:
    answers = [a if isinstance(a, dict) else answer(a) for a in scores_or_answers]
    return {
        "group_id": gid,
        "doc_id": f"doc-{gid}",
        "proposer_valid": proposer_valid,
        "rubric_valid": rubric_valid,
        "problem": f"problem {gid}" if proposer_valid else None,
        "reference": f"reference {gid}",
        "solver_system": SYSTEM,
        "answers": answers,
    }


def pair_filter(**settings) -> PairFilter:
    """The filter an ``offline`` section with these settings makes (the config's defaults otherwise)."""
    return PairFilter.from_config(OfflineConfig(**settings))


def one(rec: dict, flt: PairFilter | None = None):
    pairs, stats = make_pairs([rec], flt or pair_filter())
    return (pairs[0] if pairs else None), stats


def test_defaults_are_the_papers():
    cfg = load_config(None)
    flt = PairFilter.from_config(cfg.offline)
    assert (flt.best_of_n, flt.std_threshold, flt.max_length_diff_words, flt.shuffle_seed) == (32, 0.001, 100, 42)
    assert flt.length_words == pair_filter().length_words == "space"


def test_first_argmax_and_first_argmin_on_ties():
    outs = [f"answer number {i}" for i in range(6)]
    rec = record([answer(s, o) for s, o in zip([1.0, 2.0, 0.5, 2.0, 0.5, 1.5], outs)])
    pair, stats = one(rec)
    assert pair["chosen"] == [{"role": "assistant", "content": outs[1]}]
    assert pair["rejected"] == [{"role": "assistant", "content": outs[2]}]
    assert (pair["chosen_score"], pair["rejected_score"]) == (2.0, 0.5)
    assert stats.pairs == 1 and not stats.dropped


def test_conversation_format_is_trls_explicit_prompt():
    pair, _ = one(record([0.0, 2.0], gid=7))
    assert pair["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "problem 7"}]
    assert [m["role"] for m in pair["chosen"]] == ["assistant"] and [m["role"] for m in pair["rejected"]] == [
        "assistant"
    ]
    assert (pair["ref_answer"], pair["group_id"], pair["doc_id"]) == ("reference 7", 7, "doc-7")


def test_solver_prompt_falls_back_to_the_task():
    rec = record([0.0, 2.0])
    del rec["solver_system"]
    with pytest.raises(PairsInputError, match="--task"):
        solver_prompt(rec)
    assert solver_prompt(rec, "health_care")[0]["content"] == get_task("health_care").solver_system
    rec["task"] = "creative_writing"
    assert solver_prompt(rec, "health_care")[0]["content"] == get_task("creative_writing").solver_system


@pytest.mark.parametrize(
    ("scores", "kept"),
    [
        ([1.0, 1.0019], False),  # population std 0.00095: just under
        ([1.0, 1.0021], True),  # 0.00105: just over
        ([0.0, 0.0, 0.0, 0.0023], False),  # 0.0023·√3/4 = 0.000996
        ([0.0, 0.0, 0.0, 0.00232], True),  # 0.001005
        ([1.5] * 5, False),  # all tied
    ],
)
def test_std_threshold(scores, kept):
    assert (np.std(scores) >= 0.001) == kept  # the case is on the side its comment says
    pair, stats = one(record(scores))
    assert (pair is not None) == kept
    assert stats.dropped.get("scores_tied", 0) == (0 if kept else 1)


def test_std_is_population_std():
    # Sample std (ddof=1) of [1.0, 1.0016] is 0.00113 (would keep); population std is 0.0008 (drops).
    pair, stats = one(record([1.0, 1.0016]))
    assert pair is None and stats.dropped["scores_tied"] == 1


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.mark.parametrize(("diff", "kept"), [(99, True), (100, True), (101, False)])
def test_length_difference(diff, kept):
    rec = record([answer(2.0, _words(20 + diff)), answer(0.0, _words(20))])
    pair, stats = one(rec)
    assert (pair is not None) == kept
    assert stats.dropped.get("length_diff", 0) == (0 if kept else 1)


def test_length_counts_the_full_output_in_either_direction():
    # The rejected answer is the long one; the extracted answers are short, the outputs are not.
    rec = record([answer(2.0, _words(10)), answer(1.0, _words(50)), answer(0.0, _words(111))])
    pair, stats = one(rec)
    assert pair is None and stats.dropped["length_diff"] == 1


def test_length_words_whitespace_vs_the_papers_space_split():
    long = "\n".join(_words(150).split(" "))  # 150 words on separate lines: 1 word for split(" ")
    rec = record([answer(2.0, long), answer(0.0, "short")])
    assert one(rec)[0] is not None  # the default is the paper's split(" "): 1 vs 1
    assert one(rec, pair_filter(length_words="whitespace"))[0] is None  # split(): 150 vs 1


def test_invalid_proposer_and_rubric_are_dropped_with_their_reason():
    pairs, stats = make_pairs(
        [record([0.0, 2.0], 0, proposer_valid=False, rubric_valid=False), record([0.0, 2.0], 1, rubric_valid=False)],
        pair_filter(),
    )
    assert pairs == []
    assert stats.dropped["proposer_invalid"] == 1 and stats.dropped["rubric_invalid"] == 1


def test_fewer_than_two_scored_answers():
    failed = [answer(None), answer(1.0, judge_valid=False)]
    pairs, stats = make_pairs([record(failed, 0), record([answer(1.5)] + failed, 1)], pair_filter())
    assert pairs == []
    assert stats.dropped["no_scored_answer"] == 1  # none scored
    assert stats.dropped["scores_tied"] == 1  # one scored: std 0


def test_only_the_first_best_of_n_scored_answers_count():
    outs = [f"out {i}" for i in range(6)]
    # Unscored answers do not use up best_of_n; the 2.0 after the first three scored ones is ignored.
    answers = [answer(None, "unscored"), answer(1.0, outs[0]), answer(0.5, outs[1]), answer(1.5, outs[2])]
    answers += [answer(2.0, outs[3]), answer(0.0, outs[4])]
    pair, _ = one(record(answers), pair_filter(best_of_n=3))
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == (outs[2], outs[1])
    # And when the first best_of_n are tied, the record is dropped even if later ones differ.
    pair, stats = one(record([1.0, 1.0, 0.0, 2.0]), pair_filter(best_of_n=2))
    assert pair is None and stats.dropped["scores_tied"] == 1


def test_zero_threshold_never_pairs_an_answer_with_itself():
    pair, stats = one(record([1.0, 1.0]), pair_filter(std_threshold=0.0))
    assert pair is None and stats.dropped["scores_tied"] == 1


def test_shuffle_is_random_seed_42_and_max_pairs_cuts_after_it():
    recs = [record([0.0, float(1 + i % 3) / 2], gid=i) for i in range(30)]
    pairs, _ = make_pairs(recs, pair_filter())
    in_order = [r["group_id"] for r in recs]
    random.seed(42)  # the paper: random.seed(42); random.shuffle(pairs)
    random.shuffle(in_order)
    assert [p["group_id"] for p in pairs] == in_order
    capped, stats = make_pairs(recs, pair_filter(max_pairs=5))
    assert [p["group_id"] for p in capped] == in_order[:5]
    assert (stats.pairs, stats.pairs_before_cap) == (5, 30)


def test_statistics():
    recs = [
        record([0.0, 2.0], 0),  # kept: 2.0 / 0.0
        record([1.0, 1.5, 0.5], 1),  # kept: 1.5 / 0.5
        record([1.0, 1.0], 2),  # tied
        record([], 3, rubric_valid=False),
    ]
    _, stats = make_pairs(recs, pair_filter())
    d = stats.to_dict()
    assert d["records"] == 4 and d["pairs"] == 2
    assert d["dropped"] == {
        "proposer_invalid": 0,
        "rubric_invalid": 1,
        "no_scored_answer": 0,
        "scores_tied": 1,
        "length_diff": 0,
    }
    scores = [0.0, 2.0, 1.0, 1.5, 0.5, 1.0, 1.0]
    assert d["scored_answers"] == 7
    assert d["score_mean"] == pytest.approx(np.mean(scores)) and d["score_std"] == pytest.approx(np.std(scores))
    assert d["chosen_score_mean"] == pytest.approx(1.75) and d["rejected_score_mean"] == pytest.approx(0.25)


def _paper_filter_and_pair(samples: list[dict], best_of_n: int = 32, max_num_examples: int = 100000) -> list[dict]:
    """The paper's synthesis/filter_and_pair.py, transcribed (its field names mapped to ours)."""
    pairs = []
    for s in samples:
        if not s["proposer_valid"] or not s["rubric_valid"]:
            continue
        valid_srs = [sr for sr in s["answers"] if sr["judge_valid"]]
        if len(valid_srs) == 0:
            continue
        valid_srs = valid_srs[:best_of_n]
        scores = [sr["score"] for sr in valid_srs]
        if np.std(scores) < 0.001:
            continue
        max_idx, min_idx = np.argmax(scores), np.argmin(scores)

        def len_w(x):
            return len(x["output"].split(" "))

        if abs(len_w(valid_srs[max_idx]) - len_w(valid_srs[min_idx])) > 100:
            continue
        pairs.append(
            {"chosen": valid_srs[max_idx]["output"], "rejected": valid_srs[min_idx]["output"], "gid": s["group_id"]}
        )
    random.seed(42)
    random.shuffle(pairs)
    return pairs[:max_num_examples]


def test_parity_with_the_papers_code_on_random_records():
    rng = random.Random(0)
    recs = []
    for gid in range(400):
        answers = []
        for _ in range(rng.randint(0, 40)):
            score = rng.choice([None, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, rng.random() * 2, 1.0 + rng.random() * 0.003])
            answers.append(answer(score, " ".join(["w"] * rng.randint(1, 260)) + f" #{rng.random()}"))
        recs.append(record(answers, gid, proposer_valid=rng.random() > 0.05, rubric_valid=rng.random() > 0.1))
    expected = _paper_filter_and_pair(recs)
    got, stats = make_pairs(recs, pair_filter(length_words="space"))
    assert len(expected) > 50  # the random records exercise every branch
    assert [(p["group_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in got] == [
        (p["gid"], p["chosen"], p["rejected"]) for p in expected
    ]
    assert all(
        stats.dropped[r] > 0
        for r in ("proposer_invalid", "rubric_invalid", "no_scored_answer", "scores_tied", "length_diff")
    )


def test_read_and_write(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record([0.0, 2.0])) + "\n\n" + json.dumps(record([1.0, 1.0], 1)) + "\n")
    recs = read_records(path)
    pairs, stats = make_pairs(recs, pair_filter())
    out = tmp_path / "sub" / "pairs.jsonl"
    stats_path = write_pairs(out, pairs, stats)
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs
    assert json.loads(stats_path.read_text())["dropped"]["scores_tied"] == 1
    with pytest.raises(PairsInputError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    path.write_text('{"group_id": 1}\n')
    with pytest.raises(PairsInputError, match="not a self-play record"):
        read_records(path)
    path.write_text("\n{oops\n")
    with pytest.raises(PairsInputError, match=r"records.jsonl:2: not valid JSON"):
        read_records(path)
