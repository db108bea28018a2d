"""Offline DPO on best/worst pairs (the paper's training: TRL ``DPOTrainer`` settings, DESIGN §2).

Sigmoid loss ``-log σ(β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))))`` with sequence
log-probabilities summed over the completion tokens; the reference is the initial policy
(``model.path``), frozen. ``dpo.eval_fraction`` of the pairs is held out with the same split as
``datasets.Dataset.train_test_split(test_size, seed)`` and evaluated once at the end.

Tokenization follows TRL's conversational path: the prompt is the chat template of the
prompt messages with the generation prompt, the completion is what the template adds for the
assistant message (its text and end-of-turn), tokenized separately; the prompt keeps its last
``max_prompt_length`` tokens and the completion is cut to fit ``max_length``. (TRL also appends
a second EOS after the template's end-of-turn; we do not.)

It speaks only the Policy protocol (``logprobs(batch, reference=True)``, ``train_step``), so it
runs on the HF policy and on the Megatron policy (``policy.backend=megatron``, its ranks launched
by ``--nproc N``, torchrun or srun as for ``pop-nemo train``). Each optimizer step is one
``train_step`` over ``batch_size`` pairs, as chosen/rejected rows side by side in micro-batches
of ``micro_batch_size`` pairs (gradient accumulation). Checkpoints are
atomic (``pop_nemo.checkpoint``); a rerun resumes from the last one, cuts ``metrics.jsonl`` back
to it, and refuses other pairs or DPO settings. ``SIGUSR1`` (Slurm's warning before the time
limit) checkpoints after the current step and exits 75, as in ``pop-nemo train``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pop_nemo import build
from pop_nemo.checkpoint import (
    ResumeError,
    atomic_write_text,
    resume_guard,
)
from pop_nemo.config import Config, ConfigError
from pop_nemo.engines.prefix import common_prefix
from pop_nemo.jsonl import read_lines
from pop_nemo.policies.base import Policy, TokenBatch
from pop_nemo.rl.scaffold import RunScaffold
from pop_nemo.run_output import console, step_progress


class DPOInputError(ConfigError):
    """The pairs file is missing or malformed (a user error: exit 2)."""


# ---------------------------------------------------------------- the loss


def sequence_logps(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` sums of the completion tokens' logprobs."""
    return (token_logps * loss_mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses, and the implicit rewards ``β·(log π − log π_ref)`` (detached)."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pair_metrics(
    losses: torch.Tensor, chosen_r: torch.Tensor, rejected_r: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor
) -> dict[str, float]:
    """Sums over the pairs (divide by the number of pairs for means)."""
    return {
        "loss": float(losses.detach().sum()),
        "reward_chosen": float(chosen_r.sum()),
        "reward_rejected": float(rejected_r.sum()),
        "reward_margin": float((chosen_r - rejected_r).sum()),
        "reward_accuracy": float((chosen_r > rejected_r).float().sum()),
        "logps_chosen": float(pc.detach().sum()),
        "logps_rejected": float(pr.detach().sum()),
    }


def make_loss_fn(beta: float, num_pairs: int):
    """Loss over a micro-batch of rows ``[c0, r0, c1, r1, ...]`` with ``extras["ref_logps"]``:
    the sum of its pairs' losses over ``num_pairs`` (the optimizer batch), so that the
    accumulated gradient is the batch mean. A pair with an empty row (a policy's padding row:
    loss mask all 0) counts nothing."""

    def loss_fn(lp: torch.Tensor, mb: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = mb.loss_mask.to(lp.device)
        seq = sequence_logps(lp, mask)
        ref = mb.extras["ref_logps"].to(lp.device)
        real = mask.sum(-1) > 0
        keep = real[0::2] & real[1::2]
        losses, cr, rr = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta)
        losses = losses * keep
        metrics = pair_metrics(losses[keep], cr[keep], rr[keep], seq[0::2][keep], seq[1::2][keep])
        metrics.pop("loss")  # train_step sums the returned loss itself
        return losses.sum() / num_pairs, {k: v / num_pairs for k, v in metrics.items()}

    return loss_fn


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_pairs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DPOInputError(f"--pairs {str(path)!r} does not exist (it is the output of `pop-nemo pairs`)")
    pairs = []
    for n, p in read_lines(path, DPOInputError):
        ok = isinstance(p, dict) and all(isinstance(p.get(k), list) and p[k] for k in ("prompt", "chosen", "rejected"))
        if not ok or any(
            not isinstance(m, dict) or "role" not in m or "content" not in m
            for k in ("prompt", "chosen", "rejected")
            for m in p[k]
        ):
            raise DPOInputError(
                f"{path}:{n}: not a preference pair (needs prompt, chosen and rejected as lists of "
                "{role, content} messages, as `pop-nemo pairs` writes)"
            )
        pairs.append(p)
    if not pairs:
        raise DPOInputError(f"{path} holds no pairs; see the statistics `pop-nemo pairs` printed for why")
    return pairs


