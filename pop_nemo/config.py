"""Typed configuration: YAML files with ``defaults:`` inheritance and dotted CLI overrides.

The sections are pydantic models (strict types, unknown keys forbidden, bounds as ``Field``
constraints, cross-field checks as validators). Every failure becomes one ``ConfigError`` line that
names the dotted field, the bad value and the fix (``_config_error``), raised before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator


class ConfigError(ValueError):
    pass


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _is_float(annotation: Any) -> bool:
    """``float`` or ``float | None`` (not ``list[float]``)."""
    if annotation is float:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and float in typing.get_args(annotation)


def _exp_floats(annotations: dict[str, Any], data: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; a float field takes it as the number it is."""
    if not isinstance(data, dict):
        return data
    return {
        k: float(v) if isinstance(v, str) and _is_float(annotations.get(k)) and _EXP_FLOAT.fullmatch(v.strip()) else v
        for k, v in data.items()
    }


class Section(BaseModel):
    """A config section: exact types (no ``"3"`` for an int, no ``1`` for a bool), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_exp_floats(cls, data: Any) -> Any:
        return _exp_floats({k: f.annotation for k, f in cls.model_fields.items()}, data)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _two_answers_at_least(section: str, why: str) -> Any:
    """The validator of a section's group size ``n`` (a group of one has no spread to learn from)."""

    def check(cls: type, n: int) -> int:
        _need(n >= 2, f"{section}.n={n}: {why}; set {section}.n>=2")
        return n

    return field_validator("n")(classmethod(check))


class ModelConfig(Section):
    path: str = "smollm2"  # 'smollm2' (bundled), an HF folder, or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class CorpusConfig(Section):
    source: str = "mini"  # 'mini' (bundled), a local .jsonl/.parquet/.txt file or folder, or an HF dataset id
    text_field: str = "text"
    id_field: str | None = "id"
    split: str = "train"
    name: str | None = None  # HF dataset config name
    domains: list[str] | None = None  # filter of the mini corpus: health, books, web
    min_words: int = Field(50, ge=0)
    max_words: int = Field(1024, ge=1)
    max_documents: int | None = None


class RoleSampling(Section):
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)


class JudgeSampling(RoleSampling):
    """The judge's sampling, how it is asked, and which parsing rules score its output."""

    # rubric: all criteria in one call (the paper). per_criterion: one short call per criterion.
    mode: Literal["rubric", "per_criterion"] = "rubric"
    # pop_nemo or paper: rubric/evaluation parsing rules (DESIGN §6 lists the differences)
    parsing: Literal["pop_nemo", "paper"] = "pop_nemo"


class GuideConfig(Section):
    """Guided decoding on/off and the character bounds of guided fields; the bounds become a
    ``selfplay.roles.GuideLimits`` (``GuideLimits.from_section``), so each is declared here only."""

    enabled: bool = True
    problem_chars: int = Field(400, ge=1)
    reference_chars: int = Field(400, ge=1)
    name_chars: int = Field(48, ge=1)
    gold_chars: int = Field(120, ge=1)
    description_chars: int = Field(240, ge=1)
    thoughts_chars: int = Field(160, ge=1)
    max_criteria: int = Field(5, ge=1, le=5, description="the paper's rubric size is at most 5")


class RolesConfig(Section):
    """Who plays each untrained role: the current 'policy' or the frozen 'reference'."""

    proposer: Literal["policy", "reference"] = "reference"
    rubric: Literal["policy", "reference"] = "reference"
    judge: Literal["policy", "reference"] = "reference"


class TRTLLMConfig(Section):
    """``rollout.backend=trtllm``: TensorRT-LLM LLM API engines (GPU; see pop_nemo.engines.trtllm)."""

    tensor_parallel_size: int = Field(1, ge=1)
    dtype: str = "auto"
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    # of free GPU memory, per engine (policy and reference each have one)
    kv_cache_fraction: float = Field(0.4, gt=0, lt=1)
    enable_sleep: bool = True  # release the KV cache while the colocated trainer runs
    sleep_tags: list[str] = Field(default_factory=lambda: ["kv_cache"])
    refit: Literal["auto", "ipc", "reload"] = "auto"  # auto: CUDA IPC, else reload an exported folder
    orchestrator: Literal["ray", "mpi"] = "ray"  # ray: the worker extension that refits in place
    refit_bucket_mb: int = Field(1024, ge=1)
    json_guides: Literal["ebnf", "json"] = "ebnf"  # ebnf: the HF engine's exact JSON grammar


