"""Megatron's checkpoint writer starts a multiprocessing Manager; nothing of it may outlive its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT
from tests.megatron.launching import megatron_installed

SCRIPT = textwrap.dedent(
    """
    import os, sys

    def main():
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from pop_nemo.policies.megatron import stop_checkpoint_writer
        from tests.processes import live_descendants

        filesystem_async.get_write_results_queue()  # what the first torch_dist save does
        print(" ".join(map(str, live_descendants(os.getpid()))), flush=True)
        if sys.argv[1] == "stop":
            stop_checkpoint_writer()
        os._exit(0)  # as the test worker ends: no atexit hooks

    if __name__ == "__main__":
        main()
    """
)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children_after_exit(tmp_path, mode: str) -> list[int]:
    script = tmp_path / f"writer_{mode}.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Files, not pipes: a Manager left running holds the pipes open, and reading them would hang.
    stdout, stderr = tmp_path / f"{mode}.out", tmp_path / f"{mode}.err"
    with open(stdout, "w") as o, open(stderr, "w") as e:
        code = subprocess.run([sys.executable, str(script), mode], stdout=o, stderr=e, timeout=300, env=env).returncode
    assert code == 0, stderr.read_text()[-2000:]
    children = [int(p) for p in stdout.read_text().split()]
    assert children, "the writer's results queue started no process"
    time.sleep(2)
    return [p for p in children if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(not megatron_installed(), reason="megatron-core not installed (scripts/install.sh installs it)")
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_stop_checkpoint_writer_leaves_no_manager_process(tmp_path):
    # Without it, the Manager outlives a process that ends with os._exit (what the test worker did).
    orphans = _children_after_exit(tmp_path, "keep")
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert orphans
    assert _children_after_exit(tmp_path, "stop") == []
