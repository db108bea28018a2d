"""The critic server on loopback with the real SmolLM2: scoring, rubrics, batching, limits,
deadlines, a full queue, metrics, OpenAPI and the bearer token.

One in-process server (``ServerThread``) over the session's engine serves the module; model
calls are few and short (tests/conf/tiny.yaml's guide limits). The engine thread is "held" in
some tests by giving it other work, which is exactly what a busy engine looks like to requests.
"""

from __future__ import annotations

import copy
import re
import threading
import time

import httpx
import pytest

from pop_nemo import build
from pop_nemo.config import load_config
from pop_nemo.critic.base import JudgeItem
from pop_nemo.critic.client import CriticClient
from pop_nemo.critic.local import LocalCritic, score_evaluation
from pop_nemo.critic.server import CriticService, ServeConfig, ServerThread, load_serve_config
from pop_nemo.selfplay import roles
from pop_nemo.selfplay.rubric import Criterion
from tests.conftest import TINY, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROBLEM = "Which vitamin does the skin make when it is exposed to sunlight?"
RUBRIC = [
    {"name": "Correct vitamin", "gold": "Vitamin D", "description": "Names vitamin D", "weight": 3},
    {"name": "Mechanism", "gold": "UVB light", "description": "Says UVB light drives it", "weight": 1},
]
ANSWERS = {"good": "Vitamin D: UVB light on the skin starts its synthesis.", "bad": "Iron, from sunlight."}
DOCUMENT = (
    "Vitamin D is made in the skin when ultraviolet B light from the sun reaches it. The body then "
    "converts it in the liver and kidneys to its active form, which helps the gut absorb calcium. "
    "People who rarely go outside, or who cover their skin, can become deficient."
)


def score_body(ids=("good", "bad")) -> dict:
    return {
        "items": [{"id": i, "problem": PROBLEM, "rubric": copy.deepcopy(RUBRIC), "answer": ANSWERS[i]} for i in ids]
    }


def judge_items(ids=("good", "bad")) -> list[JudgeItem]:
    crit = [Criterion(**c) for c in RUBRIC]
    return [JudgeItem(i, PROBLEM, crit, ANSWERS[i]) for i in ids]


@pytest.fixture(scope="module")
def tiny_critic(engine) -> LocalCritic:
    cfg = load_config(TINY)
    return LocalCritic(
        engine,
        engine,
        build.sampling(cfg.rollout.rubric),
        build.sampling(cfg.rollout.judge),
        writing=False,
        limits=build.guide_limits(cfg),
    )


@pytest.fixture(scope="module")
def server(tiny_critic):
    cfg = ServeConfig(max_batch=2, max_wait_ms=20, max_queue=2, item_timeout_s=300, max_body_mb=1)
    svc = CriticService(load=lambda: tiny_critic, cfg=cfg, info={"model": "smollm2", "task": "health_care"})
    with ServerThread(svc) as st:
        st.wait_ready()
        yield st


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=600) as c:
        yield c


class HeldEngine:
    """Occupy the server's engine thread until released (a long batch, as far as requests can tell)."""

    def __init__(self, service: CriticService):
        self.release_event = threading.Event()
        self.started = threading.Event()

        def work():
            self.started.set()
            self.release_event.wait(300)

        self.future = service.executor.submit(work)
        assert self.started.wait(60)

    def release(self):
        self.release_event.set()
        self.future.result(60)


def wait_for(cond, what: str, timeout_s: float = 120.0):
    """Poll a condition (never a timing assertion: the bound only keeps a broken build from hanging)."""
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def scored(http):
    r = http.post("/v1/score", json=score_body())
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_score_real_answers_with_the_shared_scoring(scored):
    assert [o["id"] for o in scored] == ["good", "bad"]
    names = {c["name"] for c in RUBRIC}
    for item, o in zip(judge_items(), scored):
        assert o["valid"] is True and o["error"] is None and o["timed_out"] is False
        assert 0.0 <= o["score"] <= 2.0
        assert o["reward"] == pytest.approx(o["score"] / 2)
        # The judge is guided: it rates every criterion of this rubric, by its exact name.
        assert {r["name"] for r in o["ratings"]} == names
        # The served score is the shared scoring of the judge's own output, nothing else.
        local = score_evaluation(item, o["raw"])
        assert local.valid and local.score == o["score"]
        assert [r.to_dict() for r in local.ratings] == o["ratings"]


