"""DPO: the loss against its formula, the paper's split, tokenization, accumulation and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pop_nemo.config import ConfigError, load_config
from pop_nemo.rl.dpo import (
    DPOInputError,
    dpo_loss,
    load_pairs,
    make_loss_fn,
    pair_batch,
    sequence_logps,
    split_indices,
    tokenize_pair,
    train_dpo,
)
from tests.conftest import preference_pair


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_loss_matches_the_formula():
    pc = torch.tensor([-10.0, -3.5, -20.0, -7.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -3.0, -19.0, -7.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -3.2, -21.0, -6.0], dtype=torch.float64)
    rr = torch.tensor([-11.5, -3.1, -18.0, -8.0], dtype=torch.float64)
    beta = 0.1
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(4):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert losses[i].item() == pytest.approx(-math.log(_sigmoid(z)), rel=1e-12)
        assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rr_[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_loss_gradient_matches_the_formula():
    beta = 0.01
    pc = torch.tensor([-5.0, -40.0], requires_grad=True, dtype=torch.float64)
    pr = torch.tensor([-6.0, -10.0], requires_grad=True, dtype=torch.float64)
    rc, rr = torch.tensor([-5.5, -41.0], dtype=torch.float64), torch.tensor([-5.0, -12.0], dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        # d/dπc [-log σ(βz)] = -β·σ(-βz); d/dπr = +β·σ(-βz)
        assert pc.grad[i].item() == pytest.approx(-beta * _sigmoid(-z), rel=1e-12)
        assert pr.grad[i].item() == pytest.approx(beta * _sigmoid(-z), rel=1e-12)


def test_at_the_reference_the_loss_is_log_2():
    x = torch.tensor([-3.0, -9.0])
    losses, cr, rr = dpo_loss(x, x - 1, x, x - 1, 0.01)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_sequence_logps_sum_completion_tokens_only():
    lp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.25, -9.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    assert sequence_logps(lp, mask).tolist() == [-5.0, -0.75]


def test_loss_fn_pairs_rows_and_averages_over_the_batch():
    # rows [c0, r0, c1, r1]; token logprobs chosen so the sequence sums are easy.
    from pop_nemo.policies.base import TokenBatch

    lp = torch.tensor([[0.0, -1.0], [0.0, -2.0], [0.0, -3.0], [0.0, -1.0]])
    mb = TokenBatch(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2), torch.tensor([[0.0, 1.0]] * 4))
    mb.extras = {"ref_logps": torch.tensor([-1.5, -1.5, -2.0, -2.0])}
    loss, metrics = make_loss_fn(0.5, num_pairs=4)(lp, mb)
    z = torch.tensor([0.5 * ((-1.0 + 1.5) - (-2.0 + 1.5)), 0.5 * ((-3.0 + 2.0) - (-1.0 + 2.0))])
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(z)).sum().item() / 4)
    assert metrics["reward_accuracy"] == pytest.approx(1 / 4)  # pair 0 right, pair 1 wrong, over 4 pairs
    assert metrics["reward_margin"] == pytest.approx(z.sum().item() / 4)
    assert "loss" not in metrics  # train_step adds the returned loss itself
    # A padding pair (rows with an empty loss mask, as a policy pads micro-batches) counts nothing.
    padded = TokenBatch(
        torch.zeros(6, 2, dtype=torch.long), torch.ones(6, 2), torch.tensor([[0.0, 1.0]] * 4 + [[0.0, 0.0]] * 2)
    )
    padded.extras = {"ref_logps": torch.cat([mb.extras["ref_logps"], torch.zeros(2)])}
    loss2, metrics2 = make_loss_fn(0.5, num_pairs=4)(torch.cat([lp, torch.full((2, 2), -1.0)]), padded)
    assert loss2.item() == pytest.approx(loss.item()) and metrics2 == pytest.approx(metrics)


@pytest.mark.parametrize("n", [1, 2, 7, 25, 26, 100, 333])
def test_split_is_datasets_train_test_split(n):
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    train, held = split_indices(n, 0.04, 42)
    if n < 2:
        assert (train, held) == ([0], [])
        return
    want = ds.train_test_split(test_size=0.04, seed=42)
    assert held == want["test"]["i"] and train == want["train"]["i"]
    assert split_indices(n, 0.0, 42) == (list(range(n)), [])


def test_tokenize_pair_matches_the_chat_template(tokenizer):
    pair = preference_pair(
        "What is 2+2?", "Four. <answer>4</answer>", "Five, I think, after long thought. <answer>5</answer>"
    )
    t = tokenize_pair(tokenizer, pair, max_length=512, max_prompt_length=256)
    # The prompt is exactly what the engines feed the solver (chat template + generation prompt).
    want_prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True)
    want_prompt = list(want_prompt["input_ids"] if hasattr(want_prompt, "keys") else want_prompt)
    assert t.prompt == want_prompt
    full = tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    assert tokenizer.decode(t.prompt + t.chosen) == full
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in t.chosen  # the end of turn is trained
    short = tokenize_pair(tokenizer, pair, max_length=len(t.prompt) + 3, max_prompt_length=5)
    assert short.prompt == t.prompt[-5:] and short.chosen == t.chosen[: len(t.prompt) + 3 - 5]
    batch = pair_batch([t, short], tokenizer.pad_token_id)
    assert batch.loss_mask.sum(-1).tolist() == [len(t.chosen), len(t.rejected), len(short.chosen), len(short.rejected)]


def test_load_pairs_errors(tmp_path):
    with pytest.raises(DPOInputError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    p = tmp_path / "pairs.jsonl"
    p.write_text("")
    with pytest.raises(DPOInputError, match="no pairs"):
        load_pairs(p)
    p.write_text(json.dumps({"prompt": "text", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DPOInputError, match="not a preference pair"):
        load_pairs(p)


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of dpo.micro_batch_size"):
        load_config(None, ["dpo.batch_size=5", "dpo.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["dpo.max_length=100", "dpo.max_prompt_length=100"])


# ---------------------------------------------------------------- the loop, on a tiny real Llama


def _cfg(model: str, *extra: str):
    return load_config(
        "conf/offline/dpo_smoke_cpu.yaml",
        [
            f"model.path={model}",
            "dpo.batch_size=4",
            "dpo.micro_batch_size=2",
            "dpo.lr=1.0e-3",  # a tiny random model: a visible step
            "dpo.eval_fraction=0.2",  # 12 pairs: 3 held out, 9 trained in 3 steps
            "logging.tensorboard=false",
            "logging.progress=false",
            *extra,
        ],
    )


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "final_model" / "model.safetensors"))


def test_gradient_accumulation_equals_one_big_micro_batch(tiny_llama, dpo_pairs):
    from pop_nemo.build import build_dpo_policy

    raw = load_pairs(dpo_pairs)[:4]
    after = []
    for micro in (1, 4):
        cfg = _cfg(tiny_llama, f"dpo.micro_batch_size={micro}")
        policy, tok = build_dpo_policy(cfg, tiny_llama, total_steps=1, warmup_steps=0)
        batch = pair_batch([tokenize_pair(tok, p, 256, 128) for p in raw], tok.pad_token_id)
        batch.extras = {"ref_logps": sequence_logps(policy.logprobs(batch, reference=True), batch.loss_mask)}
        metrics = policy.train_step(batch, make_loss_fn(cfg.dpo.beta, len(raw)))
        after.append((metrics, {k: v.detach().clone() for k, v in policy.model.state_dict().items()}))
    (m1, w1), (m4, w4) = after
    assert m1["loss"] == pytest.approx(math.log(2), abs=1e-6) and m4["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4) and m1["grad_norm"] > 0
    for k in w1:
        assert torch.allclose(w1[k], w4[k], atol=1e-7), k


def test_train_eval_resume(tiny_llama, dpo_pairs, tmp_path):
    full = train_dpo(_cfg(tiny_llama), dpo_pairs, tmp_path / "full")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert train_rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert train_rows[-1]["reward_margin"] > 0 and train_rows[-1]["loss"] < math.log(2)
    # warmup ceil(0.1·3) = 1 step, then cosine to 0 over the remaining 2
    assert [r["lr"] for r in train_rows] == pytest.approx([1e-3, 1e-3, 5e-4])
    eval_row = rows[-1]
    assert eval_row["step"] == 3 and set(eval_row) >= {"eval_loss", "eval_reward_margin", "eval_reward_accuracy"}
    assert full["eval_pairs"] == 3 and full["train_pairs"] == 9
    assert eval_row["eval_loss"] == pytest.approx(full["eval_loss"])

    # Stop after step 1 (a checkpoint), rerun: same weights, same metrics, no duplicated row.
    part = tmp_path / "part"
    stopped = train_dpo(_cfg(tiny_llama, "dpo.max_steps=1", "dpo.save_every=1"), dpo_pairs, part)
    assert stopped == {"step": 1, "total_steps": 3}
    resumed = train_dpo(_cfg(tiny_llama, "dpo.save_every=1"), dpo_pairs, part)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], abs=1e-6)
    part_rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in part_rows] == [r["step"] for r in rows]
    for r, s in zip(rows, part_rows):
        for k in ("loss", "reward_margin", "eval_loss"):
            if k in r:
                assert s[k] == pytest.approx(r[k], abs=1e-6), (r["step"], k)
    wf, wp = _weights(tmp_path / "full"), _weights(part)
    assert all(torch.allclose(wf[k], wp[k], atol=1e-6) for k in wf)

    # A finished run does nothing; other pairs are refused.
    assert train_dpo(_cfg(tiny_llama), dpo_pairs, part) == json.loads((part / "eval.json").read_text())
    other = tmp_path / "other.jsonl"
    other.write_text(dpo_pairs.read_text().replace("Blue", "Green"))
    from pop_nemo.checkpoint import ResumeError

    with pytest.raises(ResumeError, match="pairs_sha256"):
        train_dpo(_cfg(tiny_llama), other, part)


def test_usr1_checkpoints_the_current_step_exits_75_and_the_rerun_finishes(tiny_llama, dpo_pairs, tmp_path):
    """Slurm's warning before the time limit, to a real `pop-nemo dpo` process."""
    import os
    import signal
    import subprocess
    import sys

    from pop_nemo.signals import EXIT_REQUEUE
    from tests.conftest import ROOT, run_cli

    out = tmp_path / "run"
    # 9 training pairs one at a time: 9 steps, so the signal lands well before the last one.
    args = ["dpo", "--config", "conf/offline/dpo_smoke_cpu.yaml", "--pairs", str(dpo_pairs), "--output-dir", str(out)]
    args += [f"model.path={tiny_llama}", "dpo.batch_size=1", "dpo.micro_batch_size=1", "dpo.eval_fraction=0.2"]
    args += ["logging.tensorboard=false", "logging.progress=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "pop_nemo.cli", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env
    )
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("step    1/9"):
            p.send_signal(signal.SIGUSR1)
            break
    err = "".join(seen) + p.stderr.read()
    assert p.wait(timeout=120) == EXIT_REQUEUE, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped_at = rows[-1]["step"]
    assert 1 <= stopped_at < 9 and "stopping after step" in err and "SIGUSR1" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"  # save_every is 50

    rerun = run_cli(*args)
    assert f"(step {stopped_at})" in rerun.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10)) + [9]  # every step once, then held-out
