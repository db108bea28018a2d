"""The critic client: deadlines, retries for transient failures only, failures as masked items.

Against real servers on loopback: nothing listening, a socket that never answers, the real
critic server coming up late, and one whose (unguided, 2-token) judge output never parses.
"""

from __future__ import annotations

import socket
import time

import pytest

from pop_nemo.critic.base import JudgeItem, RubricItem
from pop_nemo.critic.client import CriticClient, CriticUnavailable
from pop_nemo.critic.local import LocalCritic
from pop_nemo.critic.schema import MAX_ANSWER
from pop_nemo.critic.server import CriticService, ServeConfig, ServerThread
from pop_nemo.engines.base import Sampling
from pop_nemo.selfplay.rubric import Criterion

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

RUBRIC = [Criterion("Correct vitamin", "Vitamin D", "Names vitamin D", 2.0)]
ITEMS = [JudgeItem("q:0", "Which vitamin does sunlight help the skin make?", RUBRIC, "Vitamin D.")]
RUBRIC_ITEMS = [RubricItem("q", "Sunlight makes vitamin D in the skin. " * 3, "Which vitamin?", "Vitamin D", ["D"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout_s: float = 120.0):
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_startup_wait_is_bounded_and_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CriticUnavailable) as e:
        CriticClient(url, startup_timeout_s=0.5)
    assert url in str(e.value) and "serve-critic" in str(e.value)


def test_unreachable_server_gives_masked_items_not_exceptions():
    url = f"http://127.0.0.1:{free_port()}"
    with CriticClient(url, timeout_s=1.0, wait_ready=False, log=lambda m: None) as client:
        (j,) = client.judge(ITEMS)
        (r,) = client.write_rubrics(RUBRIC_ITEMS)
        stats = client.stats
    assert j.id == "q:0" and j.valid is False and j.timed_out is True
    assert "ConnectError" in j.error and url in j.error
    assert r.id == "q" and r.valid is False and r.rubric is None and "ConnectError" in r.error
    assert stats.connect_errors >= 2 and stats.retries >= 1  # retried with backoff until the deadline


def test_a_server_that_never_answers_hits_the_deadline():
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # connections complete in the kernel; nothing ever reads or answers
    url = f"http://127.0.0.1:{hole.getsockname()[1]}"
    try:
        with CriticClient(url, timeout_s=1.5, wait_ready=False, log=lambda m: None) as client:
            items = [JudgeItem(f"q:{k}", ITEMS[0].problem, RUBRIC, f"answer {k}") for k in range(3)]
            fut = client.judge_async(items)
            got = fut.result(120)  # bounded by the 1.5 s deadline; the bound here only guards a hang
            assert [j.id for j in got] == ["q:0", "q:1", "q:2"]
            assert all(j.valid is False and j.timed_out is True for j in got)
            assert all("deadline" in j.error for j in got)
            assert client.stats.timeouts >= 1
    finally:
        hole.close()


def test_connect_errors_are_retried_until_the_server_is_up(engine):
    port = free_port()
    said: list[str] = []
    critic = LocalCritic(engine, engine, Sampling(0.0, 1.0, 8), Sampling(0.0, 1.0, 8), writing=False)
    with CriticClient(f"http://127.0.0.1:{port}", timeout_s=600, wait_ready=False, log=said.append) as client:
        fut = client.judge_async(ITEMS)
        wait_for(lambda: client.stats.connect_errors >= 2, "the client to retry a refused connection")
        assert not fut.done()
        with ServerThread(CriticService(load=lambda: critic, cfg=ServeConfig()), port=port):
            (j,) = fut.result(600)
    # The unguided 8-token judge rarely parses; what matters is that the server answered.
    assert j.timed_out is False and j.raw
    assert client.stats.retries >= 2
    assert any("unreachable" in m for m in said) and any("reachable again" in m for m in said)


@pytest.fixture(scope="module")
def unguided(engine):
    """A real server whose judge (no grammar, 2 new tokens) cannot produce a valid evaluation."""
    critic = LocalCritic(engine, engine, Sampling(0.0, 1.0, 2), Sampling(0.0, 1.0, 2), writing=False, limits=None)
    with ServerThread(CriticService(load=lambda: critic, cfg=ServeConfig())) as st:
        st.wait_ready()
        yield st


def test_a_parse_failure_is_final_and_not_retried(unguided):
    with CriticClient(unguided.url, timeout_s=600) as client:
        (j,) = client.judge(ITEMS)
        assert j.valid is False and j.timed_out is False
        assert "evaluation" in j.error  # the shared parser's reason
        assert client.stats.requests == 1 and client.stats.retries == 0


def test_a_4xx_is_final_and_its_reason_is_kept(unguided):
    too_long = [JudgeItem("q:9", ITEMS[0].problem, RUBRIC, "x" * (MAX_ANSWER + 1))]
    with CriticClient(unguided.url, timeout_s=600) as client:
        (j,) = client.judge(too_long)
        assert j.valid is False and j.timed_out is False
        assert "422" in j.error and "answer" in j.error
        assert client.stats.requests == 1 and client.stats.retries == 0


def test_the_client_sends_the_token_from_the_environment(engine, monkeypatch):
    critic = LocalCritic(engine, engine, Sampling(), Sampling(), writing=False)
    with ServerThread(CriticService(load=lambda: critic, cfg=ServeConfig()), token="tok-1") as st:
        st.wait_ready()
        monkeypatch.setenv("POP_NEMO_CRITIC_TOKEN", "tok-1")
        with CriticClient(st.url, startup_timeout_s=30) as client:
            assert client.server_info["status"] == "ready"
        monkeypatch.setenv("POP_NEMO_CRITIC_TOKEN", "wrong")
        with pytest.raises(CriticUnavailable, match="token"):
            CriticClient(st.url, startup_timeout_s=30)
