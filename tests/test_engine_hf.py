"""The HF engine on the real SmolLM2-135M: seeds, batching, guides, stopping, logprobs.

Generations are short and shared between tests (module fixtures): the CI machine has 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from pop_nemo.config import GuideConfig
from pop_nemo.engines.base import Guide, Request, Sampling
from pop_nemo.engines.hf import sample_token
from pop_nemo.policies.base import token_logprobs
from pop_nemo.selfplay.roles import GuideLimits, judge_guide, parse_evaluation
from pop_nemo.selfplay.rubric import Criterion

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Name a fruit.",
    "Write one sentence about the sea, the wind and the small boats in the harbour at dawn.",
    "What is the capital of France?",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def greedy_batched(engine):
    reqs = [Request(user(p), Sampling(temperature=0.0, max_new_tokens=6)) for p in PROMPTS]
    return engine.generate(reqs)


@pytest.fixture(scope="module")
def seeded(engine):
    """Two requests in one batch (seeds 123 with n=2, and 124), and seed 123 again on its own."""
    msgs = user("Invent a name for a cat.")
    batch = engine.generate(
        [
            Request(msgs, Sampling(temperature=1.0, max_new_tokens=6, n=2, seed=123)),
            Request(msgs, Sampling(temperature=1.0, max_new_tokens=6, n=1, seed=124)),
        ]
    )
    again = engine.generate([Request(msgs, Sampling(temperature=1.0, max_new_tokens=6, n=2, seed=123))])
    return batch, again


def test_n_samples_per_request(seeded):
    batch, again = seeded
    assert [len(cs) for cs in batch] == [2, 1]
    assert len(again) == 1 and len(again[0]) == 2


def test_same_seed_same_samples(seeded):
    batch, again = seeded
    # seed 123 sampled alone gives what it sampled next to another request
    assert [c.token_ids for c in again[0]] == [c.token_ids for c in batch[0]]
    assert [c.text for c in again[0]] == [c.text for c in batch[0]]


def test_different_seeds_differ(seeded):
    batch, _ = seeded
    samples = [batch[0][0].token_ids, batch[0][1].token_ids, batch[1][0].token_ids]
    # two seeds, and two samples of one request: three different streams
    assert len({tuple(s) for s in samples}) == 3


def test_max_new_tokens_respected(seeded, engine):
    batch, _ = seeded
    for c in [*batch[0], *batch[1]]:
        assert 1 <= len(c.token_ids) <= 6
        assert len(c.logprobs) == len(c.token_ids)
        if c.finish_reason == "length":
            assert len(c.token_ids) == 6 and c.token_ids[-1] not in engine.eos_ids
        else:
            assert c.token_ids[-1] in engine.eos_ids


def test_greedy_batched_equals_one_by_one(engine, greedy_batched):
    lengths = {len(cs[0].prompt_ids) for cs in greedy_batched}
    assert len(lengths) == 3  # different prompt lengths: the batch is left-padded
    for prompt, batched in zip(PROMPTS, greedy_batched):
        alone = engine.generate([Request(user(prompt), Sampling(temperature=0.0, max_new_tokens=6))])[0][0]
        assert alone.token_ids == batched[0].token_ids, prompt
        assert alone.prompt_ids == batched[0].prompt_ids
        assert alone.logprobs == pytest.approx(batched[0].logprobs, abs=1e-4)


def test_prompt_ids_are_the_chat_template(engine, tokenizer, greedy_batched):
    want = tokenizer.apply_chat_template(user(PROMPTS[0]), add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(greedy_batched[0][0].prompt_ids) == want


def test_logprobs_equal_recomputed_policy_logprobs(hf_model, greedy_batched, seeded):
    """Untempered log p(token), as the policy computes it on a plain forward pass."""
    batch, _ = seeded
    for c in [greedy_batched[0][0], greedy_batched[1][0], batch[0][0], batch[1][0]]:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            lp = token_logprobs(hf_model(input_ids=ids).logits, ids)[0, len(c.prompt_ids) :]
        assert lp.tolist() == pytest.approx(c.logprobs, abs=1e-4)
    # greedy picks the argmax, so its logprobs are each step's maximum: never below log(1/vocab)
    assert all(lp > -torch.log(torch.tensor(49152.0)).item() for lp in greedy_batched[0][0].logprobs)


def test_stop_at_eos(engine, tokenizer):
    got = engine.generate(
        [
            Request(user("What is 2+2? Answer with a number only."), Sampling(temperature=0.0, max_new_tokens=16)),
            Request(user("Do you agree?"), Sampling(temperature=0.0, max_new_tokens=8, guide=Guide("regex", "yes"))),
        ]
    )
    free, forced = got[0][0], got[1][0]
    for c in (free, forced):
        assert c.finish_reason == "stop"
        assert c.token_ids[-1] == tokenizer.eos_token_id == engine.eos_ids[0]
        assert tokenizer.eos_token not in c.text
        assert c.text == tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
    assert len(free.token_ids) < 16 and "4" in free.text
    assert forced.text == "yes"


def test_guided_judge_output_always_parses(engine):
    criteria = [Criterion("Accuracy", "4", "the answer is 4", 2.0)]
    guide = judge_guide(criteria, GuideLimits.from_section(GuideConfig(thoughts_chars=8)))
    msgs = user("Grade the answer '5' to 'What is 2+2?' as JSON.")
    # every token is at least one character: the longest output (8 thoughts characters, each
    # at most a 6-character JSON escape) plus eos bounds the tokens a guided output needs
    longest = '{"criterion_1":{"name":"Accuracy","thoughts":"' + "\\u0000" * 8 + '","rating":0}}'
    bound = len(longest) + 1
    got = engine.generate(
        [
            Request(msgs, Sampling(temperature=0.0, max_new_tokens=bound, guide=guide)),
            Request(msgs, Sampling(temperature=1.0, max_new_tokens=bound, n=2, seed=7, guide=guide)),
        ]
    )
    outs = [*got[0], *got[1]]
    assert len(outs) == 3
    for c in outs:
        assert c.finish_reason == "stop", c.text
        ratings = parse_evaluation(c.text)
        assert [r.name for r in ratings] == ["Accuracy"]
        assert ratings[0].rating in (0.0, 1.0, 2.0)
        assert len(ratings[0].thoughts) <= 8


def test_sample_token_greedy_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])  # softmax: 0.644, 0.237, 0.087, 0.032
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, Sampling(temperature=0.0), g) == 0
    assert {sample_token(logits, Sampling(temperature=1.0, top_p=0.5), g) for _ in range(50)} == {0}
    # 0.644 < 0.7, so the nucleus is the first two tokens
    assert {sample_token(logits, Sampling(temperature=1.0, top_p=0.7), g) for _ in range(200)} == {0, 1}
    assert {sample_token(logits, Sampling(temperature=1.0), g) for _ in range(400)} == {0, 1, 2, 3}


def test_preallocated_kv_cache_only_for_models_without_sliding_windows():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from pop_nemo.engines.hf import _full_attention_only

    assert _full_attention_only(LlamaConfig())
    assert _full_attention_only(Qwen2Config())  # sliding_window is set but use_sliding_window is off
    assert not _full_attention_only(Qwen2Config(use_sliding_window=True, max_window_layers=0))
    assert not _full_attention_only(MistralConfig(sliding_window=4096))