class OpenAIRolloutConfig(Section):
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


class RolloutConfig(Section):
    backend: Literal["hf", "trtllm", "openai"] = "hf"
    docs_per_step: int = Field(2, ge=1)
    n: int = 4  # solver samples per problem (the group size)
    proposer_retries: int = Field(5, ge=1, description="1 = no retry")
    solver_resample: int = 0  # extra solver calls while <= n//4 answers are valid (paper: 5 offline)
    max_batch: int = Field(16, ge=1)
    proposer: RoleSampling = Field(default_factory=lambda: RoleSampling(max_new_tokens=840))
    solver: RoleSampling = Field(default_factory=lambda: RoleSampling(max_new_tokens=1024))
    rubric: RoleSampling = Field(default_factory=lambda: RoleSampling(temperature=0.0, max_new_tokens=2450))
    judge: JudgeSampling = Field(default_factory=lambda: JudgeSampling(temperature=0.0, max_new_tokens=1350))
    guide: GuideConfig = Field(default_factory=GuideConfig)
    trtllm: TRTLLMConfig = Field(default_factory=TRTLLMConfig)
    openai: OpenAIRolloutConfig = Field(default_factory=OpenAIRolloutConfig)

    _group = _two_answers_at_least("rollout", "a group needs at least 2 answers for a baseline")

    @model_validator(mode="after")
    def _consistent(self) -> RolloutConfig:
        _need(
            self.judge.parsing != "paper" or not self.guide.enabled,
            "rollout.judge.parsing=paper needs tagged outputs, and guided decoding emits bare JSON: "
            "set rollout.guide.enabled=false",
        )
        if self.backend == "openai":
            _need(bool(self.openai.url), "rollout.backend=openai needs rollout.openai.url (e.g. http://host:8000/v1)")
        return self


class AlgoConfig(Section):
    advantage: Literal["grpo", "rloo"] = "grpo"
    normalize_std: bool = True
    eps: float = 1e-6
    degenerate_std: float = 1e-3
    format_reward: float = 0.0
    # True: a reply with no <answer> block is judged whole (tiny models); format validity is still reported.
    answer_fallback: bool = False
    clip_eps: float = Field(0.2, ge=0, lt=1)
    kl_coef: float = Field(0.01, ge=0)
    kl_mode: Literal["k3_loss", "reward_shaping", "none"] = "k3_loss"
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"


class PolicyConfig(Section):
    backend: Literal["hf", "megatron"] = "hf"
    lr: float = Field(1e-6, ge=0, description="0 = no update: a control run")
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    micro_batch_size: int = Field(4, ge=1)
    bf16_autocast: bool = False
    gradient_checkpointing: bool = False

    @field_validator("betas")
    @classmethod
    def _two(cls, betas: list[float]) -> list[float]:
        _need(len(betas) == 2, f"policy.betas={betas} must be two numbers, e.g. [0.9, 0.999]")
        return betas


class TrainerConfig(Section):
    max_steps: int = Field(2, ge=1)
    save_every: int = Field(1, ge=1)
    keep_checkpoints: int = 2
    num_threads: int | None = None  # torch CPU threads; None = torch default


class CriticConfig(Section):
    # set: judge (and rubric) calls go to `pop-nemo serve-critic`; a list (or "url1,url2") = replicas
    url: str | list[str] | None = None
    timeout_s: float = 120.0
    startup_timeout_s: float = 300.0

    @field_validator("url")
    @classmethod
    def _urls(cls, url: str | list[str] | None) -> str | list[str] | None:
        if url is not None:
            critic_urls(url)
        return url


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True


# ---- sections owned by later features (offline recipe, evaluation, Megatron backend) ----


SELFPLAY_ROLES = ("proposer", "solver", "rubric", "judge")


