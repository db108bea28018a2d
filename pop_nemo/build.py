"""Config → concrete backends. The only place that knows which classes exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pop_nemo import distributed
from pop_nemo.config import SELFPLAY_ROLES, Config, ConfigError, OpenAIRolloutConfig, RoleSampling, TeacherConfig
from pop_nemo.corpus import Corpus
from pop_nemo.critic.base import Critic
from pop_nemo.engines.base import Engine, Sampling
from pop_nemo.policies.base import Policy
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.stage import SelfPlay

if TYPE_CHECKING:
    from pop_nemo.critic.local import LocalCritic
    from pop_nemo.engines.openai import OpenAIEngine


def guide_budget_warnings(cfg: Config) -> list[str]:
    """Guided outputs always parse only if max_new_tokens covers the grammar's longest output."""
    lim = guide_limits(cfg)
    if lim is None:
        return []
    r = cfg.rollout
    checks = [
        ("proposer", r.proposer.max_new_tokens, lim.proposer_chars()),
        ("rubric", r.rubric.max_new_tokens, lim.rubric_chars()),
        ("judge", r.judge.max_new_tokens, lim.judge_chars(lim.max_criteria)),
    ]
    return [
        f"rollout.{role}.max_new_tokens={have} is below the guide's worst case ({need} characters); "
        f"a long {role} output can be cut and fail to parse. Raise it or lower rollout.guide limits."
        for role, have, need in checks
        if have < need
    ]


def corpus_domains(cfg: Config) -> list[str] | None:
    """``corpus.domains``, or the task's own domains of the bundled mini corpus."""
    c = cfg.corpus
    if c.domains is not None:
        return c.domains
    return list(roles.get_task(cfg.task).domains) if c.source == "mini" else None


def build_corpus(cfg: Config, rank: int = 0, world_size: int = 1, exclude_ids: set[str] | None = None) -> Corpus:
    """The run's corpus. Training never samples the held-out evaluation documents (``eval.heldout_fraction``
    of the ids, see ``pop_nemo.corpus``); an explicit ``exclude_ids`` replaces that split."""
    c = cfg.corpus
    e = cfg.eval
    return Corpus(
        source=c.source,
        text_field=c.text_field,
        id_field=c.id_field,
        split=c.split,
        config=c.name,
        domains=corpus_domains(cfg),
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        min_words=c.min_words,
        max_words=c.max_words,
        exclude_ids=exclude_ids,
        max_documents=c.max_documents,
        heldout_fraction=e.heldout_fraction if exclude_ids is None else 0.0,
        split_salt=e.split_salt,
    )


def sampling(s: RoleSampling) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)


def guide_limits(cfg: Config) -> roles.GuideLimits | None:
    """The guided-decoding limits of ``rollout.guide``, or None when guided decoding is off."""
    g = cfg.rollout.guide
    return roles.GuideLimits.from_section(g) if g.enabled else None


def engine_device(
    cuda_devices: int, local_rank: int = 0, policy_device: str | None = None, requested: str = "auto"
) -> str:
    """Where an HF engine runs: the one placement rule.

    ``requested`` is ``auto``, ``cpu`` or ``cuda``. Under ``auto``, rollout engines follow the
    policy they serve: on this rank's GPU (``cuda:LOCAL_RANK``) when the policy trains on CUDA,
    on the CPU when it trains there. An engine without a policy in the process (critic server,
    evaluation, synthesis) takes this rank's GPU when there is one. ``cuda_devices`` is 0 when
    CUDA is not available."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"engine device {requested!r} is unknown; use auto, cpu or cuda")
    gpu = f"cuda:{local_rank % cuda_devices}" if cuda_devices else None
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if gpu is None:
            raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
        return gpu
    if policy_device is not None and not str(policy_device).startswith("cuda"):
        return "cpu"
    return gpu or "cpu"


def this_rank_engine_device(policy_device: str | None = None, requested: str = "auto") -> str:
    """:func:`engine_device` for this process (its ``LOCAL_RANK`` and visible GPUs)."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return engine_device(cuda, distributed.local_rank(), policy_device, requested)


