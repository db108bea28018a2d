"""Launching tests/megatron/worker.py under torchrun, with a hard timeout.

Two launches run side by side: 2 ranks (gloo) for the TP=2, PP=2 and DP=2 layouts, and 1 rank
for the TP=1 trajectory that TP=2 must reproduce. Each has a hard timeout; on CPU the CUDA
shim's audit is on (POP_SHIM_AUDIT=1) so the self-test sees every torch.cuda name megatron read.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pop_nemo.launch import torchrun_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "worker.py"
TIMEOUT_S = 480


def megatron_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("megatron.core", "megatron.bridge", "triton"))


def start_worker(nproc: int, layouts: str, work: Path, tiny: Path, smol: str | None, audit: bool):
    work.mkdir(parents=True, exist_ok=True)
    out = work / "result.json"
    args = [str(WORKER), "--out", str(out), "--work", str(work), "--tiny", str(tiny), "--layouts", layouts]
    cmd = torchrun_command(nproc, args)
    if smol:
        cmd += ["--smol", smol]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if audit:
        env["POP_SHIM_AUDIT"] = "1"
    log = open(work / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, out, work / "log.txt"


def finish_worker(proc, out: Path, log: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the torchrun process group we started
        proc.wait()
        pytest.fail(f"megatron worker timed out after {timeout:.0f}s; log tail:\n{log.read_text()[-3000:]}")
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"megatron worker failed ({proc.returncode}); log tail:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())