def _template(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    return list(out["input_ids"] if isinstance(out, Mapping) else out.input_ids)


def tokenize_pair(tokenizer, pair: dict[str, Any], max_length: int, max_prompt_length: int) -> TokenizedPair:
    prompt_text = _template(tokenizer, pair["prompt"], True)

    def completion(msgs: list[dict[str, str]]) -> tuple[str, int]:
        full = _template(tokenizer, pair["prompt"] + msgs, False)
        common = common_prefix(prompt_text, full)  # TRL's: some templates render the prompt differently
        return full[common:], common

    chosen_text, c1 = completion(pair["chosen"])
    rejected_text, c2 = completion(pair["rejected"])
    prompt = _ids(tokenizer, prompt_text[: min(c1, c2)])[-max_prompt_length:]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, _ids(tokenizer, chosen_text)[:room], _ids(tokenizer, rejected_text)[:room])


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` indices exactly as ``datasets.Dataset.train_test_split(test_size=eval_fraction,
    seed=seed)`` picks them (the paper's split). No eval set when it would leave no training pair."""
    n_test = math.ceil(eval_fraction * n) if eval_fraction > 0 else 0
    if n_test == 0 or n - n_test <= 0:
        return list(range(n)), []
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n).tolist()
    return perm[n_test:], perm[:n_test]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:dpo:{epoch}").shuffle(order)
    return order


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> TokenBatch:
    """Rows ``[c0, r0, c1, r1, ...]`` (prompt + completion, right-padded, completion in the loss mask)."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    completions = [c for p in pairs for c in (p.chosen, p.rejected)]
    return TokenBatch.from_sequences(prompts, completions, pad_id)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy: Policy, pairs: list[TokenizedPair], pad_id: int, beta: float, batch_size: int) -> dict[str, float]:
    """Means over ``pairs`` of the loss, rewards, margin, accuracy and sequence logprobs."""
    totals: dict[str, float] = {}
    for i in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs[i : i + batch_size], pad_id)
        seq = sequence_logps(policy.logprobs(batch), batch.loss_mask)
        ref = sequence_logps(policy.logprobs(batch, reference=True), batch.loss_mask)
        losses, cr, rr = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta)
        for k, v in pair_metrics(losses, cr, rr, seq[0::2], seq[1::2]).items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: v / max(len(pairs), 1) for k, v in totals.items()}


# ---------------------------------------------------------------- the loop


def train_dpo(
    cfg: Config, pairs_path: str | Path, output_dir: str | Path, fresh: bool = False, require_resume: bool = False
) -> dict[str, Any]:
    """Train (or resume) DPO; return the final summary (train steps and held-out metrics)."""

    from pop_nemo.models import resolve_model_path

    d = cfg.dpo
    out = Path(output_dir)
    pairs_path = Path(pairs_path)
    raw = load_pairs(pairs_path)
    pairs_sha = hashlib.sha256(pairs_path.read_bytes()).hexdigest()
    train_idx, eval_idx = split_indices(len(raw), d.eval_fraction, d.seed)
    if d.eval_fraction > 0 and not eval_idx:
        console.print(f"[yellow]warning:[/] {len(raw)} pair(s): too few to hold out {d.eval_fraction:.0%}; no eval set")
    steps_per_epoch = math.ceil(len(train_idx) / d.batch_size)
    total_steps = steps_per_epoch * d.epochs
    warmup_steps = math.ceil(d.warmup_ratio * total_steps)
    last_step = min(total_steps, d.max_steps) if d.max_steps else total_steps

    run = RunScaffold(
        cfg,
        out,
        seed=d.seed,
        outputs=("checkpoints", "metrics.jsonl", "records.jsonl", "tb", "eval.json", "final_model"),
        keep=d.keep_checkpoints,
        save_every=d.save_every,
        fresh=fresh,
        require_resume=require_resume,
    )
    out.mkdir(parents=True, exist_ok=True)
    resume = run.resume
    guard = resume_guard(cfg, "dpo", pairs_sha)
    if resume is not None:
        saved = resume.state.get("dpo_guard", {})
        diffs = [k for k in sorted(set(saved) | set(guard)) if saved.get(k) != guard.get(k)]
        if diffs:
            raise ResumeError(
                f"cannot resume DPO from {resume.path}: {', '.join(diffs)} changed (other pairs, model or dpo settings). "
                "Use another --output-dir, or --fresh to discard it."
            )
    if resume is not None and resume.step >= total_steps and (out / "eval.json").is_file():
        console.print(f"DPO in {out} is complete ({total_steps} steps); nothing to do")
        return json.loads((out / "eval.json").read_text())

    console.print(
        f"[bold]pop-nemo dpo[/] model={cfg.model.path} pairs={pairs_path} ({len(train_idx)} train, {len(eval_idx)} held out) "
        f"β={d.beta} lr={d.lr} batch={d.batch_size} steps={total_steps} (warmup {warmup_steps}) → {out}"
    )
    model_path = resolve_model_path(cfg.model.path)
    policy, tok = build.build_dpo_policy(cfg, model_path, total_steps, warmup_steps)
    pad_id = tok.pad_token_id
    data = [tokenize_pair(tok, p, d.max_length, d.max_prompt_length) for p in raw]
    truncated = sum(
        len(t.prompt) + max(len(t.chosen), len(t.rejected)) >= d.max_length or len(t.prompt) >= d.max_prompt_length
        for t in data
    )
    if truncated:
        console.print(f"note: {truncated} pair(s) reach dpo.max_prompt_length or dpo.max_length and were truncated")

    start = run.open(policy)
    if resume is not None:
        console.print(f"resumed from {resume.path} (step {start})")

    progress = step_progress(cfg.logging.progress)
    with progress:
        bar = progress.add_task("dpo", total=last_step, completed=start)
        for step in range(start, last_step):
            t0 = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_idx), d.seed, epoch)
            chosen = [train_idx[i] for i in order[k * d.batch_size : (k + 1) * d.batch_size]]
            batch = pair_batch([data[i] for i in chosen], pad_id)
            ref_lp = policy.logprobs(batch, reference=True)
            batch.extras = {"ref_logps": sequence_logps(ref_lp, batch.loss_mask)}
            metrics: dict[str, Any] = {
                "step": step + 1,
                "epoch": epoch + (k + 1) / steps_per_epoch,
                "pairs": len(chosen),
            }
            metrics.update(policy.train_step(batch, make_loss_fn(d.beta, len(chosen))))
            dt = time.perf_counter() - t0
            tokens = int(batch.attention_mask.sum())
            metrics.update({"train_tokens": tokens, "time_step": dt, "train_tokens_per_s": tokens / dt if dt else None})
            run.log(step + 1, metrics, [])
            console.print(
                f"step {step + 1:>4}/{total_steps} | loss {metrics['loss']:.4f} | margin {metrics['reward_margin']:+.5f}"
                f" | acc {metrics['reward_accuracy']:.2f} | lr {metrics['lr']:.2e} | {dt:.1f}s"
            )
            last = step + 1 == last_step
            run.save_if_due(step + 1, last, policy, {"dpo_guard": guard})
            progress.update(bar, advance=1)
            run.exit_if_stopped(step + 1, last)

    if last_step < total_steps:
        run.close()
        console.print(f"stopped after step {last_step} of {total_steps} (dpo.max_steps); run again to continue")
        return {"step": last_step, "total_steps": total_steps}

    result: dict[str, Any] = {
        "step": total_steps,
        "total_steps": total_steps,
        "train_pairs": len(train_idx),
        "eval_pairs": len(eval_idx),
    }
    if eval_idx:
        ev = evaluate(policy, [data[i] for i in eval_idx], pad_id, d.beta, d.eval_batch_size)
        result.update({f"eval_{k}": v for k, v in ev.items()})
        run.log(total_steps, {"step": total_steps, **{f"eval_{k}": v for k, v in ev.items()}}, [])
        console.print(
            f"held-out ({len(eval_idx)} pairs): loss {ev['loss']:.4f} | margin {ev['reward_margin']:+.5f} | acc {ev['reward_accuracy']:.2f}"
        )
    run.close()
    if d.export:
        policy.export_hf(out / "final_model")
        result["final_model"] = str(out / "final_model")
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    console.print(f"done: {total_steps} steps; outputs in {out}")
    return result
