"""Typed configuration: YAML files with ``defaults:`` inheritance and dotted CLI overrides.

Every error names the field and the fix, and is raised before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: str = "smollm2"  # 'smollm2' (bundled), an HF folder, or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class CorpusConfig:
    source: str = "mini"  # 'mini' (bundled), a local .jsonl/.parquet/.txt file or folder, or an HF dataset id
    text_field: str = "text"
    id_field: str | None = "id"
    split: str = "train"
    name: str | None = None  # HF dataset config name
    domains: list[str] | None = None  # filter of the mini corpus: health, books, web
    min_words: int = 50
    max_words: int = 1024
    max_documents: int | None = None


@dataclass
class RoleSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class JudgeSampling(RoleSampling):
    """The judge's sampling, how it is asked, and which parsing rules score its output."""

    # rubric: all criteria in one call (the paper). per_criterion: one short call per criterion.
    mode: Literal["rubric", "per_criterion"] = "rubric"
    # pop_nemo or paper: rubric/evaluation parsing rules (DESIGN §6 lists the differences)
    parsing: Literal["pop_nemo", "paper"] = "pop_nemo"


@dataclass
class GuideConfig:
    enabled: bool = True
    problem_chars: int = 400
    reference_chars: int = 400
    name_chars: int = 48
    gold_chars: int = 120
    description_chars: int = 240
    thoughts_chars: int = 160
    max_criteria: int = 5  # at most 5 (the paper's rubric size)


@dataclass
class RolesConfig:
    """Who plays each untrained role: the current 'policy' or the frozen 'reference'."""

    proposer: Literal["policy", "reference"] = "reference"
    rubric: Literal["policy", "reference"] = "reference"
    judge: Literal["policy", "reference"] = "reference"


@dataclass
class TRTLLMConfig:
    """``rollout.backend=trtllm``: TensorRT-LLM LLM API engines (GPU; see pop_nemo.engines.trtllm)."""

    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    kv_cache_fraction: float = 0.4  # of free GPU memory, per engine (policy and reference each have one)
    enable_sleep: bool = True  # release the KV cache while the colocated trainer runs
    sleep_tags: list[str] = field(default_factory=lambda: ["kv_cache"])
    refit: Literal["auto", "ipc", "reload"] = "auto"  # auto: CUDA IPC, else reload an exported folder
    orchestrator: Literal["ray", "mpi"] = "ray"  # ray: the worker extension that refits in place
    refit_bucket_mb: int = 1024
    json_guides: Literal["ebnf", "json"] = "ebnf"  # ebnf: the HF engine's exact JSON grammar


@dataclass
class OpenAIRolloutConfig:
    """``rollout.backend=openai``: the frozen reference roles on an OpenAI-compatible server
    (trtllm-serve, vLLM, ``pop-nemo serve-openai``); the trained policy stays in-process."""

    url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str = "default"  # the served model name
    api_key_env: str | None = None
    guide_format: Literal["json_schema", "trtllm", "vllm", "none"] = "json_schema"
    timeout_s: float = 600.0
    max_concurrency: int = 64
    max_retries: int = 5
    startup_timeout_s: float = 600.0


@dataclass
class RolloutConfig:
    backend: Literal["hf", "trtllm", "openai"] = "hf"
    docs_per_step: int = 2
    n: int = 4  # solver samples per problem (the group size)
    proposer_retries: int = 5
    solver_resample: int = 0  # extra solver calls while <= n//4 answers are valid (paper: 5 offline)
    max_batch: int = 16
    proposer: RoleSampling = field(default_factory=lambda: RoleSampling(1.0, 1.0, 840))
    solver: RoleSampling = field(default_factory=lambda: RoleSampling(1.0, 1.0, 1024))
    rubric: RoleSampling = field(default_factory=lambda: RoleSampling(0.0, 1.0, 2450))
    judge: JudgeSampling = field(default_factory=lambda: JudgeSampling(0.0, 1.0, 1350))
    guide: GuideConfig = field(default_factory=GuideConfig)
    trtllm: TRTLLMConfig = field(default_factory=TRTLLMConfig)
    openai: OpenAIRolloutConfig = field(default_factory=OpenAIRolloutConfig)


