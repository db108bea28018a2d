"""The online loop with ``critic.url``: `pop-nemo train` against a real `pop-nemo serve-critic`
process on loopback, and the same run surviving the server's death and using it again once back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, TINY, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout_s: float = 600.0, proc: subprocess.Popen | None = None):
    """Poll (the bound only keeps a broken build from hanging the suite; it is not a timing assertion)."""
    end = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


class CriticProcess:
    """`pop-nemo serve-critic` with the tiny test config, as its own process."""

    def __init__(self, port: int, log: Path):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        cmd = [sys.executable, "-m", "pop_nemo.cli", "serve-critic", "--config", str(TINY), "--port", str(port)]
        cmd += ["serve.num_threads=1", "serve.max_wait_ms=5"]
        self.out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ})

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(self.url + path, timeout=10)
        except httpx.TransportError:
            return None

    def ready(self) -> bool:
        r = self.get("/healthz")
        return r is not None and r.status_code == 200

    def metric(self, name: str, **labels: str) -> float:
        r = self.get("/metrics")
        if r is None:
            return 0.0
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "") + " "
        for line in r.text.splitlines():
            if line.startswith(want):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no graceful shutdown, connections drop mid-request
            self.proc.wait(60)
        self.out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.out.close()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def critic_server(tmp_path_factory, model_path):
    # Not waited for: the trainer's own startup wait on /healthz is part of what is tested.
    srv = CriticProcess(free_port(), tmp_path_factory.mktemp("critic") / "server.log")
    yield srv
    srv.stop()


def test_train_with_critic_url_uses_the_server(critic_server, tmp_path):
    out = tmp_path / "run"
    run_cli(
        "train", "--config", str(TINY), "--output-dir", str(out),
        f"critic.url={critic_server.url}", "trainer.max_steps=1", "trainer.num_threads=1",
    )  # fmt: skip
    (m,) = lines(out / "metrics.jsonl")
    assert m["step"] == 1
    assert m["rubric_valid_rate"] == 1.0 and m["judge_valid_rate"] == 1.0 and m["judge_timeouts"] == 0
    assert m["num_train_samples"] == 2 and m["loss"] is not None
    (rec,) = lines(out / "records.jsonl")
    judged = [a for a in rec["answers"] if a["judge_valid"] is not None]
    assert judged and all(a["judge_valid"] and 0 <= a["reward"] <= 1 for a in judged)
    # The judging happened on the server, not in-process.
    assert critic_server.metric("pop_critic_items_total", kind="rubric", outcome="valid") == 1
    assert critic_server.metric("pop_critic_items_total", kind="judge", outcome="valid") == len(judged)


def test_server_killed_mid_run_masks_samples_then_is_used_again(critic_server, tmp_path):
    """Step 1: the server is SIGKILLed while it writes the rubric → that group is masked, the
    loop logs it and goes on. Step 2: a new server on the same port → valid judgements again."""
    wait_for(critic_server.ready, "the critic server")
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "pop_nemo.cli", "train", "--config", str(TINY), "--output-dir", str(out)]
    # A 30 s deadline per critic call: how long the run waits for a dead server before masking.
    cmd += [f"critic.url={critic_server.url}", "critic.timeout_s=30", "trainer.max_steps=2", "trainer.save_every=2"]
    cmd += ["trainer.num_threads=1"]  # on a shared 2-core machine a second intra-op thread mostly spins
    with open(log, "wb") as f:
        trainer = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    restarted = None
    try:
        rubric_before = critic_server.metric("pop_critic_batch_size_count", kind="rubric")
        busy = lambda: (  # noqa: E731
            critic_server.metric("pop_critic_engine_busy") == 1
            and critic_server.metric("pop_critic_batch_size_count", kind="rubric") > rubric_before
        )
        wait_for(busy, "step 1's rubric on the server", proc=trainer)
        critic_server.kill()
        wait_for(lambda: len(lines(out / "metrics.jsonl")) == 1, "step 1 to finish without the server", proc=trainer)
        # Hold the run between steps while the server comes back (a restart takes a model load).
        trainer.send_signal(signal.SIGSTOP)
        restarted = CriticProcess(critic_server.port, tmp_path / "server2.log")
        wait_for(restarted.ready, "the restarted critic server", proc=restarted.proc)
        trainer.send_signal(signal.SIGCONT)
        assert trainer.wait(900) == 0, log.read_text()
        first, second = lines(out / "metrics.jsonl")
        text = " ".join(log.read_text().split())  # the console wraps long lines
        # Step 1: the group's rubric never came back: masked, counted, logged.
        assert first["rubric_valid_rate"] == 0.0 and first["num_train_samples"] == 0
        rec1, rec2 = lines(out / "records.jsonl")
        assert critic_server.url in rec1["rubric_error"] and "deadline" in rec1["rubric_error"]
        assert f"critic server {critic_server.url} unreachable" in text
        assert "no trainable sample" in text
        # Step 2: the server again.
        assert second["rubric_valid_rate"] == 1.0 and second["judge_valid_rate"] == 1.0
        assert second["num_train_samples"] == 2 and second["loss"] is not None
        assert "reachable again" in text
        assert restarted.metric("pop_critic_items_total", kind="judge", outcome="valid") == 2
    finally:
        if trainer.poll() is None:
            trainer.send_signal(signal.SIGCONT)
            trainer.kill()
            trainer.wait(60)
        if restarted is not None:
            restarted.stop()