def hf_engine(
    model_path: str,
    tokenizer,
    *,
    dtype: str,
    max_batch: int,
    seed: int,
    device: str = "cpu",
    model=None,
) -> Engine:
    """The one place an HF engine is built. It loads ``model_path`` onto ``device`` (frozen), or
    wraps ``model``, a module already placed (the HF policy's own, which the engine shares)."""
    from pop_nemo.engines.hf import HFEngine
    from pop_nemo.models import fix_special_tokens, load_causal_lm

    if model is None:
        model = load_causal_lm(model_path, dtype).eval().requires_grad_(False)
        fix_special_tokens(tokenizer, model)
        if device != "cpu":
            model = model.to(device)
    return HFEngine(model, tokenizer, max_batch=max_batch, seed=seed)


def hf_engine_loader(model: str, dtype: str, device: str, max_batch: int, num_threads: int | None, seed: int):
    """A ``load()`` for ``pop-nemo serve-openai`` that builds the HF engine (run on the engine thread)."""

    def load() -> Engine:
        import torch

        from pop_nemo.models import load_tokenizer, resolve_model_path

        if num_threads:
            torch.set_num_threads(num_threads)
        path = resolve_model_path(model)
        placed = this_rank_engine_device(requested=device)
        return hf_engine(path, load_tokenizer(path), dtype=dtype, max_batch=max_batch, seed=seed, device=placed)

    return load


def build_selfplay(
    cfg: Config,
    proposer: Engine,
    solver: Engine,
    critic: Critic,
    *,
    n: int | None = None,
    proposer_retries: int | None = None,
    solver_resample: int | None = None,
    seed: int | None = None,
) -> SelfPlay:
    """The one place a ``SelfPlay`` is built: task, sampling, guide limits and fallback from the
    config; the online loop, synthesis (``offline.*`` group shape) and the held-out problems
    (``eval.rubric_answers``, its own seed) differ only in the keyword overrides."""
    r = cfg.rollout
    return SelfPlay(
        roles.get_task(cfg.task),
        proposer=proposer,
        solver=solver,
        critic=critic,
        proposer_sampling=sampling(r.proposer),
        solver_sampling=sampling(r.solver),
        n=r.n if n is None else n,
        proposer_retries=r.proposer_retries if proposer_retries is None else proposer_retries,
        solver_resample=r.solver_resample if solver_resample is None else solver_resample,
        limits=guide_limits(cfg),
        seed=cfg.seed if seed is None else seed,
        answer_fallback=cfg.algo.answer_fallback,
    )


@dataclass
class Backends:
    policy: Policy
    policy_engine: Engine  # the current policy's weights (solver, and roles set to 'policy')
    reference_engine: Engine  # the frozen initial weights
    tokenizer: object

    def placement(self) -> str:
        """Where the policy and each engine live, for the startup line and ``pop-nemo doctor``."""
        same = self.reference_engine is self.policy_engine
        ref = "the policy engine" if same else self.reference_engine.placement
        return f"policy on {self.policy.device}, policy engine on {self.policy_engine.placement}, reference engine on {ref}"


def build_backends(cfg: Config, model_path: str) -> Backends:
    check_policy_backend(cfg)
    check_rollout_backend(cfg)
    if cfg.policy.backend == "megatron":
        return _build_megatron(cfg, model_path)
    from pop_nemo.models import load_tokenizer

    tok = load_tokenizer(model_path)
    policy = _hf_policy(cfg, model_path, tok, _optimizer_kwargs(cfg))
    model, reference = policy.model, policy.reference
    policy_engine, reference_engine = rollout_engines(cfg, model_path, tok, model, reference)
    return Backends(policy, policy_engine, reference_engine, tok)


def _optimizer_kwargs(cfg: Config) -> dict:
    """Optimizer, schedule and micro-batching: the same settings for every policy backend."""
    p = cfg.policy
    return {
        "lr": p.lr,
        "total_steps": cfg.trainer.max_steps,
        "warmup_steps": p.warmup_steps,
        "min_lr_ratio": p.min_lr_ratio,
        "weight_decay": p.weight_decay,
        "betas": (p.betas[0], p.betas[1]),
        "max_grad_norm": p.max_grad_norm,
        "micro_batch_size": p.micro_batch_size,
    }


