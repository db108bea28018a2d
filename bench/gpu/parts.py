"""The GPU acceptance kit's parts: what each runs on the GPU and in the CPU rehearsal, and its
time budget. Standard library only (the kit starts before the carried wheels are installed)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Part:
    name: str
    what: str  # one line for the summary
    budget: tuple[int, int]  # seconds: (GPU, CPU rehearsal)
    argv: dict[str, list[str]]  # per mode ('gpu', 'cpu'); {work}, {wheels}, {template} are filled in
    result: str | None = None  # the JSON file it writes, relative to the work folder


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# conf/offline/tiny_cpu.yaml's lengths and grammar bounds (every guided output fits): random weights
# write until the limit, and the Megatron path's engines may generate on the CPU.
SHORT = (
    "rollout.proposer.max_new_tokens=120 rollout.solver.max_new_tokens=32 rollout.rubric.max_new_tokens=150 "
    "rollout.judge.max_new_tokens=100 rollout.guide.problem_chars=50 rollout.guide.reference_chars=30 "
    "rollout.guide.name_chars=16 rollout.guide.gold_chars=16 rollout.guide.description_chars=30 "
    "rollout.guide.thoughts_chars=16 rollout.guide.max_criteria=1 corpus.max_words=60"
).split()


def _online(backend: str, gpu_overrides: list[str]) -> dict[str, list[str]]:
    base = ["bench/gpu/online.py", "--backend", backend, "--out", f"{{work}}/online_{backend}"]
    base += ["--json", f"{{work}}/online_{backend}.json"]
    return {
        "gpu": _py(*base, "--expect", "cuda", *SHORT, *gpu_overrides),
        "cpu": _py(*base, "--expect", "cpu", *SHORT),
    }


def _train_step(preset: str) -> dict[str, list[str]]:
    out = ["--out", f"{{work}}/train_step_{preset}.json"]
    gpu = ["--preset", preset, "--bf16", "--batch", "8", "--seq", "1024", "--micro-batch", "4", "--steps", "3"]
    cpu = ["--preset", "small", "--batch", "2", "--seq", "32", "--micro-batch", "2", "--steps", "1", "--threads", "1"]
    return {
        "gpu": _py("bench/train_step.py", *gpu, "--warmup", "1", *out),
        "cpu": _py("bench/train_step.py", *cpu, *out),
    }


PYTEST = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{work}/pytest_gpu.xml"]
ENV = (
    "import json, torch, transformers, importlib.metadata as md\n"
    "v = {n: md.version(n) for n in ('torch', 'transformers', 'accelerate', 'megatron-core', 'megatron-bridge', "
    "'xgrammar', 'pydantic')}\n"
    "v['cuda'] = torch.version.cuda\n"
    "v['device'] = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'\n"
    "v['python'] = __import__('sys').version.split()[0]\n"
    "json.dump(v, open('{work}/env.json', 'w')); print(json.dumps(v))\n"
)
CRITIC = ["bench/critic_load.py", "--config", "tests/conf/tiny.yaml", "--json", "{work}/critic_load.json"]
CRITIC += ["--log-dir", "{work}", "--min-per-client", "1"]
SYNTH = ["bench/synthesis.py", "--config", "conf/offline/tiny_cpu.yaml", "--json", "{work}/synthesis.json"]
PIPE = "bench/pipeline.py --config tests/conf/tiny.yaml --docs 2 --n 2 --json {work}/pipeline.json".split()

PARTS = [
    Part(
        "wheels",
        "the carried wheels installed into a target folder (--no-deps, no index)",
        (90, 120),
        {m: _py("-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", "{work}/site", "{wheels}") for m in ("gpu", "cpu")},
    ),
    Part("env", "versions it ran with", (60, 60), {m: _py("-c", ENV) for m in ("gpu", "cpu")}, "env.json"),
    Part(
        "models",
        "random-weight SmolLM2 (real shape on GPU, tiny on CPU) with the real tokenizer",
        (60, 60),
        {
            m: _py("bench/gpu/models.py", "--template", "{template}", "--shape", s, "--cache", "{work}/cache")
            for m, s in (("gpu", "smollm2-135m"), ("cpu", "tiny"))
        },
    ),
    Part("pytest_gpu", "pytest -m gpu (all of them)", (120, 180), {m: _py(*PYTEST) for m in ("gpu", "cpu")}),
    Part(
        "online_hf",
        "2 online steps, HF policy + HF engines; devices and outputs contract",
        (60, 120),
        _online("hf", ["model.dtype=bfloat16"]),
        "online_hf.json",
    ),
    Part(
        "online_megatron",
        "2 online steps, policy.backend=megatron (TP=1, 1 rank, no TE); devices and contract",
        (80, 180),
        _online("megatron", ["model.dtype=bfloat16", "megatron.bf16=true"]),
        "online_megatron.json",
    ),
    Part(
        "pipeline",
        "self-play stage vs raw engine",
        (45, 120),
        {
            "gpu": _py(*PIPE, "--repeats", "2", "--device", "cuda", "--threads", "8", "model.dtype=bfloat16"),
            "cpu": _py(*PIPE, "--repeats", "1", "--threads", "1"),
        },
        "pipeline.json",
    ),
    Part(
        "critic_load",
        "critic server, batched vs max_batch=1, 1/8/64 clients",
        (100, 150),
        {
            "gpu": _py(*CRITIC, "--device", "cuda", "--clients", "1", "8", "64", "--items", "8", "model.dtype=bfloat16"),
            "cpu": _py(*CRITIC, "--device", "cpu", "--clients", "1", "2", "--items", "2", "--num-threads", "1"),
        },
        "critic_load.json",
    ),
    Part(
        "synthesis",
        "offline synthesis, batched vs sequential",
        (120, 150),
        {
            "gpu": _py(*SYNTH, "--docs", "16", "--n", "8", "--max-batch", "64", "--threads", "8", "model.dtype=bfloat16"),
            "cpu": _py(*SYNTH, "--docs", "2", "--n", "2", "--max-batch", "4", "--threads", "1"),
        },
        "synthesis.json",
    ),
    Part("train_step_0.5b", "train step Megatron vs HF, Qwen2.5-0.5B shape", (60, 90), _train_step("qwen2-0.5b"), "train_step_qwen2-0.5b.json"),
    Part("train_step_1.5b", "train step Megatron vs HF, Qwen2.5-1.5B shape", (120, 90), _train_step("qwen2-1.5b"), "train_step_qwen2-1.5b.json"),
]  # fmt: skip


def command(part: Part, mode: str, subs: dict[str, str]) -> list[str]:
    """The part's argv with the placeholders filled in ({wheels}: every carried wheel)."""
    argv = []
    for a in part.argv[mode]:
        if a == "{wheels}":
            argv += sorted(str(p) for p in Path(subs["wheels"]).glob("*.whl"))
        else:
            for k, v in subs.items():
                a = a.replace("{" + k + "}", v)
            argv.append(a)
    return argv
