"""Config → concrete backends. The only place that knows which classes exist."""

from __future__ import annotations

from dataclasses import dataclass

from pop_nemo.config import Config, ConfigError, RoleSampling
from pop_nemo.corpus import Corpus
from pop_nemo.critic.base import Critic
from pop_nemo.engines.base import Engine, Sampling
from pop_nemo.policies.base import Policy
from pop_nemo.selfplay import roles

DOMAINS_BY_TASK = {"health_care": ["health"], "creative_writing": ["books"], "instruction_following": ["web"]}


def build_corpus(cfg: Config, rank: int = 0, world_size: int = 1, exclude_ids: set[str] | None = None) -> Corpus:
    c = cfg.corpus
    domains = c.domains if c.domains is not None else (DOMAINS_BY_TASK[cfg.task] if c.source == "mini" else None)
    return Corpus(
        source=c.source,
        text_field=c.text_field,
        id_field=c.id_field,
        split=c.split,
        config=c.name,
        domains=domains,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        min_words=c.min_words,
        max_words=c.max_words,
        exclude_ids=exclude_ids,
        max_documents=c.max_documents,
    )


def sampling(s: RoleSampling) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)


def guide_limits(cfg: Config) -> roles.GuideLimits | None:
    g = cfg.rollout.guide
    if not g.enabled:
        return None
    return roles.GuideLimits(
        problem_chars=g.problem_chars,
        reference_chars=g.reference_chars,
        name_chars=g.name_chars,
        gold_chars=g.gold_chars,
        description_chars=g.description_chars,
        thoughts_chars=g.thoughts_chars,
    )


@dataclass
class Backends:
    policy: Policy
    policy_engine: Engine  # the current policy's weights (solver, and roles set to 'policy')
    reference_engine: Engine  # the frozen initial weights
    tokenizer: object


def build_backends(cfg: Config, model_path: str) -> Backends:
    if cfg.policy.backend != "hf":
        raise ConfigError(f"policy.backend={cfg.policy.backend!r} is not available in this build; use 'hf'")
    if cfg.rollout.backend != "hf":
        raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} is not available in this build; use 'hf'")
    from pop_nemo.engines.hf import HFEngine
    from pop_nemo.models import fix_special_tokens, load_causal_lm, load_tokenizer
    from pop_nemo.policies.hf import HFPolicy

    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, cfg.model.dtype)
    reference = load_causal_lm(model_path, cfg.model.dtype)
    fix_special_tokens(tok, model)
    fix_special_tokens(tok, reference)
    p = cfg.policy
    policy = HFPolicy(
        model,
        reference,
        tok,
        lr=p.lr,
        total_steps=cfg.trainer.max_steps,
        warmup_steps=p.warmup_steps,
        min_lr_ratio=p.min_lr_ratio,
        weight_decay=p.weight_decay,
        betas=(p.betas[0], p.betas[1]),
        max_grad_norm=p.max_grad_norm,
        micro_batch_size=p.micro_batch_size,
        bf16_autocast=p.bf16_autocast,
        gradient_checkpointing=p.gradient_checkpointing,
    )
    policy_engine = HFEngine(model, tok, max_batch=cfg.rollout.max_batch, seed=cfg.seed)
    reference_engine = HFEngine(reference, tok, max_batch=cfg.rollout.max_batch, seed=cfg.seed + 1)
    return Backends(policy, policy_engine, reference_engine, tok)


def build_critic(cfg: Config, backends: Backends) -> Critic:
    if cfg.critic.url:
        from pop_nemo.critic.client import CriticClient

        return CriticClient(
            cfg.critic.url, timeout_s=cfg.critic.timeout_s, startup_timeout_s=cfg.critic.startup_timeout_s
        )
    from pop_nemo.critic.local import LocalCritic

    pick = {"policy": backends.policy_engine, "reference": backends.reference_engine}
    return LocalCritic(
        rubric_engine=pick[cfg.roles.rubric],
        judge_engine=pick[cfg.roles.judge],
        rubric_sampling=sampling(cfg.rollout.rubric),
        judge_sampling=sampling(cfg.rollout.judge),
        writing=roles.get_task(cfg.task).writing,
        limits=guide_limits(cfg),
    )
