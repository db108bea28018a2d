"""Typed configuration: YAML files with ``defaults:`` inheritance and dotted CLI overrides.

Every error names the field and the fix, and is raised before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
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
class GuideConfig:
    enabled: bool = True
    problem_chars: int = 400
    reference_chars: int = 400
    name_chars: int = 48
    gold_chars: int = 120
    description_chars: int = 240
    thoughts_chars: int = 160


@dataclass
class RolesConfig:
    """Who plays each untrained role: the current 'policy' or the frozen 'reference'."""

    proposer: Literal["policy", "reference"] = "reference"
    rubric: Literal["policy", "reference"] = "reference"
    judge: Literal["policy", "reference"] = "reference"


@dataclass
class RolloutConfig:
    backend: Literal["hf", "trtllm", "openai"] = "hf"
    docs_per_step: int = 2
    n: int = 4  # solver samples per problem (the group size)
    proposer_retries: int = 5
    solver_resample: int = 0  # extra solver calls while <= n//4 answers are valid (paper: 5 offline)
    max_batch: int = 16
    proposer: RoleSampling = field(default_factory=lambda: RoleSampling(1.0, 1.0, 512))
    solver: RoleSampling = field(default_factory=lambda: RoleSampling(1.0, 1.0, 256))
    rubric: RoleSampling = field(default_factory=lambda: RoleSampling(0.0, 1.0, 768))
    judge: RoleSampling = field(default_factory=lambda: RoleSampling(0.0, 1.0, 512))
    guide: GuideConfig = field(default_factory=GuideConfig)


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
    url: str | None = None  # set: judge (and rubric) calls go to `pop-nemo serve-critic`
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
    """``pop-nemo synthesize`` and ``pop-nemo pairs`` (the paper's recipe)."""

    num_documents: int = 8
    best_of_n: int = 32
    std_threshold: float = 0.001
    max_length_diff_words: int = 100
    shuffle_seed: int = 42


@dataclass
class DPOConfig:
    """``pop-nemo dpo`` (paper: β 0.01, lr 1e-6 cosine, warmup 0.1, 1 epoch, batch 16)."""

    beta: float = 0.01
    lr: float = 1e-6
    warmup_ratio: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    micro_batch_size: int = 1
    max_length: int = 6144
    max_prompt_length: int = 1024
    eval_fraction: float = 0.04
    seed: int = 42


@dataclass
class EvalConfig:
    """Held-out evaluation (``pop-nemo eval`` and every ``every_steps`` in the online loop)."""

    every_steps: int = 0  # 0 = never during training


@dataclass
class MegatronConfig:
    """``policy.backend=megatron``: parallel layout."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


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

    def training_hash(self) -> str:
        """Hash of what must not change across a resume (model, task, algorithm, data, seed)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("task", "seed", "model", "corpus", "roles", "algo")}
        keep["rollout"] = {k: d["rollout"][k] for k in ("n", "docs_per_step")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


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
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, where: str) -> Any:
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
    need(cfg.policy.lr > 0, "policy.lr must be > 0")
    need(len(cfg.policy.betas) == 2, "policy.betas must be two numbers, e.g. [0.9, 0.999]")
    need(0 <= cfg.algo.clip_eps < 1, "algo.clip_eps must be in [0, 1)")
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef must be >= 0")
    need(cfg.corpus.min_words >= 0 and cfg.corpus.max_words >= 1, "corpus.min_words >= 0 and corpus.max_words >= 1")
    if cfg.rollout.backend != "hf" and cfg.policy.backend == "hf":
        pass  # an HF policy can feed any engine through export_hf
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return validate(_build(Config, data, ""))
