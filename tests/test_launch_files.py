"""The launch files a cluster user runs without us: the Dockerfile (hadolint) and the Slurm
scripts (shellcheck, and the settings a het job with requeue depends on)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "containers" / "Dockerfile"
SCRIPTS = [ROOT / "slurm" / "pop_7b.sh", ROOT / "slurm" / "pop_smoke.sh"]
WRAPPERS = [ROOT / "slurm" / "pop_32b.sh"]  # pop_7b.sh with other sizes


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed: it comes with the [test] extra (scripts/install.sh)")
    return found


def test_dockerfile_passes_hadolint():
    p = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_is_pinned_and_ends_with_doctor():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt-llm/release:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", base), base
    # megatron-core/-bridge and the rest are pinned in containers/image-pins.txt: tests/test_image_pins.py
    last = [line for line in text.splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last.startswith("RUN pop-nemo doctor")


def test_slurm_scripts_pass_shellcheck():
    p = subprocess.run(
        [
            _tool("shellcheck"),
            "-x",
            "-P",
            "slurm",
            *[str(s.relative_to(ROOT)) for s in SCRIPTS + WRAPPERS],
            "slurm/lib.sh",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_are_requeueable_het_jobs(script):
    text = script.read_text()
    directives = re.findall(r"^#SBATCH\s+(.+)$", text, re.M)
    assert directives.count("hetjob") == 1  # exactly two groups: critic, trainer
    for needed in ("--requeue", "--open-mode=append"):
        assert needed in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    assert "--het-group=0" in text and "--het-group=1" in text
    assert "pop_wait_healthy" in text and "trap pop_on_usr1 USR1" in text
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", WRAPPERS, ids=lambda p: p.name)
def test_size_wrappers_are_requeueable_het_jobs_that_run_pop_7b(script):
    text = script.read_text()
    directives = re.findall(r"^#SBATCH\s+(.+)$", text, re.M)
    assert directives.count("hetjob") == 1
    for needed in ("--requeue", "--open-mode=append"):
        assert needed in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    assert text.rstrip().endswith('exec bash "$POP_ROOT/slurm/pop_7b.sh"')
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
