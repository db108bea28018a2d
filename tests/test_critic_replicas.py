"""Critic replicas (``critic.url`` a list): the config forms, spreading by outstanding work,
fail-over when a replica dies, the /healthz probe that puts it back, and a real `pop-nemo train`
against two `pop-nemo serve-critic` processes with one SIGKILLed mid-run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pop_nemo.config import ConfigError, critic_urls, load_config
from pop_nemo.critic.base import JudgeItem
from pop_nemo.critic.client import CriticClient
from pop_nemo.critic.local import LocalCritic
from pop_nemo.critic.server import CriticService, ServeConfig, ServerThread
from pop_nemo.engines.base import Sampling
from pop_nemo.engines.hf import HFEngine
from pop_nemo.selfplay.rubric import Criterion
from tests.conftest import ROOT, TINY
from tests.test_critic_loop import CriticProcess, free_port, lines, wait_for

RUBRIC = [Criterion("Correct vitamin", "Vitamin D", "Names vitamin D", 2.0)]
PROBLEM = "Which vitamin does sunlight help the skin make?"


# ---- config: one line naming critic.url, before any model loads


def test_critic_url_takes_one_address_a_list_or_a_comma_separated_string():
    assert critic_urls("http://a:1") == ["http://a:1"]
    assert critic_urls("http://a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    assert critic_urls(["http://a:1", "https://b:2"]) == ["http://a:1", "https://b:2"]
    cfg = load_config(TINY, ["critic.url=[http://127.0.0.1:1, http://127.0.0.1:2]"])
    assert cfg.critic.url == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert load_config(TINY, ["critic.url=http://h:1,http://h:2"]).critic.url == "http://h:1,http://h:2"


@pytest.mark.parametrize(
    ("value", "says"),
    [("[]", "critic.url is empty"), ("' , '", "critic.url is empty"), ("[http://a:1, 'ftp://b:2']", "'ftp://b:2'")],
)
def test_bad_critic_urls_are_one_line_errors_naming_the_field(value, says):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"critic.url={value}"])
    msg = str(e.value)
    assert "critic.url" in msg and says in msg and "\n" not in msg


# ---- the client against two real in-process servers


@pytest.fixture(scope="module")
def serve(hf_model, tokenizer):
    """Start a real critic server on its own thread (each with its own engine over the shared model)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)

    def start(port: int = 0) -> ServerThread:
        engine = HFEngine(hf_model, tokenizer, max_batch=8)
        # Unguided 4-token judge: fast; whether it parses does not matter, only who answered.
        critic = LocalCritic(engine, engine, Sampling(0.0, 1.0, 4), Sampling(0.0, 1.0, 4), writing=False, limits=None)
        st = ServerThread(CriticService(load=lambda: critic, cfg=ServeConfig()), port=port)
        st.wait_ready()
        return st

    yield start
    torch.set_num_threads(before)


def items(n: int) -> list[JudgeItem]:
    return [JudgeItem(f"q:{k}", PROBLEM, RUBRIC, f"Vitamin D, answer {k}.", seed=k) for k in range(n)]


@pytest.mark.slow
def test_items_spread_over_replicas_and_a_dead_one_costs_no_item_then_comes_back(serve):
    said: list[str] = []
    a, b = serve(), serve()
    port_b = b.port
    kw = dict(timeout_s=300, batch_items=1, probe_interval_s=0.1, log=said.append)
    with CriticClient([a.url, b.url], **kw) as client:
        # 1. Both up: one item per request, each to the replica with less outstanding work.
        got = client.judge(items(6))
        assert [j.id for j in got] == [f"q:{k}" for k in range(6)] and all(not j.timed_out and j.raw for j in got)
        m = client.step_metrics()
        assert m["critic_replicas_up"] == 2
        assert m["critic_items_r0"] > 0 and m["critic_items_r1"] > 0, (m, said)
        assert m["critic_items_r0"] + m["critic_items_r1"] == 6
        assert m["critic_failures_r0"] == m["critic_failures_r1"] == 0
        assert m["critic_latency_s_r0"] > 0 and m["critic_latency_s_r1"] > 0

        # 2. B stops: its requests fail over to A; no item is lost or timed out.
        b.stop()
        got = client.judge(items(4))
        assert all(not j.timed_out and j.raw for j in got), [j.error for j in got]
        m = client.step_metrics()
        assert m["critic_items_r0"] == 4 and m["critic_items_r1"] == 0 and m["critic_replicas_up"] == 1
        assert m["critic_failures_r1"] >= 1 and m["critic_latency_s_r1"] is None
        assert any(f"critic server {b.url} unreachable" in s and "taken out of rotation" in s for s in said)

        # 3. B is back on its port: the /healthz probe puts it back in rotation, and it gets work again.
        b2 = serve(port_b)
        try:
            wait_for(lambda: client.core.replicas_up() == 2, "the probe to put B back")
            assert any(f"critic server {b.url} reachable again" in s for s in said)
            client.judge(items(4))
            assert client.step_metrics()["critic_items_r1"] > 0
        finally:
            b2.stop()
    a.stop()


# ---- the online loop against two real serve-critic processes, one killed mid-run


@pytest.mark.slow
def test_train_on_two_replicas_survives_one_killed_mid_run(tmp_path, model_path):
    servers = [CriticProcess(free_port(), tmp_path / f"critic{k}.log") for k in range(2)]
    trainer = None
    try:
        for s in servers:
            wait_for(s.ready, f"critic {s.url}", proc=s.proc)
        out, log = tmp_path / "run", tmp_path / "train.log"
        cmd = [sys.executable, "-m", "pop_nemo.cli", "train", "--config", str(TINY), "--output-dir", str(out)]
        cmd += [f"critic.url={servers[0].url},{servers[1].url}", "critic.timeout_s=300"]
        cmd += ["trainer.max_steps=2", "trainer.save_every=2", "trainer.num_threads=1"]
        with open(log, "wb") as f:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            trainer = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        # Kill whichever replica is first caught working on step 1 (SIGKILL: its requests drop mid-flight).
        wait_for(
            lambda: any(s.metric("pop_critic_engine_busy") == 1 for s in servers), "a replica at work", proc=trainer
        )
        victim = next((s for s in servers if s.metric("pop_critic_engine_busy") == 1), servers[0])
        k_dead = servers.index(victim)
        survivor = servers[1 - k_dead]
        victim.kill()
        assert trainer.wait(1200) == 0, log.read_text()
        first, second = lines(out / "metrics.jsonl")
        text = " ".join(log.read_text().split())
        assert f"critic server {victim.url} unreachable" in text
        # No sample lost or masked: the request in flight on the dead replica was redone on the survivor.
        for m in (first, second):
            assert m["rubric_valid_rate"] == 1.0 and m["judge_valid_rate"] == 1.0 and m["judge_timeouts"] == 0, m
            assert m["num_train_samples"] == m["num_samples"] == 2 and m["loss"] is not None, m
        assert first[f"critic_failures_r{k_dead}"] >= 1
        assert second["critic_replicas_up"] == 1
        assert second[f"critic_items_r{k_dead}"] == 0 and second[f"critic_items_r{1 - k_dead}"] > 0
        rec1, rec2 = lines(out / "records.jsonl")
        for rec in (rec1, rec2):
            assert rec["rubric_valid"] and all(a["judge_valid"] for a in rec["answers"]), rec
        # The survivor finished the run: step 2's rubric and judgements all came from it.
        assert survivor.metric("pop_critic_items_total", kind="rubric", outcome="valid") >= 1
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait(60)
        for s in servers:
            s.stop()