def check_policy_backend(cfg: Config, ranks: int | None = None) -> None:
    """Fail before any model loads when the policy backend cannot run here: the HF policy trains
    in one process (under torchrun/srun every rank would train its own copy), and Megatron needs
    megatron-core, megatron-bridge and GPUs. ``ranks``: how many will run (default: this world's)."""
    if cfg.policy.backend != "megatron":
        if (ranks := distributed.world_size() if ranks is None else ranks) > 1:
            raise ConfigError(
                f"{ranks} ranks (--nproc, torchrun or srun), but policy.backend={cfg.policy.backend!r} "
                "trains in one process: add policy.backend=megatron to train data-parallel, or start one process"
            )
        return
    import importlib.util

    try:
        missing = any(importlib.util.find_spec(m) is None for m in ("megatron.core", "megatron.bridge"))
    except ModuleNotFoundError:  # no `megatron` package at all
        missing = True
    if missing:
        raise ConfigError(
            "policy.backend=megatron needs megatron-core and megatron-bridge: run scripts/install.sh "
            "(or use the NGC image of containers/Dockerfile), or set policy.backend=hf"
        )
    from pop_nemo.policies.megatron import runs_here

    if not runs_here():
        raise ConfigError(
            "policy.backend=megatron needs CUDA GPUs (megatron-core calls CUDA directly) and none is visible; "
            "set policy.backend=hf to run on this machine"
        )


def check_rollout_backend(cfg: Config) -> None:
    """Fail before any model loads when the rollout backend cannot run here."""
    tp = cfg.rollout.trtllm.tensor_parallel_size
    if cfg.rollout.backend == "trtllm" and tp > 1 and (world := distributed.world_size()) > 1:
        raise ConfigError(
            f"rollout.trtllm.tensor_parallel_size={tp} with {world} trainer ranks: each rank builds its own "
            "rollout engine on its GPU (one generation replica per rank); set it to 1, or run one process"
        )
    if cfg.rollout.backend == "trtllm":
        from pop_nemo.engines.trtllm import tensorrt_llm_available

        if not tensorrt_llm_available():
            raise ConfigError(
                "rollout.backend=trtllm needs TensorRT-LLM, which ships in the NGC image built by "
                "containers/Dockerfile (it is not on PyPI as a wheel); here use rollout.backend=hf or openai"
            )


def make_trtllm_engine(cfg: Config, model_path: str, tokenizer, name: str = "policy") -> Engine:
    """A TensorRT-LLM engine with ``rollout.trtllm`` settings (also for the critic server)."""
    from pathlib import Path

    from pop_nemo.engines.trtllm import TRTLLMEngine

    t = cfg.rollout.trtllm
    return TRTLLMEngine(
        model_path,
        tokenizer,
        tensor_parallel_size=t.tensor_parallel_size,
        dtype=t.dtype,
        max_batch_size=t.max_batch_size,
        max_seq_len=t.max_seq_len,
        max_num_tokens=t.max_num_tokens,
        kv_cache_fraction=t.kv_cache_fraction,
        enable_sleep=t.enable_sleep,
        sleep_tags=t.sleep_tags,
        refit=t.refit,
        orchestrator=t.orchestrator,
        refit_bucket_mb=t.refit_bucket_mb,
        export_dir=str(Path(cfg.output_dir) / "trtllm" / name),
        json_guides=t.json_guides,
    )


def endpoint_engine(endpoint: OpenAIRolloutConfig | TeacherConfig, tokenizer=None) -> OpenAIEngine:
    """An OpenAI-compatible endpoint section (``rollout.openai`` or ``offline.teacher``) as an
    Engine; the API key is read from the environment variable the section names."""
    from pop_nemo.engines.openai import OpenAIEngine

    return OpenAIEngine.from_env(
        endpoint.url or "",
        endpoint.model,
        endpoint.api_key_env,
        guide_format=endpoint.guide_format,
        timeout_s=endpoint.timeout_s,
        max_concurrency=endpoint.max_concurrency,
        max_retries=endpoint.max_retries,
        tokenizer=tokenizer,
    )


