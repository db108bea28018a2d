"""The online POP loop: self-play with the current policy every step, then a GRPO/RLOO update.

Reads top to bottom. It speaks only to the Engine, Critic and Policy protocols; which classes
stand behind them is decided by config in ``pop_nemo.build``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pop_nemo import build, distributed
from pop_nemo.config import AlgoConfig, Config
from pop_nemo.engines.base import Engine
from pop_nemo.eval.runner import evaluate_during_training
from pop_nemo.models import resolve_model_path
from pop_nemo.policies.base import Policy, TokenBatch
from pop_nemo.rl.advantages import compute_advantages
from pop_nemo.rl.losses import LossConfig, kl_shaped_rewards, normalizer, policy_loss
from pop_nemo.rl.rollout_share import Share, merge
from pop_nemo.rl.scaffold import RunScaffold
from pop_nemo.run_output import console, step_progress, summary_line
from pop_nemo.selfplay.roles import get_task
from pop_nemo.selfplay.rubric import tie_stats
from pop_nemo.selfplay.stage import Example


@dataclass
class Samples:
    """The step's solver answers that enter training, flattened, with explicit group ids."""

    prompts: list[list[int]]
    completions: list[list[int]]
    rewards: torch.Tensor
    group_ids: list[int]
    valid: torch.Tensor  # False: masked (failed judge or invalid rubric), out of loss and baseline


def collect(examples: list[Example], format_reward: float) -> Samples:
    """Rewards and masks by DESIGN §2: bad format → ``format_reward`` (kept in the group);
    failed judge → masked; invalid rubric → the whole group masked."""
    prompts, completions, rewards, gids, valid = [], [], [], [], []
    for e in examples:
        for a in e.answers:
            prompts.append(a.completion.prompt_ids)
            completions.append(a.completion.token_ids)
            gids.append(e.group_id)
            if not e.rubric_valid:
                rewards.append(0.0)
                valid.append(False)
            elif a.answer is None:
                rewards.append(format_reward)
                valid.append(True)
            elif a.judgement is None or not a.judgement.valid:
                rewards.append(0.0)
                valid.append(False)
            else:
                rewards.append(float(a.judgement.reward))
                valid.append(True)
    return Samples(prompts, completions, torch.tensor(rewards), gids, torch.tensor(valid, dtype=torch.bool))


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def selfplay_metrics(examples: list[Example], samples: Samples) -> dict[str, Any]:
    answers = [a for e in examples for a in e.answers]
    judged = [a for a in answers if a.judgement is not None]
    valid_r = samples.rewards[samples.valid]
    scored = [[a.judgement.score for a in e.answers if a.judgement and a.judgement.valid] for e in examples]
    tie_rate, all_equal_rate = tie_stats(scored)
    return {
        "num_docs": len(examples),
        "num_samples": len(answers),
        "num_train_samples": int(samples.valid.sum()),
        "proposer_valid_rate": _rate(sum(e.proposer_valid for e in examples), len(examples)),
        "proposer_attempts_mean": sum(e.proposer_attempts for e in examples) / max(len(examples), 1),
        "rubric_valid_rate": _rate(sum(e.rubric_valid for e in examples), sum(e.proposer_valid for e in examples)),
        "solver_format_valid_rate": _rate(sum(a.format_valid for a in answers), len(answers)),
        "judge_valid_rate": _rate(sum(a.judgement.valid for a in judged), len(judged)),
        "judge_timeouts": sum(a.judgement.timed_out for a in judged),
        "judge_tie_rate": tie_rate,
        "judge_all_equal_rate": all_equal_rate,
        "reward_mean": float(valid_r.mean()) if valid_r.numel() else None,
        "reward_std": float(valid_r.std(unbiased=False)) if valid_r.numel() else None,
        "response_len_mean": sum(len(a.completion.token_ids) for a in answers) / max(len(answers), 1),
    }


def update(policy: Policy, engine: Engine, samples: Samples, a: AlgoConfig) -> dict[str, Any]:
    """Advantages and one policy step on the unmasked samples, then the engine's refit.

    Returns the update's metrics; with no trainable sample, the weights stay as they are."""
    keep = samples.valid.nonzero(as_tuple=True)[0].tolist()
    if not keep:
        return {"loss": None, "kl": None, "degenerate_group_rate": None}
    batch = TokenBatch.from_sequences(
        [samples.prompts[i] for i in keep], [samples.completions[i] for i in keep], engine.pad_id
    )
    engine.sleep()  # colocated engines release memory for the update (no-op on HF)
    old_lp = policy.logprobs(batch)
    ref_lp = policy.logprobs(batch, reference=True) if a.kl_mode != "none" else None
    rewards = samples.rewards.clone()
    if a.kl_mode == "reward_shaping" and ref_lp is not None:
        rewards[keep] = kl_shaped_rewards(rewards[keep], old_lp, ref_lp, batch.loss_mask, a.kl_coef)
    adv = compute_advantages(
        rewards, samples.group_ids, samples.valid, a.advantage, a.normalize_std, a.eps, a.degenerate_std
    )
    batch.extras = {"advantages": adv.values[keep], "old_logprobs": old_lp}
    if ref_lp is not None:
        batch.extras["ref_logprobs"] = ref_lp
    loss_cfg = LossConfig(clip_eps=a.clip_eps, kl_coef=a.kl_coef, kl_mode=a.kl_mode, aggregation=a.aggregation)
    norm = normalizer(batch.loss_mask, a.aggregation)

    def loss_fn(lp: torch.Tensor, mb: TokenBatch):
        x = mb.extras
        return policy_loss(lp, x["old_logprobs"], x["advantages"], mb.loss_mask, loss_cfg, x.get("ref_logprobs"), norm)

    metrics: dict[str, Any] = dict(policy.train_step(batch, loss_fn))
    metrics["degenerate_group_rate"] = adv.degenerate_rate
    metrics["num_groups"] = adv.num_groups
    metrics["train_tokens"] = int(batch.attention_mask.sum())
    t_refit = time.perf_counter()
    engine.wake()
    engine.update_weights(policy.engine_weights())
    metrics["time_refit"] = time.perf_counter() - t_refit
    return metrics


