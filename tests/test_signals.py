"""Stop on SIGUSR1 at a step boundary (pop_nemo.signals), as real processes receiving real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from pop_nemo import signals
from tests.conftest import ROOT

# A stand-in for the training loop's step boundary, written as the loop uses the module.
LOOP = r"""
import os, sys, time
from pop_nemo import signals
rank = int(os.environ.get("RANK", "0"))
if os.environ.get("WORLD_SIZE", "1") != "1":
    import torch.distributed as dist
    dist.init_process_group("gloo")
stop = signals.install()
print("ready", flush=True)
steps = int(sys.argv[1])
for step in range(steps):
    time.sleep(0.3)
    if stop.poll():
        print(f"checkpoint {step + 1}", flush=True)
    stop.exit_if_stopped(step + 1, final=step + 1 == steps)
print("done", flush=True)
"""


def _start(steps: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LOOP, str(steps)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_ready(p: subprocess.Popen) -> None:
    """Read up to the loop's "ready" (torch 2.9's gloo prints its own connection line first)."""
    assert p.stdout is not None
    seen = []
    while (line := p.stdout.readline()) and line.strip() != "ready":
        seen.append(line)
    assert line.strip() == "ready", "".join(seen)


def test_usr1_checkpoints_after_the_current_step_and_exits_75():
    p = _start(1000)
    _wait_ready(p)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == signals.EXIT_REQUEUE
    assert sum(line.startswith("checkpoint ") for line in out.splitlines()) == 1
    assert "stopping after step" in out and "SIGUSR1" in out
    assert "done" not in out


def test_a_signal_in_the_final_step_just_finishes():
    p = _start(1)
    _wait_ready(p)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "checkpoint 1" in out and "done" in out


def test_ranks_agree_to_stop_after_the_same_step(tmp_path):
    """Only rank 1 is signalled; both ranks checkpoint the same step and exit 75 (no rank is
    left waiting in a collective of a step the other never runs)."""
    from pop_nemo.distributed import free_port

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [_start(1000, {**env, "RANK": str(r)}) for r in range(2)]
    for p in procs:
        _wait_ready(p)
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [signals.EXIT_REQUEUE] * 2, outs
    steps = [[line for line in o.splitlines() if line.startswith("checkpoint")] for o in outs]
    assert len(steps[0]) == 1 and steps[0] == steps[1], outs
    assert "SIGUSR1" in outs[1] and "another rank" in outs[0]


def test_install_off_the_main_thread_is_inert():
    got = []
    t = threading.Thread(target=lambda: got.append(signals.install()))
    t.start()
    t.join()
    assert not got[0].poll()