class TeacherConfig(Section):
    """Roles played through an OpenAI-compatible endpoint (a teacher model such as
    gpt-4o-mini, or the policy itself served by vLLM / trtllm-serve)."""

    url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str = "gpt-4o-mini-2024-07-18"
    roles: list[str] = Field(default_factory=list)  # any of: proposer, solver, rubric, judge
    api_key_env: str | None = "OPENAI_API_KEY"  # read from the environment; never stored
    # How guides travel: 'json_schema' (OpenAI response_format; EBNF/regex guides are not
    # sent), 'trtllm' (response_format json/ebnf/regex), 'vllm' (guided_json/guided_grammar/
    # guided_regex), 'none'.
    guide_format: Literal["json_schema", "trtllm", "vllm", "none"] = "json_schema"
    timeout_s: float = 600.0
    max_concurrency: int = Field(16, ge=1)
    max_retries: int = 5

    @model_validator(mode="after")
    def _roles(self) -> TeacherConfig:
        bad = sorted(set(self.roles) - set(SELFPLAY_ROLES))
        _need(not bad, f"offline.teacher.roles has unknown roles {bad}; use any of {', '.join(SELFPLAY_ROLES)}")
        _need(
            not self.roles or bool(self.url),
            f"offline.teacher.roles={self.roles} needs offline.teacher.url (an OpenAI-compatible /v1 endpoint)",
        )
        return self


class OfflineConfig(Section):
    """``pop-nemo synthesize`` and ``pop-nemo pairs`` (the paper's recipe, DESIGN §2).

    Synthesis samples with ``rollout.{proposer,solver,rubric,judge}`` (temperatures, token
    limits), ``rollout.guide`` and ``rollout.max_batch``; the group size and retry counts below
    are the paper's and replace ``rollout.n`` / ``rollout.solver_resample`` for synthesis. The
    pairs settings become an ``rl.pairs.PairFilter`` (``PairFilter.from_config``).
    """

    # synthesize
    num_documents: int = Field(8, ge=1)  # one problem per document, in the corpus' deterministic order
    chunk_size: int = Field(64, ge=1)  # documents per batched self-play call and per committed append
    n: int = 32  # solver samples per problem (paper: 32)
    # proposer attempts until problem and reference parse (paper: 5)
    proposer_retries: int = Field(5, ge=1, description="1 = no retry")
    solver_resample: int = Field(5, ge=0)  # extra solver calls while <= n//4 answers are valid (paper: 5)
    # Ablations (paper flags): proposer_knowledge=false is --use_knowledge 0 (the proposer, and so the
    # rubric writer, get "None" for the document); rubric_knowledge=false is --no_know_in_rubric (the
    # rubric writer gets "None" for the document and the reference answer).
    proposer_knowledge: bool = True
    rubric_knowledge: bool = True
    # pointwise: rubric score per answer in [0, 2] (the paper's runs). median_anchor: each answer against
    # the median-length answer, both orders, score = mean(r_i - r_anchor) in [-10, 10]. pairwise: round
    # robin, both orders, score = win rate in [0, 1].
    scoring: Literal["pointwise", "median_anchor", "pairwise"] = "pointwise"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    # pairs
    best_of_n: int = Field(32, ge=2)
    std_threshold: float = Field(0.001, ge=0)
    max_length_diff_words: int = Field(100, ge=0)
    # 'space' = str.split(" ") (the paper's code, the default); 'whitespace' = str.split()
    length_words: Literal["whitespace", "space"] = "space"
    shuffle_seed: int = 42
    max_pairs: int = Field(100000, ge=1)

    _group = _two_answers_at_least("offline", "pairs need at least 2 answers per problem")


