"""The serving module both HTTP servers share: the bind rule, bearer auth, body limits and the
dynamic batcher (batching by key, per-item deadlines, errors, shutdown). No model: the batcher
runs plain functions on its engine thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from pop_nemo import serving
from pop_nemo.config import ConfigError
from pop_nemo.serving import Batcher, QueueFull, ServeLimits, Stopped


@pytest.mark.parametrize(
    "host,loopback",
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False)]
    + [("10.1.2.3", False), ("::", False), ("critic.example", False)],
)
def test_only_loopback_binds_without_a_token(host, loopback):
    assert serving.is_loopback(host) is loopback
    serving.check_bind(host, "tok", "SOME_TOKEN")  # a token makes any address fine
    if loopback:
        serving.check_bind(host, None, "SOME_TOKEN")
    else:
        with pytest.raises(ConfigError, match=r"set a bearer token in \$SOME_TOKEN"):
            serving.check_bind(host, None, "SOME_TOKEN")


def test_the_token_comes_from_the_argument_else_the_variable(monkeypatch):
    monkeypatch.setenv("SOME_TOKEN", "from-env")
    assert serving.token_from_env("given", "SOME_TOKEN") == "given"
    assert serving.token_from_env(None, "SOME_TOKEN") == "from-env"
    monkeypatch.setenv("SOME_TOKEN", "")
    assert serving.token_from_env(None, "SOME_TOKEN") is None


def test_bearer_check():
    assert serving.bearer_ok("Bearer s3cret", "s3cret")
    assert serving.bearer_ok("bearer  s3cret ", "s3cret")
    assert not serving.bearer_ok("Bearer s3cre", "s3cret")
    assert not serving.bearer_ok("Basic s3cret", "s3cret")
    assert not serving.bearer_ok("", "s3cret")


def test_limits_are_checked_by_name():
    serving.check_limits(ServeLimits(), "serve")
    with pytest.raises(ConfigError, match=r"^serve\.max_queue must be >= serve\.max_batch$"):
        serving.check_limits(ServeLimits(max_batch=8, max_queue=4), "serve")
    with pytest.raises(ConfigError, match=r"^serve\.port=70000 must be in 0\.\.65535$"):
        serving.check_limits(ServeLimits(port=70000), "serve")


def guarded_app(token: str | None, max_body: int, auth_prefix: str = "/") -> tuple[TestClient, CollectorRegistry]:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    registry = CollectorRegistry()
    metrics = serving.RequestMetrics("t", registry)
    app.add_middleware(
        serving.Guard,
        token=token,
        max_body=max_body,
        metrics=metrics,
        known_paths=("/healthz", "/v1/echo"),
        auth_prefix=auth_prefix,
        error_body=lambda status, msg: {"error": {"message": msg, "status": status}},
    )
    return TestClient(app), registry


def test_guard_asks_for_the_token_under_its_prefix_only():
    c, registry = guarded_app("s3cret", 1000, auth_prefix="/v1/")
    assert c.get("/healthz").status_code == 200
    r = c.post("/v1/echo", content=b"abc")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json() == {"error": {"message": "missing or wrong bearer token", "status": 401}}
    r = c.post("/v1/echo", content=b"abc", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"n": 3}
    text = generate_latest(registry).decode()
    assert 't_requests_total{code="401",endpoint="/v1/echo"} 1.0' in text
    assert 't_requests_total{code="200",endpoint="/healthz"} 1.0' in text


def test_guard_limits_the_body_declared_or_streamed():
    c, _ = guarded_app(None, 10)
    assert c.post("/v1/echo", content=b"x" * 10).json() == {"n": 10}
    r = c.post("/v1/echo", content=b"x" * 11)
    assert r.status_code == 413 and "exceeds the limit of 10" in r.json()["error"]["message"]
    assert c.post("/v1/echo", content=iter([b"x" * 6, b"x" * 6])).status_code == 413  # chunked: no length
    r = c.post("/v1/echo", content=b"\xff\xfe")
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"]
    assert c.post("/other").status_code == 404  # not a known path: counted as "other", answered by the app


# ---------------------------------------------------------------- the batcher


class Engine:
    """A run function that records each batch and can be held (a long generation)."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, live: list[serving.Item]) -> list[str]:
        self.release.wait(30)
        payloads = [w.payload for w in live]
        self.batches.append(payloads)
        if self.fail_on in payloads:
            raise RuntimeError(f"cannot do {self.fail_on}")
        return [p.upper() for p in payloads]