@dataclass
class AlgoConfig:
    advantage: Literal["grpo", "rloo"] = "grpo"
    normalize_std: bool = True
    eps: float = 1e-6
    degenerate_std: float = 1e-3
    format_reward: float = 0.0
    # True: a reply with no <answer> block is judged whole (tiny models); format validity is still reported.
    answer_fallback: bool = False
    clip_eps: float = 0.2
    kl_coef: float = 0.01
    kl_mode: Literal["k3_loss", "reward_shaping", "none"] = "k3_loss"
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"


@dataclass
class PolicyConfig:
    backend: Literal["hf", "megatron"] = "hf"
    lr: float = 1e-6
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    micro_batch_size: int = 4
    bf16_autocast: bool = False
    gradient_checkpointing: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 2
    save_every: int = 1
    keep_checkpoints: int = 2
    num_threads: int | None = None  # torch CPU threads; None = torch default


@dataclass
class CriticConfig:
    # set: judge (and rubric) calls go to `pop-nemo serve-critic`; a list (or "url1,url2") = replicas
    url: str | list[str] | None = None
    timeout_s: float = 120.0
    startup_timeout_s: float = 300.0


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True


# ---- sections owned by later features (offline recipe, evaluation, Megatron backend) ----


@dataclass
class OfflineConfig:
    """``pop-nemo synthesize`` and ``pop-nemo pairs`` (the paper's recipe, DESIGN §2).

    Synthesis samples with ``rollout.{proposer,solver,rubric,judge}`` (temperatures, token
    limits), ``rollout.guide`` and ``rollout.max_batch``; the group size and retry counts below
    are the paper's and replace ``rollout.n`` / ``rollout.solver_resample`` for synthesis.
    """

    @dataclass
    class Teacher:
        """Roles played through an OpenAI-compatible endpoint (a teacher model such as
        gpt-4o-mini, or the policy itself served by vLLM / trtllm-serve)."""

        url: str | None = None  # e.g. http://127.0.0.1:8000/v1
        model: str = "gpt-4o-mini-2024-07-18"
        roles: list[str] = field(default_factory=list)  # any of: proposer, solver, rubric, judge
        api_key_env: str | None = "OPENAI_API_KEY"  # read from the environment; never stored
        # How guides travel: 'json_schema' (OpenAI response_format; EBNF/regex guides are not
        # sent), 'trtllm' (response_format json/ebnf/regex), 'vllm' (guided_json/guided_grammar/
        # guided_regex), 'none'.
        guide_format: Literal["json_schema", "trtllm", "vllm", "none"] = "json_schema"
        timeout_s: float = 600.0
        max_concurrency: int = 16
        max_retries: int = 5

    # synthesize
    num_documents: int = 8  # one problem per document, in the corpus' deterministic order
    chunk_size: int = 64  # documents per batched self-play call and per committed append
    n: int = 32  # solver samples per problem (paper: 32)
    proposer_retries: int = 5  # proposer attempts until problem and reference parse (paper: 5)
    solver_resample: int = 5  # extra solver calls while <= n//4 answers are valid (paper: 5)
    # Ablations (paper flags): proposer_knowledge=false is --use_knowledge 0 (the proposer, and so the
    # rubric writer, get "None" for the document); rubric_knowledge=false is --no_know_in_rubric (the
    # rubric writer gets "None" for the document and the reference answer).
    proposer_knowledge: bool = True
    rubric_knowledge: bool = True
    # pointwise: rubric score per answer in [0, 2] (the paper's runs). median_anchor: each answer against
    # the median-length answer, both orders, score = mean(r_i - r_anchor) in [-10, 10]. pairwise: round
    # robin, both orders, score = win rate in [0, 1].
    scoring: Literal["pointwise", "median_anchor", "pairwise"] = "pointwise"
    teacher: Teacher = field(default_factory=Teacher)
    # pairs
    best_of_n: int = 32
    std_threshold: float = 0.001
    max_length_diff_words: int = 100
    # 'space' = str.split(" ") (the paper's code, the default); 'whitespace' = str.split()
    length_words: Literal["whitespace", "space"] = "space"
    shuffle_seed: int = 42
    max_pairs: int = 100000

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.num_documents >= 1, "offline.num_documents must be >= 1")
        need(self.chunk_size >= 1, "offline.chunk_size must be >= 1")
        need(self.n >= 2, f"offline.n={self.n}: pairs need at least 2 answers per problem; set offline.n>=2")
        need(self.proposer_retries >= 1, "offline.proposer_retries must be >= 1 (1 = no retry)")
        need(self.solver_resample >= 0, "offline.solver_resample must be >= 0")
        need(self.best_of_n >= 2, "offline.best_of_n must be >= 2")
        need(self.std_threshold >= 0, "offline.std_threshold must be >= 0")
        need(self.max_length_diff_words >= 0, "offline.max_length_diff_words must be >= 0")
        need(self.max_pairs >= 1, "offline.max_pairs must be >= 1")
        bad = sorted(set(self.teacher.roles) - {"proposer", "solver", "rubric", "judge"})
        need(not bad, f"offline.teacher.roles has unknown roles {bad}; use any of proposer, solver, rubric, judge")
        need(
            not self.teacher.roles or bool(self.teacher.url),
            f"offline.teacher.roles={self.teacher.roles} needs offline.teacher.url (an OpenAI-compatible /v1 endpoint)",
        )
        need(self.teacher.max_concurrency >= 1, "offline.teacher.max_concurrency must be >= 1")


