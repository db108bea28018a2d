"""Shared fixtures: the real bundled model (converted once per machine) and run helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "conf" / "tiny.yaml"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """A suite leaves no process behind: fail when a test's child process is still running at the
    end (after a grace period for ones that are exiting), name it, and stop it. Under xdist each
    worker checks its own children and hands what it found to the controller, which fails the run."""
    import signal
    import time

    from tests.processes import leftover

    deadline = time.monotonic() + 15
    while (left := leftover(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [f"  pid {pid}: {cmd[:200]}" for pid, cmd in left]
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its report and exit status do not reach the user
        workeroutput["leftover_processes"] = lines
        return
    lines += getattr(session.config, "_leftover_from_workers", [])
    if not lines:
        return
    message = "\n".join(["tests left child processes running (now killed):", *lines])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: collect what each worker's end-of-session check found."""
    found = getattr(node, "workeroutput", {}).get("leftover_processes", [])
    node.config._leftover_from_workers = [*getattr(node.config, "_leftover_from_workers", []), *found]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests, restored after: on a shared 2-core machine
    a second thread mostly spins."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_path() -> str:
    """SmolLM2-135M-Instruct as an HF folder (converted from the bundled GGUF on first use)."""
    from pop_nemo.models import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from pop_nemo.models import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    """A shared, never-trained copy: tests must not modify its weights."""
    from pop_nemo.models import load_causal_lm

    return load_causal_lm(model_path).eval()


@pytest.fixture(scope="session")
def engine(hf_model, tokenizer):
    from pop_nemo.engines.hf import HFEngine

    return HFEngine(hf_model, tokenizer, max_batch=8)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer, saved as an HF folder (trains in milliseconds on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class RecordingEngine:
    """An Engine proxy that keeps every request it passes on."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def generate(self, requests):
        self.requests.extend(requests)
        return self.inner.generate(requests)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def preference_pair(problem: str, good: str, bad: str) -> dict:
    """One row of ``pop-nemo pairs``' output."""
    return {
        "prompt": [{"role": "system", "content": "Answer inside <answer> tags."}, {"role": "user", "content": problem}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }


@pytest.fixture(scope="session")
def dpo_pairs(tmp_path_factory) -> Path:
    """12 pairs in ``pop-nemo pairs``' format."""
    import json

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        preference_pair(
            f"Question {i}: name a colour.", f"Blue, number {i}. <answer>blue</answer>", f"I do not know {i}."
        )
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(
    *args: str, timeout: float = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``pop-nemo`` as a user would (a real process), from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "pop_nemo.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pop-nemo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