def hold(b: Batcher) -> threading.Event:
    """Occupy the engine thread until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def work():
        started.set()
        release.wait(30)

    b.executor.submit(work)
    assert started.wait(30)
    return release


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def queued_behind_held_engine(engine: Engine, max_batch: int, requests: list[tuple[str, list[str]]]):
    """Queue every request while the engine thread is busy, then let it go."""
    b = Batcher(engine, max_batch=max_batch, max_wait_ms=0, max_queue=64)
    await b.start()
    try:
        release = hold(b)
        waits = [asyncio.create_task(b.submit(k, ps, 30)) for k, ps in requests]
        await asyncio.sleep(0.05)
        release.set()
        done = await asyncio.gather(*waits)
    finally:
        await b.stop()
    return [[w.future.result() for w in items] for items in done]


def test_items_of_one_key_share_a_batch_of_at_most_max_batch():
    engine = Engine()
    got = run(queued_behind_held_engine(engine, 3, [("a", ["a1", "a2"]), ("b", ["b1"]), ("a", ["a3", "a4"])]))
    assert engine.batches == [["a1", "a2", "a3"], ["b1"], ["a4"]]
    assert got == [["A1", "A2"], ["B1"], ["A3", "A4"]]


def test_the_batcher_waits_max_wait_ms_for_a_fuller_batch():
    engine = Engine()

    async def main():
        b = Batcher(engine, max_batch=2, max_wait_ms=60_000, max_queue=8)
        await b.start()
        try:
            first = asyncio.create_task(b.submit("a", ["a1"], 30))
            await asyncio.sleep(0.1)
            second = await b.submit("a", ["a2"], 30)
            return [w.future.result() for w in (await first) + second]
        finally:
            await b.stop()

    assert run(main()) == ["A1", "A2"]
    assert engine.batches == [["a1", "a2"]]


def test_an_item_past_its_deadline_is_never_started():
    engine = Engine()

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_ms=0, max_queue=8)
        await b.start()
        try:
            release = hold(b)
            (late,) = await b.submit("a", ["late"], 0.1)
            assert late.future.cancelled() and late.abandoned and not late.started
            assert b.depth() == 0  # its caller took it off the queue
            release.set()
            (ok,) = await b.submit("a", ["ok"], 30)
            return ok.future.result()
        finally:
            await b.stop()

    assert run(main()) == "OK"
    assert engine.batches == [["ok"]]


def test_an_item_whose_deadline_passes_while_it_runs_says_so():
    engine = Engine()
    engine.release.clear()

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_ms=0, max_queue=8)
        await b.start()
        try:
            (item,) = await b.submit("a", ["slow"], 0.2)
            engine.release.set()
            return item
        finally:
            await b.stop()

    item = run(main())
    assert item.future.cancelled() and item.started


def test_a_failing_batch_fails_its_items_and_the_batcher_goes_on():
    engine = Engine(fail_on="bad")

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_ms=0, max_queue=8)
        await b.start()
        try:
            failed = await b.submit("a", ["ok", "bad"], 30)
            (after,) = await b.submit("a", ["next"], 30)
            return [str(w.future.exception()) for w in failed], after.future.result()
        finally:
            await b.stop()

    assert run(main()) == (["cannot do bad", "cannot do bad"], "NEXT")


def test_a_full_queue_refuses_and_stop_fails_what_waits():
    engine = Engine()

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_ms=60_000, max_queue=4)
        await b.start()
        waiting = asyncio.create_task(b.submit("a", ["a1", "a2", "a3"], 30))
        await asyncio.sleep(0.05)
        assert b.depth() == 3
        with pytest.raises(QueueFull, match=r"queue full \(3 of 4 items waiting\)"):
            await b.submit("a", ["a4", "a5"], 30)
        await b.stop()
        return [type(w.future.exception()) for w in await waiting]

    assert run(main()) == [Stopped, Stopped, Stopped]
    assert engine.batches == []


def test_the_openai_server_uses_the_shared_guard_and_metrics():
    """Its error shape for 401/413, auth only under /v1/, and /metrics: no model needed (the
    load fails, so the app stays up with state 'failed')."""
    from pop_nemo.engines.openai_server import OpenAIService, ServeOpenAIConfig, create_app

    def no_model():
        raise FileNotFoundError("no model here")

    service = OpenAIService(load=no_model, cfg=ServeOpenAIConfig(max_body_mb=0.001))
    with TestClient(create_app(service, token="s3cret")) as c:
        r = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": []})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer s3cret"}
        r = c.post("/v1/chat/completions", content=b"x" * 2000, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(200):  # the failed load lands on the engine thread
            if service.state == "failed":
                break
            time.sleep(0.05)
        r = c.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["message"] == "model is failed"
        text = c.get("/metrics").text  # open, like /healthz
        assert "pop_openai_ready 0.0" in text
        assert 'pop_openai_requests_total{code="413",endpoint="/v1/chat/completions"} 1.0' in text