class DPOConfig(Section):
    """``pop-nemo dpo`` (paper: sigmoid loss, β 0.01, lr 1e-6 cosine, warmup 0.1, 1 epoch, batch 16,
    max length 6144 / prompt 1024, 4% held out). Optimizer settings (betas, weight decay, grad norm,
    autocast, checkpointing) and the backend come from ``policy``."""

    beta: float = Field(0.01, gt=0)
    lr: float = Field(1e-6, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # cosine decays to lr * min_lr_ratio (transformers' schedule: 0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = 16  # pairs per optimizer step (effective batch)
    micro_batch_size: int = Field(1, ge=1)  # pairs per forward/backward (gradient accumulation)
    eval_batch_size: int = Field(2, ge=1)
    max_length: int = 6144  # prompt + completion tokens
    max_prompt_length: int = 1024  # the prompt keeps its last tokens
    eval_fraction: float = Field(0.04, ge=0, lt=1)  # held out, evaluated at the end (datasets' train_test_split)
    seed: int = 42
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = Field(2, ge=1)
    # stop early after this many optimizer steps (resume continues)
    max_steps: int | None = Field(None, ge=1, description="or null")
    export: bool = True  # write DIR/final_model (an HF folder: model + tokenizer) at the end

    @model_validator(mode="after")
    def _sizes(self) -> DPOConfig:
        _need(
            self.batch_size >= self.micro_batch_size and self.batch_size % self.micro_batch_size == 0,
            f"dpo.batch_size={self.batch_size} must be a multiple of dpo.micro_batch_size={self.micro_batch_size}",
        )
        _need(
            1 <= self.max_prompt_length < self.max_length,
            f"dpo.max_prompt_length={self.max_prompt_length} must be >= 1 and below dpo.max_length={self.max_length}",
        )
        return self


class EvalConfig(Section):
    """Held-out evaluation (``pop-nemo eval`` and every ``every_steps`` in the online loop).

    Problems and rubrics are written once by the reference model (``model.path``) and cached
    under ``cache_dir``, keyed by a hash of that model and of every setting that shapes them.
    """

    every_steps: int = Field(0, ge=0, description="0 = never during training")
    # Held-out split: a document is held out when hash(split_salt, doc id) < heldout_fraction.
    # Training (online and offline) never samples these documents.
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    split_salt: str = "pop-nemo-heldout"
    # held-out documents evaluated (0 = skip the held-out self-play eval)
    num_documents: int = Field(32, ge=0)
    # reference-model answers shown to the rubric writer
    rubric_answers: int = Field(4, ge=1, description="the rubric writer needs an answer")
    # None = rollout.rubric.max_new_tokens / rollout.judge.max_new_tokens
    rubric_max_new_tokens: int | None = Field(None, ge=1, description="or null")
    judge_max_new_tokens: int | None = Field(None, ge=1, description="or null")
    greedy: bool = True  # one greedy answer per problem
    samples: int = Field(4, ge=0)  # sampled answers per problem (0 = none)
    temperature: float = Field(1.0, gt=0, description="greedy answers come from eval.greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    # evaluated answers; None = rollout.solver.max_new_tokens
    max_new_tokens: int | None = Field(None, ge=1, description="or null")
    seed: int = 0
    bootstrap: int = Field(1000, ge=100, description="resamples for confidence intervals")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="e.g. 0.95")
    cache_dir: str | None = None  # None = $POP_NEMO_CACHE/eval (default ~/.cache/pop_nemo/eval)
    # Rubric benchmark in HealthBench format: a JSONL path, 'example' (the bundled tiny file), or null.
    healthbench: str | None = None
    healthbench_limit: int | None = Field(None, ge=1)  # first N conversations
    healthbench_max_new_tokens: int = Field(512, ge=1)  # the evaluated model's reply
    grader_max_new_tokens: int = Field(256, ge=1)
    grader_explanation_chars: int = Field(300, ge=1)
    # HealthBench grader: an HF folder or hub id (None = model.path, the reference), or, with
    # judge_url, the model name served by an OpenAI-compatible endpoint (trtllm-serve, vLLM).
    judge_model: str | None = None
    judge_url: str | None = None  # e.g. http://judge-host:8000/v1
    judge_api_key_env: str | None = None  # environment variable holding the endpoint's API key
    judge_guide_format: Literal["json_schema", "trtllm", "vllm", "none"] = "json_schema"

    @field_validator("healthbench")
    @classmethod
    def _healthbench_file(cls, path: str | None) -> str | None:
        _need(
            path in (None, "example") or Path(path).expanduser().is_file(),
            f"eval.healthbench={path!r} is not a file (or use 'example')",
        )
        return path

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvalConfig:
        _need(self.greedy or self.samples > 0, "eval.greedy=false and eval.samples=0 leave nothing to evaluate")
        return self


class MegatronConfig(Section):
    """``policy.backend=megatron``: parallel layout and precision (docs/MEMORY.md has the sizing).

    Data parallelism is what is left: ``world_size / (TP × PP)``. ``policy.*`` (lr, schedule,
    clip, micro_batch_size) applies as for the HF policy.
    """

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    bf16: bool = False  # bf16 weights and activations, fp32 master weights/grads in the optimizer
    sequence_parallel: bool = False  # needs TP > 1 and Transformer Engine (GPU)
    use_distributed_optimizer: bool | None = None  # shard Adam state over DP; None = on with CUDA
    activation_recompute: bool = False  # full recompute of each layer in backward
    reference: bool = True  # keep a frozen reference GPTModel (needed unless algo.kl_mode=none)

    @model_validator(mode="after")
    def _sequence_parallel(self) -> MegatronConfig:
        _need(
            not self.sequence_parallel or self.tensor_model_parallel_size >= 2,
            "megatron.sequence_parallel needs megatron.tensor_model_parallel_size >= 2",
        )
        return self


class Config(Section):
    task: str = "health_care"
    seed: int = 1234
    output_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    roles: RolesConfig = Field(default_factory=RolesConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    megatron: MegatronConfig = Field(default_factory=MegatronConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# ---------------------------------------------------------------- pydantic errors → one ConfigError line


def _fields(owner: Any) -> dict[str, Any]:
    """name → FieldInfo of a section model (nothing for a leaf)."""
    return owner.model_fields if isinstance(owner, type) and issubclass(owner, BaseModel) else {}


def _section_type(annotation: Any) -> Any:
    """The section class a field holds (``X`` or ``X | None``), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _walk(cls: type, loc: tuple) -> tuple[list[str], Any, Any]:
    """pydantic's ``loc`` as dotted parts (list items as ``[i]``, union member tags dropped), the section
    class the last part belongs to, and the last field's FieldInfo."""
    parts: list[str] = []
    owner: Any = cls
    info = None
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif item in _fields(owner):
            parts.append(item)
            info = _fields(owner)[item]
            owner = _section_type(info.annotation)
    return parts, owner, info


_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(info: Any) -> str:
    """A field's numeric constraints in words: ``>= 1``, ``< 1``, ``in (0, 1]``."""
    b = {k: getattr(m, k) for m in getattr(info, "metadata", []) for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    lo = next(((k, b[k]) for k in ("gt", "ge") if k in b), None)
    hi = next(((k, b[k]) for k in ("lt", "le") if k in b), None)
    if lo and hi:
        return f"in {'(' if lo[0] == 'gt' else '['}{lo[1]}, {hi[1]}{')' if hi[0] == 'lt' else ']'}"
    k, v = lo or hi
    return f"{_OPS[k]} {v}"


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "model": "a mapping",
    "dict": "a mapping",
}


def _config_error(cls: type, err: ValidationError, where: str) -> ConfigError:
    """The first of pydantic's errors as one line: dotted field, bad value, the fix."""
    e = err.errors()[0]
    kind, loc, value = e["type"], e["loc"], e.get("input")
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return ConfigError(str(cause))
    head = loc[:-1] if kind == "extra_forbidden" else loc
    parts, owner, info = _walk(cls, head)
    path = ".".join(p for p in (where, *parts) if p)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        names = list(_fields(owner))
        full = f"{path}.{key}" if path else key
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(names)}"
        return ConfigError(f"unknown config field {full!r}{hint}")
    if kind == "literal_error":
        allowed = e["ctx"]["expected"].replace(" or ", ", ")
        return ConfigError(f"{path}={value!r} is not allowed; use one of {allowed}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        fix = getattr(info, "description", None)
        return ConfigError(f"{path} must be {_bounds(info)}{f' ({fix})' if fix else ''}, got {value!r}")
    words = _TYPE_WORDS.get(kind.split("_")[0])
    if words and kind.endswith(("_type", "_parsing", "_from_float")):
        return ConfigError(f"{path or 'config'} must be {words}, got {value!r}")
    return ConfigError(f"{path or 'config'}: {e['msg']}, got {value!r}")


@functools.cache
def _dataclass_model(cls: type) -> type[Section]:
    """A section model with a plain dataclass' fields, so sections defined elsewhere (``serve:``)
    are checked and fail the same way."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (
            hints[f.name],
            Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING else f.default,
        )
        for f in dataclasses.fields(cls)
    }
    return create_model(cls.__name__, __base__=Section, **fields)


def build_section(cls: type, data: Any, where: str) -> Any:
    """A config section (a ``Section`` model or a plain dataclass) from a mapping; any failure is one
    ConfigError line naming ``where.field``, the value and the fix (an unknown key: the closest name)."""
    model = cls if issubclass(cls, BaseModel) else _dataclass_model(cls)
    try:
        section = model.model_validate(data)
    except ValidationError as e:
        raise _config_error(model, e, where) from None
    return section if model is cls else cls(**dict(section))


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


# The paper's tasks; ``selfplay.roles.TASKS`` defines one Task per name (a test keeps the two equal).
TASK_NAMES = ("creative_writing", "health_care", "instruction_following")


def validate(cfg: Config) -> Config:
    """The task must be one that ``selfplay.roles`` defines (named here, so config imports nothing above it)."""
    _need(cfg.task in TASK_NAMES, f"task={cfg.task!r} is unknown; use one of {', '.join(TASK_NAMES)}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return validate(build_section(Config, data, ""))
