"""Prefix sharing: the planner's exact choices, and the engine's outputs with and without it."""

from __future__ import annotations

import pytest

from pop_nemo.engines.base import Request, Sampling
from pop_nemo.engines.prefix import PrefillPlan, common_prefix, families, order_rows, plan_prefill

SYS = list(range(100, 120))  # a 20-token "system prompt" every prompt starts with


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_families_split_where_sharing_beyond_the_common_prefix_ends():
    a1, a2 = SYS + [1] * 20 + [7], SYS + [1] * 20 + [8, 8]  # one problem, two answers
    b1 = SYS + [2] * 20 + [9]
    c1 = SYS + [3]
    assert families([a1, b1, a2, c1], min_shared=16) == [[0, 2], [1], [3]]
    # The floor is relative: a prefix that every prompt of the call has makes no family.
    assert families([a1, a2], min_shared=16) == [[0], [1]]  # all prompts share it, no deeper family
    assert families([a1], min_shared=16) == [[0]]
    assert families([], min_shared=16) == []


def test_order_rows_keeps_families_together_and_sorts_the_rest_by_length():
    long_single = SYS + [4] * 30
    a1, a2 = SYS + [1] * 20 + [7, 7, 7], SYS + [1] * 20 + [8]
    short = SYS + [5]
    prompts = [long_single, a1, short, a2]
    # families: {1, 3} (max len 44), {0} (50), {2} (21) -> by max length; within a family by length
    assert order_rows(prompts, min_shared=16) == [2, 3, 1, 0]


def test_plan_identical_prompts_prefill_once():
    p = SYS + [1, 2, 3]
    plan = plan_prefill([p, p, p, p])
    # one group, everything but the last token shared: 22 tokens once + 4 rows x 1 token
    assert plan == PrefillPlan(prefix_len=[22], group_of=[0, 0, 0, 0], cost=22 + 4)


def test_plan_per_problem_groups_beat_one_system_prompt_group():
    a = [SYS + [1] * 30 + [7], SYS + [1] * 30 + [8, 8]]
    b = [SYS + [2] * 30 + [9], SYS + [2] * 30 + [6]]
    plan = plan_prefill([a[0], b[0], a[1], b[1]])
    # families: rows {0,2} share 50, rows {1,3} share 50 -> 2 x 50 + 4 x 2 (longest suffix) = 108;
    # one group on the 20-token system prompt: 20 + 4 x 32 = 148; plain: 4 x 52 = 208
    assert plan == PrefillPlan(prefix_len=[50, 50], group_of=[0, 1, 0, 1], cost=108)


def test_plan_shares_only_the_system_prompt_when_nothing_else_is_shared():
    prompts = [SYS + [1] * 10, SYS + [2] * 12, SYS + [3] * 11]
    plan = plan_prefill(prompts)
    assert plan == PrefillPlan(prefix_len=[20], group_of=[0, 0, 0], cost=20 + 3 * 12)


def test_no_plan_when_sharing_does_not_pay():
    assert plan_prefill([[1, 2, 3], [4, 5, 6]]) is None  # nothing shared
    assert plan_prefill([SYS]) is None  # one row
    assert plan_prefill([[1], [1]]) is None  # a one-token prompt keeps its token: nothing left to share


@pytest.mark.parametrize("max_batch", [3, 16])
def test_engine_outputs_equal_with_and_without_prefix_sharing(hf_model, tokenizer, max_batch):
    """Identical prompts (n>1), prompts sharing a long prefix (judge-like) and unrelated ones, in one
    call, chunked or not: the same greedy tokens and logprobs within 1e-4 as the plain prefill with
    transformers' own (concatenating) KV cache."""
    from pop_nemo.engines.hf import HFEngine

    problem = "A farmer has 17 sheep and buys 5 more, then sells 3. How many sheep are left? Explain."
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    requests = [
        Request(
            messages=[{"role": "user", "content": problem}], sampling=Sampling(temperature=0.0, max_new_tokens=12, n=3)
        ),
        *[
            Request(
                messages=[{"role": "user", "content": f"{problem}\nCandidate answer: {ans}\nIs it right?"}],
                sampling=greedy,
            )
            for ans in ["19", "19 sheep, because 17 + 5 - 3 = 19.", "I think 25."]
        ],
        Request(messages=[{"role": "user", "content": "Name a colour."}], sampling=greedy),
    ]
    shared = HFEngine(hf_model, tokenizer, max_batch=max_batch, share_prefixes=True)
    plain = HFEngine(hf_model, tokenizer, max_batch=max_batch, share_prefixes=False)
    plain.growing_cache = False
    assert shared.growing_cache  # SmolLM2 has no sliding-window layers
    got, want = shared.generate(requests), plain.generate(requests)
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in want]
    for cs_got, cs_want in zip(got, want):
        for a, b in zip(cs_got, cs_want):
            assert a.prompt_ids == b.prompt_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    assert shared.stats["prefill_tokens"] < plain.stats["prefill_tokens"]