@dataclass
class DPOConfig:
    """``pop-nemo dpo`` (paper: sigmoid loss, β 0.01, lr 1e-6 cosine, warmup 0.1, 1 epoch, batch 16,
    max length 6144 / prompt 1024, 4% held out). Optimizer settings (betas, weight decay, grad norm,
    autocast, checkpointing) and the backend come from ``policy``."""

    beta: float = 0.01
    lr: float = 1e-6
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (transformers' schedule: 0)
    epochs: int = 1
    batch_size: int = 16  # pairs per optimizer step (effective batch)
    micro_batch_size: int = 1  # pairs per forward/backward (gradient accumulation)
    eval_batch_size: int = 2
    max_length: int = 6144  # prompt + completion tokens
    max_prompt_length: int = 1024  # the prompt keeps its last tokens
    eval_fraction: float = 0.04  # held out, evaluated at the end (datasets' train_test_split)
    seed: int = 42
    save_every: int = 50  # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    max_steps: int | None = None  # stop early after this many optimizer steps (resume continues)
    export: bool = True  # write DIR/final_model (an HF folder: model + tokenizer) at the end

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.beta > 0, "dpo.beta must be > 0")
        need(self.lr > 0, "dpo.lr must be > 0")
        need(0 <= self.warmup_ratio < 1, "dpo.warmup_ratio must be in [0, 1)")
        need(0 <= self.min_lr_ratio <= 1, "dpo.min_lr_ratio must be in [0, 1]")
        need(self.epochs >= 1, "dpo.epochs must be >= 1")
        need(self.micro_batch_size >= 1, "dpo.micro_batch_size must be >= 1")
        need(
            self.batch_size >= self.micro_batch_size and self.batch_size % self.micro_batch_size == 0,
            f"dpo.batch_size={self.batch_size} must be a multiple of dpo.micro_batch_size={self.micro_batch_size}",
        )
        need(self.eval_batch_size >= 1, "dpo.eval_batch_size must be >= 1")
        need(
            1 <= self.max_prompt_length < self.max_length,
            "dpo.max_prompt_length must be >= 1 and below dpo.max_length",
        )
        need(0 <= self.eval_fraction < 1, "dpo.eval_fraction must be in [0, 1)")
        need(self.save_every >= 1, "dpo.save_every must be >= 1")
        need(self.keep_checkpoints >= 1, "dpo.keep_checkpoints must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "dpo.max_steps must be >= 1 (or null)")


@dataclass
class EvalConfig:
    """Held-out evaluation (``pop-nemo eval`` and every ``every_steps`` in the online loop).

    Problems and rubrics are written once by the reference model (``model.path``) and cached
    under ``cache_dir``, keyed by a hash of that model and of every setting that shapes them.
    """

    every_steps: int = 0  # 0 = never during training
    # Held-out split: a document is held out when hash(split_salt, doc id) < heldout_fraction.
    # Training (online and offline) never samples these documents.
    heldout_fraction: float = 0.1
    split_salt: str = "pop-nemo-heldout"
    num_documents: int = 32  # held-out documents evaluated (0 = skip the held-out self-play eval)
    rubric_answers: int = 4  # reference-model answers shown to the rubric writer
    rubric_max_new_tokens: int | None = None  # None = rollout.rubric.max_new_tokens
    judge_max_new_tokens: int | None = None  # None = rollout.judge.max_new_tokens
    greedy: bool = True  # one greedy answer per problem
    samples: int = 4  # sampled answers per problem (0 = none)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # evaluated answers; None = rollout.solver.max_new_tokens
    seed: int = 0
    bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    confidence: float = 0.95
    cache_dir: str | None = None  # None = $POP_NEMO_CACHE/eval (default ~/.cache/pop_nemo/eval)
    # Rubric benchmark in HealthBench format: a JSONL path, 'example' (the bundled tiny file), or null.
    healthbench: str | None = None
    healthbench_limit: int | None = None  # first N conversations
    healthbench_max_new_tokens: int = 512  # the evaluated model's reply
    grader_max_new_tokens: int = 256
    grader_explanation_chars: int = 300
    # HealthBench grader: an HF folder or hub id (None = model.path, the reference), or, with
    # judge_url, the model name served by an OpenAI-compatible endpoint (trtllm-serve, vLLM).
    judge_model: str | None = None
    judge_url: str | None = None  # e.g. http://judge-host:8000/v1
    judge_api_key_env: str | None = None  # environment variable holding the endpoint's API key
    judge_guide_format: Literal["json_schema", "trtllm", "vllm", "none"] = "json_schema"

    def __post_init__(self) -> None:
        checks = [
            (self.every_steps >= 0, "eval.every_steps must be >= 0 (0 = never during training)"),
            (0 <= self.heldout_fraction < 1, "eval.heldout_fraction must be in [0, 1)"),
            (self.num_documents >= 0, "eval.num_documents must be >= 0"),
            (self.rubric_answers >= 1, "eval.rubric_answers must be >= 1 (the rubric writer needs an answer)"),
            (self.samples >= 0, "eval.samples must be >= 0"),
            (self.greedy or self.samples > 0, "eval.greedy=false and eval.samples=0 leave nothing to evaluate"),
            (self.temperature > 0, "eval.temperature must be > 0 (greedy answers come from eval.greedy)"),
            (0 < self.top_p <= 1, "eval.top_p must be in (0, 1]"),
            (self.bootstrap >= 100, "eval.bootstrap must be >= 100 resamples"),
            (0.5 <= self.confidence < 1, "eval.confidence must be in [0.5, 1), e.g. 0.95"),
            (self.healthbench_limit is None or self.healthbench_limit >= 1, "eval.healthbench_limit must be >= 1"),
            (self.healthbench_max_new_tokens >= 1, "eval.healthbench_max_new_tokens must be >= 1"),
            (self.grader_max_new_tokens >= 1, "eval.grader_max_new_tokens must be >= 1"),
            (self.grader_explanation_chars >= 1, "eval.grader_explanation_chars must be >= 1"),
        ]
        for key in ("rubric_max_new_tokens", "judge_max_new_tokens", "max_new_tokens"):
            v = getattr(self, key)
            checks.append((v is None or v >= 1, f"eval.{key} must be >= 1 or null"))
        if self.healthbench not in (None, "example") and not Path(self.healthbench).expanduser().is_file():
            checks.append((False, f"eval.healthbench={self.healthbench!r} is not a file (or use 'example')"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@dataclass
class MegatronConfig:
    """``policy.backend=megatron``: parallel layout and precision (docs/MEMORY.md has the sizing).

    Data parallelism is what is left: ``world_size / (TP × PP)``. ``policy.*`` (lr, schedule,
    clip, micro_batch_size) applies as for the HF policy.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    bf16: bool = False  # bf16 weights and activations, fp32 master weights/grads in the optimizer
    sequence_parallel: bool = False  # needs TP > 1 and Transformer Engine (GPU)
    use_distributed_optimizer: bool | None = None  # shard Adam state over DP; None = on with CUDA
    activation_recompute: bool = False  # full recompute of each layer in backward
    reference: bool = True  # keep a frozen reference GPTModel (needed unless algo.kl_mode=none)

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"megatron.{name} must be >= 1")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError("megatron.sequence_parallel needs megatron.tensor_model_parallel_size >= 2")


@dataclass
class Config:
    task: str = "health_care"
    seed: int = 1234
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``defaults: [other.yaml, ...]`` relative to it (later wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config {path} includes itself through 'defaults'")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields")
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    merged: dict[str, Any] = {}
    for d in defaults:
        merged = _merge(merged, load_yaml(path.parent / d, _seen + (path.resolve(),)))
    return _merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML: numbers, booleans, null, lists)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value (e.g. trainer.max_steps=10)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not allowed; use one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string; accept it as the number it is.
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build_section(cls: type, data: Any, where: str) -> Any:
    """A config dataclass from a mapping, each field coerced to its type; an unknown field is a
    ConfigError naming it (``where.field``) and the closest known name. Other config sections
    (``serve:``) use it too, so every section fails the same way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        path = f"{where}.{k}" if where else k
        if k not in hints:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field {path!r}{hint}")
        kwargs[k] = _coerce(v, hints[k], path)
    return cls(**kwargs)


def critic_urls(value: str | list[str]) -> list[str]:
    """``critic.url`` as a list of replica addresses: a YAML list or a comma-separated string."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    urls = [str(u).strip().rstrip("/") for u in parts if str(u).strip()]
    if not urls:
        raise ConfigError("critic.url is empty; give one or more addresses like http://HOST:PORT, or unset it")
    for u in urls:
        scheme, _, rest = u.partition("://")
        if scheme not in ("http", "https") or not rest.split("/")[0]:
            raise ConfigError(f"critic.url entry {u!r} must look like http://HOST:PORT")
    return urls


def validate(cfg: Config) -> Config:
    from pop_nemo.selfplay.roles import TASKS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.task in TASKS, f"task={cfg.task!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    need(
        cfg.rollout.n >= 2,
        f"rollout.n={cfg.rollout.n}: a group needs at least 2 answers for a baseline; set rollout.n>=2",
    )
    need(cfg.rollout.docs_per_step >= 1, "rollout.docs_per_step must be >= 1")
    need(cfg.rollout.max_batch >= 1, "rollout.max_batch must be >= 1")
    need(cfg.rollout.proposer_retries >= 1, "rollout.proposer_retries must be >= 1 (1 = no retry)")
    for role in ("proposer", "solver", "rubric", "judge"):
        s: RoleSampling = getattr(cfg.rollout, role)
        need(s.temperature >= 0, f"rollout.{role}.temperature must be >= 0 (0 = greedy)")
        need(0 < s.top_p <= 1, f"rollout.{role}.top_p must be in (0, 1]")
        need(s.max_new_tokens >= 1, f"rollout.{role}.max_new_tokens must be >= 1")
    need(cfg.trainer.max_steps >= 1, "trainer.max_steps must be >= 1")
    need(cfg.trainer.save_every >= 1, "trainer.save_every must be >= 1")
    need(cfg.policy.micro_batch_size >= 1, "policy.micro_batch_size must be >= 1")
    need(cfg.policy.lr >= 0, "policy.lr must be >= 0 (0 = no update: a control run)")
    need(len(cfg.policy.betas) == 2, "policy.betas must be two numbers, e.g. [0.9, 0.999]")
    need(0 <= cfg.algo.clip_eps < 1, "algo.clip_eps must be in [0, 1)")
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef must be >= 0")
    need(1 <= cfg.rollout.guide.max_criteria <= 5, "rollout.guide.max_criteria must be in 1..5")
    need(
        cfg.rollout.judge.parsing != "paper" or not cfg.rollout.guide.enabled,
        "rollout.judge.parsing=paper needs tagged outputs, and guided decoding emits bare JSON: "
        "set rollout.guide.enabled=false",
    )
    need(cfg.corpus.min_words >= 0 and cfg.corpus.max_words >= 1, "corpus.min_words >= 0 and corpus.max_words >= 1")
    if cfg.rollout.backend == "openai":
        need(bool(cfg.rollout.openai.url), "rollout.backend=openai needs rollout.openai.url (e.g. http://host:8000/v1)")
    if cfg.critic.url is not None:
        critic_urls(cfg.critic.url)
    t = cfg.rollout.trtllm
    need(t.tensor_parallel_size >= 1, "rollout.trtllm.tensor_parallel_size must be >= 1")
    need(0 < t.kv_cache_fraction < 1, "rollout.trtllm.kv_cache_fraction must be in (0, 1)")
    need(t.refit_bucket_mb >= 1, "rollout.trtllm.refit_bucket_mb must be >= 1")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return validate(build_section(Config, data, ""))