def make_openai_engine(cfg: Config, tokenizer=None) -> Engine:
    """The ``rollout.openai`` endpoint as an Engine, once it answers (bounded wait)."""
    o = cfg.rollout.openai
    engine = endpoint_engine(o, tokenizer)
    engine.wait_ready(o.startup_timeout_s)
    return engine


def synthesis_self_engine(cfg: Config) -> Engine:
    """The configured model for synthesis (the roles the teacher does not play), on this rank's GPU when there is one."""
    from pop_nemo.models import load_tokenizer, resolve_model_path

    if cfg.rollout.backend != "hf":
        raise ConfigError(
            f"rollout.backend={cfg.rollout.backend!r}: synthesis runs the model in-process ('hf'); to serve roles "
            "from an OpenAI-compatible server (vLLM, trtllm-serve), set offline.teacher.url and offline.teacher.roles"
        )
    path = resolve_model_path(cfg.model.path)
    device = this_rank_engine_device()
    return hf_engine(
        path, load_tokenizer(path), dtype=cfg.model.dtype, max_batch=cfg.rollout.max_batch, seed=cfg.seed, device=device
    )


def synthesis_engines(cfg: Config) -> dict[str, Engine]:
    """The engine of each self-play role for synthesis: ``offline.teacher``'s endpoint for its roles,
    one in-process engine (:func:`synthesis_self_engine`) shared by the others."""
    teacher_roles = set(cfg.offline.teacher.roles)
    out: dict[str, Engine] = {}
    if teacher_roles:
        teacher = endpoint_engine(cfg.offline.teacher)
        out.update({r: teacher for r in teacher_roles})
    if teacher_roles != set(SELFPLAY_ROLES):
        own = synthesis_self_engine(cfg)
        out.update({r: own for r in SELFPLAY_ROLES if r not in teacher_roles})
    return out


def rollout_engines(
    cfg: Config, model_path: str, tokenizer, policy_model=None, reference_model=None, policy_device: str | None = None
):
    """(policy engine, reference engine) for ``rollout.backend``.

    ``hf``: in-process engines (over ``policy_model``, which the HF policy trains in place, and
    ``reference_model``; loaded from ``model_path`` when not given, and placed by
    :func:`engine_device` next to a policy on ``policy_device``). ``trtllm``: two TensorRT-LLM
    engines, the policy's refit every step. ``openai``: the frozen reference roles on the
    endpoint; the policy engine stays in-process (an endpoint cannot be refit)."""
    device = this_rank_engine_device(policy_device)

    def hf(model, offset: int) -> Engine:
        r = cfg.rollout
        return hf_engine(
            model_path,
            tokenizer,
            dtype=cfg.model.dtype,
            max_batch=r.max_batch,
            seed=cfg.seed + offset,
            device=device,
            model=model,
        )

    backend = cfg.rollout.backend
    if backend == "trtllm":
        return make_trtllm_engine(cfg, model_path, tokenizer), make_trtllm_engine(
            cfg, model_path, tokenizer, "reference"
        )
    policy_engine = hf(policy_model, 0)
    if backend == "openai":
        return policy_engine, make_openai_engine(cfg, tokenizer)
    return policy_engine, hf(reference_model, 1)


def _build_megatron(cfg: Config, model_path: str) -> Backends:
    """Megatron policy (TP/PP/DP from ``cfg.megatron``); rollout engines refit from its weights."""
    from pop_nemo.models import load_tokenizer

    tok = load_tokenizer(model_path)
    with_reference = cfg.megatron.reference and cfg.algo.kl_mode != "none"
    policy = _megatron_policy(cfg, model_path, tok, _optimizer_kwargs(cfg), with_reference)
    policy_engine, reference_engine = rollout_engines(cfg, model_path, tok, policy_device=str(policy.device))
    return Backends(policy, policy_engine, reference_engine, tok)