def test_rubric_endpoint_writes_a_valid_rubric(http):
    body = {
        "id": "g1",
        "document": DOCUMENT,
        "problem": PROBLEM,
        "reference": "Vitamin D",
        "answers": list(ANSWERS.values()),
    }
    r = http.post("/v1/rubric", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "g1" and out["valid"] is True and out["error"] is None
    assert 1 <= len(out["rubric"]) <= 2  # tiny.yaml: guide.max_criteria=2
    assert all(c["weight"] > 0 and c["name"] for c in out["rubric"])
    assert [c.to_dict() for c in roles.parse_rubric(out["raw"])] == out["rubric"]


def test_client_is_a_critic_with_the_same_results(server, scored):
    with CriticClient(server.url, timeout_s=300, startup_timeout_s=30) as client:
        got = client.judge(judge_items())
        # Same two items in one request → the same engine batch → the same greedy output.
        assert [(j.id, j.valid, j.score, j.reward, j.raw) for j in got] == [
            (o["id"], o["valid"], o["score"], o["reward"], o["raw"]) for o in scored
        ]
        assert [[r.to_dict() for r in j.ratings] for j in got] == [o["ratings"] for o in scored]
        assert client.stats.retries == 0 and client.stats.failed_items == 0
        assert client.judge([]) == []


def test_deadline_times_out_items_instead_of_waiting(server, http):
    before = metric(http.get("/metrics").text, "pop_critic_timeouts_total", kind="judge")
    held = HeldEngine(server.service)
    try:
        r = http.post("/v1/score", json=score_body(), headers={"X-Pop-Timeout-S": "0.3"})
    finally:
        held.release()
    assert r.status_code == 200, r.text
    for o in r.json()["items"]:
        assert o["valid"] is False and o["timed_out"] is True
        assert "deadline" in o["error"] and "before the engine reached it" in o["error"]
    text = http.get("/metrics").text
    assert metric(text, "pop_critic_timeouts_total", kind="judge") == before + 2
    assert http.get("/healthz").json()["queue_depth"] == 0


def test_full_queue_answers_503_and_the_client_backs_off(server, http):
    svc = server.service
    held = HeldEngine(svc)
    try:
        # A batch is taken for the (busy) engine; its request stops waiting, the batch stays in line.
        r = http.post("/v1/score", json=score_body(["good"]), headers={"X-Pop-Timeout-S": "3"})
        assert r.json()["items"][0]["timed_out"] is True
        assert metric(http.get("/metrics").text, "pop_critic_engine_busy") == 1
        # Two more items fill the queue (max_queue=2) behind it...
        filler: dict = {}
        t = threading.Thread(
            target=lambda: filler.update(r=http.post("/v1/score", json=score_body(), headers={"X-Pop-Timeout-S": "10"}))
        )
        t.start()
        wait_for(lambda: svc.queue_depth() == 2, "the queue to fill")
        # ...so the next request is refused at once, with a hint when to come back.
        r = http.post("/v1/score", json=score_body(["good"]))
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert "queue full" in r.json()["detail"]
        with CriticClient(server.url, timeout_s=600, startup_timeout_s=30) as client:
            fut = client.judge_async(judge_items(["bad"]))
            wait_for(lambda: client.stats.status_503 >= 1, "the client to meet a 503")
            # The filler gives up at its deadline and leaves the queue; the client, backing off by
            # Retry-After, gets in and waits for the engine.
            t.join(300)
            assert [o["timed_out"] for o in filler["r"].json()["items"]] == [True, True]
            assert not fut.done()
            held.release()
            (j,) = fut.result(600)
            assert client.stats.retries >= 1
    finally:
        held.release_event.set()
    assert j.valid and j.id == "bad" and not j.timed_out
    assert metric(http.get("/metrics").text, "pop_critic_rejected_total", reason="queue_full") >= 2


def test_metrics_are_prometheus_text(server, http, scored):
    text = http.get("/metrics").text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert metric(text, "pop_critic_items_total", kind="judge", outcome="valid") >= 2
    assert metric(text, "pop_critic_requests_total", code="200", endpoint="/v1/score") >= 1
    assert metric(text, "pop_critic_ready") == 1
    # Histograms: cumulative buckets ending in +Inf == _count.
    buckets = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('pop_critic_batch_size_bucket{kind="judge"')
    ]
    assert buckets == sorted(buckets) and buckets[-1] == metric(text, "pop_critic_batch_size_count", kind="judge")
    assert buckets[-1] >= 1


