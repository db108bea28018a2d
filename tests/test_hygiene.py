"""The suite's end-of-session check: a test that leaves a child process running fails the run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.processes import command_line

LEAKY = """
import subprocess

def test_forgets_its_child():
    subprocess.Popen(["sleep", "300"])

def test_waits_for_its_child():
    subprocess.run(["true"], check=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_left_child_process_fails_the_session_and_is_stopped(tmp_path, workers):
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            *workers,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, out.stdout[-2000:]
    assert "2 passed" in out.stdout
    assert "tests left child processes running (now killed):" in out.stdout
    leaked = [int(line.split()[1].rstrip(":")) for line in out.stdout.splitlines() if line.startswith("  pid ")]
    assert leaked and all("sleep 300" in line for line in out.stdout.splitlines() if line.startswith("  pid "))
    assert all(command_line(pid) in ("?", "") for pid in leaked)  # killed: gone, or a zombie with no command line