def _megatron_policy(cfg: Config, model_path: str, tok, optimizer: dict, with_reference: bool, row_group: int = 1):
    from pop_nemo.policies.megatron import MegatronPolicy

    m = cfg.megatron
    return MegatronPolicy(
        model_path,
        tok,
        **optimizer,
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        bf16=m.bf16,
        sequence_parallel=m.sequence_parallel,
        use_distributed_optimizer=m.use_distributed_optimizer,
        activation_recompute=m.activation_recompute or cfg.policy.gradient_checkpointing,
        with_reference=with_reference,
        row_group=row_group,
        seed=cfg.seed,
    )


def build_dpo_policy(cfg: Config, model_path: str, total_steps: int, warmup_steps: int) -> tuple[Policy, object]:
    """``pop-nemo dpo``'s policy and tokenizer: the trained model and its frozen reference (the
    initial weights), with ``dpo.*``'s schedule and ``policy.*``'s optimizer settings. Rows are a
    chosen and a rejected per pair: micro-batches hold ``2 × dpo.micro_batch_size`` rows and the
    Megatron policy keeps each pair on one data-parallel rank."""
    from pop_nemo.models import load_tokenizer

    check_policy_backend(cfg)
    d = cfg.dpo
    optimizer = {
        **_optimizer_kwargs(cfg),
        "lr": d.lr,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "min_lr_ratio": d.min_lr_ratio,
        "micro_batch_size": 2 * d.micro_batch_size,
    }
    tok = load_tokenizer(model_path)
    tok.padding_side = "right"
    if cfg.policy.backend == "megatron":
        return _megatron_policy(cfg, model_path, tok, optimizer, with_reference=True, row_group=2), tok
    return _hf_policy(cfg, model_path, tok, optimizer), tok


def _hf_policy(cfg: Config, model_path: str, tok, optimizer: dict):
    """The HF policy and its frozen reference, both on the GPU when there is one."""
    from pop_nemo.models import fix_special_tokens, load_causal_lm
    from pop_nemo.policies.hf import HFPolicy

    model = load_causal_lm(model_path, cfg.model.dtype)
    reference = load_causal_lm(model_path, cfg.model.dtype)
    for m in (model, reference):
        fix_special_tokens(tok, m)
    device = this_rank_engine_device()  # the engines share these modules: policy and engines in one place
    if device != "cpu":
        model, reference = model.to(device), reference.to(device)
    p = cfg.policy
    return HFPolicy(
        model,
        reference,
        tok,
        **optimizer,
        bf16_autocast=p.bf16_autocast,
        gradient_checkpointing=p.gradient_checkpointing,
    )


def build_critic(cfg: Config, backends: Backends) -> Critic:
    if cfg.critic.url:
        from pop_nemo.critic.client import CriticClient

        return CriticClient(
            cfg.critic.url, timeout_s=cfg.critic.timeout_s, startup_timeout_s=cfg.critic.startup_timeout_s
        )
    pick = {"policy": backends.policy_engine, "reference": backends.reference_engine}
    return local_critic(cfg, pick[cfg.roles.rubric], pick[cfg.roles.judge])


def local_critic(cfg: Config, rubric_engine: Engine, judge_engine: Engine) -> LocalCritic:
    """The one way a LocalCritic is made from a config (the trainer, ``serve-critic`` and
    ``synthesize`` all build theirs here): sampling from ``rollout.rubric``/``rollout.judge``,
    the task's writing and the guide limits."""
    from pop_nemo.critic.local import LocalCritic

    return LocalCritic(
        rubric_engine=rubric_engine,
        judge_engine=judge_engine,
        rubric_sampling=sampling(cfg.rollout.rubric),
        judge_sampling=sampling(cfg.rollout.judge),
        writing=roles.get_task(cfg.task).writing,
        limits=guide_limits(cfg),
        judge_mode=cfg.rollout.judge.mode,
        paper_parsing=cfg.rollout.judge.parsing == "paper",
    )