def test_openapi_schema_and_health(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/score", "/v1/rubric", "/healthz", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for name in ("ScoreRequest", "ScoreItemIn", "CriterionIn", "RubricRequest"):
        assert schemas[name]["additionalProperties"] is False, name
    weight = schemas["CriterionIn"]["properties"]["weight"]
    assert weight["exclusiveMinimum"] == 0
    h = http.get("/healthz").json()
    assert h["status"] == "ready" and h["model"] == "smollm2" and h["max_batch"] == 2


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda b: b["items"][0].update(surprise=1), "surprise"),
        (lambda b: b["items"][0]["rubric"][0].update(weight=-1), "weight"),
        (lambda b: b["items"][0]["rubric"][0].update(weight=0), "weight"),
        (lambda b: b["items"][0].update(rubric=RUBRIC * 3), "rubric"),
        (lambda b: b["items"][0].update(answer="x" * 70_000), "answer"),
        (lambda b: b["items"][0]["rubric"][0].update(name="   "), "name"),
        (lambda b: b["items"][0].pop("problem"), "problem"),
        (lambda b: b.update(items=[]), "items"),
    ],
)
def test_bad_requests_get_readable_422(http, mutate, where):
    body = score_body()
    mutate(body)
    r = http.post("/v1/score", json=body)
    assert r.status_code == 422, r.text
    assert where in r.json()["error"]


def test_body_limit_and_unknown_routes(http):
    r = http.post(
        "/v1/score", content=b"{" + b" " * (1024 * 1024 + 10) + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/score").status_code == 405


def test_bearer_token_is_checked_on_every_request(tiny_critic):
    svc = CriticService(load=lambda: tiny_critic, cfg=ServeConfig())
    with ServerThread(svc, token="s3cret") as st, httpx.Client(base_url=st.url, timeout=60) as c:
        st.wait_ready()
        for path in ("/healthz", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/score", json=score_body())
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert "token" in r.json()["detail"]


def test_public_bind_requires_a_token():
    # Refused before any model loads; the message names the variable to set.
    proc = run_cli(
        "serve-critic",
        "--config",
        "conf/critic_cpu.yaml",
        "--host",
        "0.0.0.0",
        check=False,
        timeout=120,
        env={"POP_NEMO_CRITIC_TOKEN": ""},
    )
    assert proc.returncode == 2
    assert "POP_NEMO_CRITIC_TOKEN" in proc.stderr
    with pytest.raises(ValueError, match="POP_NEMO_CRITIC_TOKEN"):
        ServerThread(CriticService(load=lambda: None), host="0.0.0.0")


def test_serve_config_sections():
    cfg, s = load_serve_config("conf/critic_cpu.yaml", ["serve.max_batch=3", "rollout.judge.max_new_tokens=64"])
    assert (s.host, s.max_batch, cfg.rollout.judge.max_new_tokens) == ("127.0.0.1", 3, 64)
    _, s7 = load_serve_config("conf/critic_7b.yaml")
    assert s7.host == "0.0.0.0" and s7.max_queue >= 2048
    with pytest.raises(ValueError, match="serve.max_queue"):
        load_serve_config("conf/critic_cpu.yaml", ["serve.max_queue=1", "serve.max_batch=4"])
    with pytest.raises(ValueError, match="serve.nope"):
        load_serve_config("conf/critic_cpu.yaml", ["serve.nope=1"])


def test_loading_server_is_not_ready(tiny_critic):
    gate = threading.Event()

    def slow_load():
        gate.wait(120)
        return tiny_critic

    svc = CriticService(load=slow_load, cfg=ServeConfig())
    with ServerThread(svc) as st, httpx.Client(base_url=st.url, timeout=60) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["Retry-After"]
        r = c.post("/v1/score", json=score_body())
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        gate.set()
        st.wait_ready()
        assert c.get("/healthz").json()["status"] == "ready"


def test_serve_engine_admits_only_engines_the_server_can_run():
    """``serve.engine`` lists what the critic server builds; ``openai`` was admitted, then always rejected."""
    import typing

    from pop_nemo.config import ConfigError
    from pop_nemo.critic.server import ServeConfig, load_serve_config

    assert typing.get_args(typing.get_type_hints(ServeConfig)["engine"]) == ("hf", "trtllm")
    with pytest.raises(ConfigError, match=r"serve.engine='openai' is not allowed; use one of 'hf', 'trtllm'"):
        load_serve_config(None, ["serve.engine=openai"])
