"""The HF policy on a tiny random Llama: gradient accumulation, LR schedule, checkpoints, reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pop_nemo.policies.base import TokenBatch, token_logprobs, warmup_cosine
from pop_nemo.policies.hf import HFPolicy
from pop_nemo.rl.losses import LossConfig, normalizer, policy_loss

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # as SmolLM2: the checkpoint stores the embedding once
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_policy(model=None, micro_batch_size: int = 4, **kw) -> HFPolicy:
    model = tiny_model() if model is None else model
    args = {"lr": 1e-3, "total_steps": 5, "warmup_steps": 0, "min_lr_ratio": 0.1, "max_grad_norm": 1.0}
    args.update(kw)
    return HFPolicy(model, copy.deepcopy(model), None, micro_batch_size=micro_batch_size, **args)


def make_batch() -> TokenBatch:
    """Four sequences of different prompt and completion lengths, with old/ref logprobs and advantages."""
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompts = [toks(3), toks(5), toks(2), toks(4)]
    completions = [toks(4), toks(2), toks(6), toks(3)]
    batch = TokenBatch.from_sequences(prompts, completions, pad_id=0)
    return batch


def with_extras(policy: HFPolicy, batch: TokenBatch) -> TokenBatch:
    old = policy.logprobs(batch)
    g = torch.Generator().manual_seed(2)
    # old policy a little off the current one (ratios != 1, some clipped), reference further off
    batch.extras = {
        "old_logprobs": old + 0.3 * (torch.rand(old.shape, generator=g) - 0.5),
        "ref_logprobs": old + 0.5 * (torch.rand(old.shape, generator=g) - 0.5),
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2]),
    }
    return batch


def loss_fn_for(batch: TokenBatch, cfg: LossConfig, global_norm: bool = True):
    norm = normalizer(batch.loss_mask, cfg.aggregation) if global_norm else None

    def loss_fn(lp, mb):
        return policy_loss(
            lp, mb.extras["old_logprobs"], mb.extras["advantages"], mb.loss_mask, cfg, mb.extras["ref_logprobs"], norm
        )

    return loss_fn


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def grads(model) -> dict[str, torch.Tensor]:
    return {k: v.grad.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- TokenBatch


def test_from_sequences_masks_exactly_the_completion_tokens():
    b = TokenBatch.from_sequences([[11, 12, 13], [14]], [[15, 16], [17, 18, 19]], pad_id=0)
    assert b.input_ids.tolist() == [[11, 12, 13, 15, 16], [14, 17, 18, 19, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert b.loss_mask.dtype == torch.float32 and b.input_ids.dtype == torch.long


def test_micro_batches_split_rows_and_extras():
    b = make_batch()
    b.extras = {"advantages": torch.arange(4.0)}
    parts = b.micro_batches(3)
    assert [len(p) for p in parts] == [3, 1]
    assert parts[1].extras["advantages"].tolist() == [3.0]
    assert torch.equal(parts[1].input_ids[0], b.input_ids[3])
    assert parts[0].input_ids.shape[1] == b.input_ids.shape[1]  # width kept: same padding everywhere


def test_logprobs_align_with_tokens():
    """logprobs[:, t] = log p(x_t | x_<t): recompute one position by hand."""
    policy = make_policy()
    b = make_batch()
    lp = policy.logprobs(b)
    assert lp.shape == b.input_ids.shape and lp[:, 0].tolist() == [0.0] * 4
    with torch.no_grad():
        row = b.input_ids[1:2, :4]  # first four tokens of row 1
        logits = policy.model(input_ids=row).logits[0, 2]
    assert lp[1, 3].item() == pytest.approx(torch.log_softmax(logits, -1)[row[0, 3]].item(), abs=1e-5)
    # right padding does not change a sequence's logprobs: row 0 alone equals row 0 in the batch
    alone = policy.logprobs(b.select(slice(0, 1)))
    assert torch.allclose(alone[0] * b.loss_mask[0], lp[0] * b.loss_mask[0], atol=1e-5)


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batch_1_equals_micro_batch_4(aggregation):
    cfg = LossConfig(clip_eps=0.2, kl_coef=0.1, kl_mode="k3_loss", aggregation=aggregation)
    # no clipping: compare raw gradients (clipping would hide a uniform scale error)
    whole = make_policy(micro_batch_size=4, max_grad_norm=1e9)
    split = make_policy(micro_batch_size=1, max_grad_norm=1e9)
    local = make_policy(micro_batch_size=1, max_grad_norm=1e9)
    batch = with_extras(whole, make_batch())

    m_whole = whole.train_step(batch, loss_fn_for(batch, cfg))
    m_split = split.train_step(batch, loss_fn_for(batch, cfg))
    local.train_step(batch, loss_fn_for(batch, cfg, global_norm=False))

    assert m_split["loss"] == pytest.approx(m_whole["loss"], abs=1e-6)
    assert m_split["kl"] == pytest.approx(m_whole["kl"], abs=1e-6)
    assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], abs=1e-5)
    g_whole, g_split, g_local = grads(whole.model), grads(split.model), grads(local.model)
    for k in g_whole:
        torch.testing.assert_close(g_split[k], g_whole[k], rtol=0, atol=1e-5, msg=k)
    p_whole, p_split = params(whole.model), params(split.model)
    for k in p_whole:
        torch.testing.assert_close(p_split[k], p_whole[k], rtol=0, atol=1e-5, msg=k)
    # dividing each micro-batch by its own count instead gives another gradient
    worst = max((g_local[k] - g_whole[k]).abs().max().item() for k in g_whole)
    assert worst > 1e-3


def test_clip_frac_with_two_micro_batches_is_a_share_not_a_sum():
    """Every completion token clipped: clip_frac is 1 whether the step runs as one micro-batch or
    two (it was summed over micro-batches, so the smoke config could report up to 2.0)."""
    cfg = LossConfig(clip_eps=0.2, kl_mode="none")
    reports = []
    for mbs in (4, 2):
        policy = make_policy(micro_batch_size=mbs)
        batch = make_batch()
        old = policy.logprobs(batch)
        batch.extras = {"old_logprobs": old - 1.0, "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2])}
        norm = normalizer(batch.loss_mask, cfg.aggregation)
        reports.append(
            policy.train_step(
                batch,
                lambda lp, mb, norm=norm: policy_loss(
                    lp, mb.extras["old_logprobs"], mb.extras["advantages"], mb.loss_mask, cfg, None, norm
                ),
            )
        )
    assert [r["clip_frac"] for r in reports] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_train_step_changes_weights_and_reports_lr():
    policy = make_policy(lr=1e-3, total_steps=4, warmup_steps=2, min_lr_ratio=0.1)
    batch = with_extras(policy, make_batch())
    loss_fn = loss_fn_for(batch, LossConfig())
    before = params(policy.model)
    lrs = [policy.train_step(batch, loss_fn)["lr"] for _ in range(4)]
    # warmup 1/2, 2/2; then cosine over 2 steps from 1 to 0.1: progress 0 -> 1.0, 1/2 -> 0.55
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.55e-3])
    assert any(not torch.equal(before[k], v) for k, v in params(policy.model).items())


def test_pad_token_inside_a_prompt_gets_its_gradient():
    """pad = eos is a real token in ChatML prompts (SmolLM2's ``<|im_end|>``): its embedding is
    trained like any other (transformers' ``padding_idx`` would freeze it), and the step's gradient
    is the true gradient of the loss, as Megatron's is."""
    policy = make_policy(max_grad_norm=1e9)  # no clipping: the gradients stay as computed
    assert policy.model.get_input_embeddings().padding_idx is None
    batch = make_batch()
    batch.input_ids[:, 1] = 0  # the pad id, inside every prompt (the rows are right-padded with it too)
    batch = with_extras(policy, batch)
    loss_fn = loss_fn_for(batch, LossConfig())

    want = tiny_model()  # the policy's initial weights; a plain backward of the same loss
    want.get_input_embeddings().padding_idx = None
    lp = token_logprobs(want(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.input_ids)
    loss_fn(lp, batch)[0].backward()

    policy.train_step(batch, loss_fn)
    got = grads(policy.model)["model.embed_tokens.weight"]
    assert got[0].abs().sum() > 0
    torch.testing.assert_close(got, want.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("step", "want"),
    [
        (0, 0.25),
        (1, 0.5),
        (3, 1.0),
        (4, 1.0),  # end of warmup: the cosine starts at 1
        (6, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # 0.868198
        (8, 0.55),  # half way: (1 + 0.1) / 2
        (12, 0.1),
        (30, 0.1),  # past the end: stays at the floor
    ],
)
def test_warmup_cosine_values(step, want):
    assert warmup_cosine(step, warmup=4, total=12, min_ratio=0.1) == pytest.approx(want, abs=1e-12)


def test_warmup_cosine_without_warmup():
    assert [warmup_cosine(s, 0, 10, 0.0) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert warmup_cosine(0, 0, 0, 0.2) == 1.0  # total 0: no division by zero
    assert warmup_cosine(1, 0, 0, 0.2) == pytest.approx(0.2)


# ---------------------------------------------------------------- checkpoint


def test_save_load_restores_weights_optimizer_and_step_count(tmp_path):
    kw = {"lr": 1e-3, "total_steps": 6, "warmup_steps": 3, "min_lr_ratio": 0.1}
    first = make_policy(**kw)
    batch = with_extras(first, make_batch())
    loss_fn = loss_fn_for(batch, LossConfig())
    first.train_step(batch, loss_fn)
    first.train_step(batch, loss_fn)
    first.save(tmp_path / "ckpt")

    # a policy built from other random weights, then loaded
    resumed = make_policy(tiny_model(seed=99), **kw)
    assert any(not torch.equal(v, params(first.model)[k]) for k, v in params(resumed.model).items())
    resumed.load(tmp_path / "ckpt")
    for k, v in params(first.model).items():
        assert torch.equal(params(resumed.model)[k], v), k
    assert resumed.steps_done == first.steps_done == 2
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 2

    m_first = first.train_step(batch, loss_fn)
    m_resumed = resumed.train_step(batch, loss_fn)
    assert m_resumed["lr"] == m_first["lr"] == pytest.approx(1e-3)  # step 2 of warmup 3: 3/3
    assert m_resumed["loss"] == m_first["loss"]
    for k, v in params(first.model).items():
        assert torch.equal(params(resumed.model)[k], v), k


def test_resume_into_a_longer_run_follows_the_longer_schedule(tmp_path):
    """Run 1 has 1 step; the same command rerun with ``trainer.max_steps=2`` resumes it. Its step 2
    must be an uninterrupted 2-step run's step 2 (LR half way down the cosine), not a step at the
    floor where the 1-step run's schedule ended."""
    kw = {"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 0.1}
    short, straight = make_policy(total_steps=1, **kw), make_policy(total_steps=2, **kw)
    batch = with_extras(short, make_batch())
    loss_fn = loss_fn_for(batch, LossConfig())
    short.train_step(batch, loss_fn)
    short.save(tmp_path / "ckpt")
    straight.train_step(batch, loss_fn)
    resumed = make_policy(tiny_model(seed=99), total_steps=2, **kw)
    resumed.load(tmp_path / "ckpt")

    m_straight, m_resumed = straight.train_step(batch, loss_fn), resumed.train_step(batch, loss_fn)
    assert m_straight["lr"] == pytest.approx(0.55e-3)  # (1 + 0.1) / 2 of the peak
    assert m_resumed["lr"] == m_straight["lr"]
    for k, v in params(straight.model).items():
        assert torch.equal(params(resumed.model)[k], v), k


def test_load_rejects_another_model(tmp_path):
    make_policy().save(tmp_path / "ckpt")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    with pytest.raises(RuntimeError, match="does not fit this model"):
        make_policy(other).load(tmp_path / "ckpt")


def test_export_hf_round_trip(tmp_path, tokenizer):
    from pop_nemo.models import load_causal_lm

    policy = HFPolicy(tiny_model(), None, tokenizer, lr=1e-3, total_steps=1)
    policy.export_hf(tmp_path / "hf")
    loaded = load_causal_lm(str(tmp_path / "hf"))
    for k, v in params(policy.model).items():
        assert torch.equal(params(loaded)[k], v), k
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------- reference


def test_reference_is_frozen_and_differs_after_a_step():
    policy = make_policy(lr=1e-2)
    batch = with_extras(policy, make_batch())
    mask = batch.loss_mask.bool()
    assert torch.equal(policy.logprobs(batch, reference=True)[mask], policy.logprobs(batch)[mask])
    ref_before = params(policy.reference)
    policy.train_step(batch, loss_fn_for(batch, LossConfig()))
    after, ref = policy.logprobs(batch)[mask], policy.logprobs(batch, reference=True)[mask]
    assert (after - ref).abs().max().item() > 1e-3
    assert all(torch.equal(v, ref_before[k]) for k, v in params(policy.reference).items())
    assert not any(p.requires_grad for p in policy.reference.parameters())
    # the reference still computes what the initial model computed
    with torch.no_grad():
        initial = token_logprobs(policy.reference(input_ids=batch.input_ids).logits, batch.input_ids)
    torch.testing.assert_close(ref, initial[mask], rtol=0, atol=1e-5)


def test_no_reference_is_an_error():
    policy = HFPolicy(tiny_model(), None, None, lr=1e-3, total_steps=1)
    with pytest.raises(RuntimeError, match="no reference model"):
        policy.logprobs(make_batch(), reference=True)