def train(cfg: Config, fresh: bool = False, require_resume: bool = False) -> Path:
    # Everything that can be wrong with the inputs fails here, before any model loads.
    get_task(cfg.task)
    corpus = build.build_corpus(cfg)
    model_path = resolve_model_path(cfg.model.path)
    run = RunScaffold(
        cfg,
        cfg.output_dir,
        seed=cfg.seed,
        outputs=("checkpoints", "metrics.jsonl", "records.jsonl", "tb"),
        keep=cfg.trainer.keep_checkpoints,
        save_every=cfg.trainer.save_every,
        fresh=fresh,
        require_resume=require_resume,
    )
    out = run.out
    console.print(
        f"[bold]pop-nemo train[/] task={cfg.task} model={cfg.model.path} corpus={cfg.corpus.source} ({len(corpus)} docs) → {out}"
    )
    backends = build.build_backends(cfg, model_path)
    console.print(backends.placement())
    policy, engine, r = backends.policy, backends.policy_engine, cfg.rollout
    start = run.open(policy)
    if run.resume is not None:
        engine.update_weights(policy.engine_weights())
        corpus.load_state_dict(run.resume.state["corpus"])
        console.print(f"resumed from {run.resume.path} (step {start})")
    pick = {"policy": engine, "reference": backends.reference_engine}
    critic = build.build_critic(cfg, backends)
    selfplay = build.build_selfplay(cfg, pick[cfg.roles.proposer], engine, critic)

    progress = step_progress(cfg.logging.progress)
    with progress:
        bar = progress.add_task("self-play", total=cfg.trainer.max_steps, completed=start)
        for step in range(start, cfg.trainer.max_steps):
            t_step, tokens_before = time.perf_counter(), _generated_tokens(backends)
            # 1. Self-play with the current policy: propose → solve ×N → rubric → judge. Each rank
            #    plays its share of the documents (whole groups); every rank gets the whole step back.
            progress.update(bar, description=f"step {step + 1}: self-play")
            docs = corpus.take(r.docs_per_step)
            mine = distributed.shard(len(docs), distributed.world_size(), distributed.rank())
            played, stats = selfplay.run(docs[mine.start : mine.stop], step, step * r.docs_per_step + mine.start)
            tokens = _generated_tokens(backends) - tokens_before
            rollout = merge(distributed.all_gather(Share(played, stats.seconds, tokens, critic.step_metrics())))
            examples = rollout.examples
            samples = collect(examples, cfg.algo.format_reward)
            metrics: dict[str, Any] = {"step": step + 1, **selfplay_metrics(examples, samples), **rollout.metrics}

            # 2. Advantages, the policy update and the refit, on the samples that are not masked.
            progress.update(bar, description=f"step {step + 1}: update")
            t_train = time.perf_counter()
            metrics.update(update(policy, engine, samples, cfg.algo))
            if metrics["loss"] is None:
                console.print(f"[yellow]step {step + 1}: no trainable sample (all masked); weights unchanged")
            metrics.update(timing(rollout.seconds, t_step, t_train, rollout.generated_tokens, metrics))
            # 3. Held-out evaluation every eval.every_steps (pop_nemo.eval), in this step's metrics row.
            if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0:
                progress.update(bar, description=f"step {step + 1}: eval")
                b = backends
                metrics.update(evaluate_during_training(cfg, engine, b.reference_engine, b.tokenizer, step + 1, out))
            # 4. Outputs, then an atomic checkpoint that records how far they go.
            run.log(step + 1, metrics, [e.to_record(step=step + 1, model=cfg.model.path) for e in examples])
            console.print(summary_line(metrics))
            last = step + 1 == cfg.trainer.max_steps
            run.save_if_due(step + 1, last, policy, {"corpus": corpus.state_dict()})
            progress.update(bar, advance=1)
            run.exit_if_stopped(step + 1, last)
    run.close()
    console.print(f"done: {cfg.trainer.max_steps} steps; outputs in {out}")
    return out


def timing(
    seconds: dict[str, float], t_step: float, t_train: float, gen_tokens: int, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The step's timing and throughput keys (``time_*``, ``tokens_per_s``, ``train_tokens_per_s``)."""
    t_end = time.perf_counter()
    rollout_s = sum(seconds.values())
    trained = metrics["loss"] is not None
    return {
        **{f"time_{k}": v for k, v in seconds.items()},
        "time_train": t_end - t_train,
        "time_step": t_end - t_step,
        "generated_tokens": gen_tokens,
        "tokens_per_s": gen_tokens / rollout_s if rollout_s > 0 else None,
        "train_tokens_per_s": metrics.get("train_tokens", 0) / (t_end - t_train) if trained else None,
    }


def _generated_tokens(backends: build.Backends) -> int:
    engines = {id(e): e for e in (backends.policy_engine, backends.reference_engine)}
    return sum(e.stats.get("generated_tokens", 0) for e in engines.values())
