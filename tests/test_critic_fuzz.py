"""Over 1,000 malformed or hostile requests against the real critic server (model loaded).

Wrong types, missing and unknown fields, huge strings, invalid UTF-8, broken JSON, negative
and non-finite weights, 10k criteria, bad headers, methods and paths. Every request must be
refused with a readable 4xx before it reaches the model (so this is fast): no 5xx, no engine
call, and the server still answers /healthz afterwards.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop_nemo.critic.local import LocalCritic
from pop_nemo.critic.schema import MAX_ANSWER, MAX_ITEMS, MAX_NAME
from pop_nemo.critic.server import CriticService, ServeConfig, ServerThread
from pop_nemo.engines.base import Sampling

pytestmark = pytest.mark.slow

CRITERION = {"name": "Correct vitamin", "gold": "Vitamin D", "description": "Names vitamin D", "weight": 2}
SCORE_ITEM = {"id": "q:0", "problem": "Which vitamin?", "rubric": [CRITERION], "answer": "Vitamin D.", "seed": 7}
SCORE = {"items": [SCORE_ITEM]}
RUBRIC_REQ = {
    "id": "q",
    "document": "Sunlight makes vitamin D.",
    "problem": "Which vitamin?",
    "reference": "D",
    "answers": ["D"],
}

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def settings_for(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def fuzz_server(engine):
    critic = LocalCritic(engine, engine, Sampling(0.0, 1.0, 8), Sampling(0.0, 1.0, 8), writing=False)
    cfg = ServeConfig(max_body_mb=1)  # large bodies are exercised up to and past this limit
    with ServerThread(CriticService(load=lambda: critic, cfg=cfg)) as srv:
        srv.wait_ready()
        yield srv


class Checker:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=120)
        self.count = 0
        self.statuses: dict[int, int] = {}

    def send(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None):
        hdrs = {"content-type": "application/json", **(headers or {})}
        r = self.client.request(method, path, content=content, headers=hdrs)
        self.count += 1
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        assert 400 <= r.status_code < 500, (r.status_code, content[:300] if content else None, r.text[:300])
        body = r.json()
        detail = body.get("detail")
        assert detail, r.text
        if isinstance(detail, list):  # validation errors: where and what, per error
            assert all(d["msg"] and isinstance(d["loc"], list) for d in detail), detail
            assert body["error"]
        else:
            assert isinstance(detail, str)
        return r

    def post(self, path: str, body, headers: dict | None = None):
        return self.send("POST", path, json.dumps(body).encode(), headers)


# ---------------------------------------------------------------- mutations that always make a body invalid

WRONG_FOR_STR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(JSON_SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=2),
)
BAD_WEIGHT = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.integers(max_value=0),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e7, "3", True, None, [1], {"w": 1}]),
)
BAD_SEED = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.text(max_size=5), st.booleans()
)


def score_mutations():
    item_keys = st.sampled_from(["id", "problem", "answer"])
    crit_keys = st.sampled_from(["name", "gold", "description"])
    return st.one_of(
        st.tuples(st.just("item_type"), item_keys, WRONG_FOR_STR),
        st.tuples(st.just("crit_type"), crit_keys, WRONG_FOR_STR),
        st.tuples(st.just("weight"), st.just(None), BAD_WEIGHT),
        st.tuples(st.just("seed"), st.just(None), BAD_SEED),
        st.tuples(st.just("drop_item_key"), st.sampled_from(["id", "problem", "answer", "rubric"]), st.none()),
        st.tuples(st.just("drop_crit_key"), st.sampled_from(["name", "weight"]), st.none()),
        st.tuples(st.just("unknown"), st.sampled_from(["top", "item", "crit"]), st.text(min_size=1, max_size=30)),
        st.tuples(
            st.just("empty"), st.sampled_from(["id", "problem", "answer", "name"]), st.sampled_from(["", " \t\n"])
        ),
        st.tuples(st.just("huge"), st.sampled_from(["id", "problem", "answer", "name", "gold"]), st.integers(1, 3)),
        st.tuples(st.just("criteria"), st.none(), st.sampled_from([0, 6, 7, 50, 10_000])),
        st.tuples(st.just("items"), st.none(), st.sampled_from([0, MAX_ITEMS + 1])),
        st.tuples(st.just("top"), st.none(), JSON_VALUES.filter(lambda v: not isinstance(v, dict) or "items" not in v)),
        st.tuples(
            st.just("rubric_type"),
            st.none(),
            st.one_of(JSON_SCALARS, st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3)),
        ),
    )


def mutate_score(m) -> object:
    kind, key, value = m
    body = copy.deepcopy(SCORE)
    item = body["items"][0]
    crit = item["rubric"][0]
    if kind == "item_type":
        item[key] = value
    elif kind == "crit_type":
        crit[key] = value
    elif kind == "weight":
        crit["weight"] = value
    elif kind == "seed":
        item["seed"] = value
    elif kind == "drop_item_key":
        del item[key]
    elif kind == "drop_crit_key":
        del crit[key]
    elif kind == "unknown":
        name = "x_" + value  # never a real field name
        {"top": body, "item": item, "crit": crit}[key][name] = 1
    elif kind == "empty":
        (crit if key == "name" else item)[key] = value
    elif kind == "huge":
        limit = MAX_NAME if key in ("id", "name") else MAX_ANSWER * 2
        (crit if key in ("name", "gold") else item)[key] = "é" * (limit + value)
    elif kind == "criteria":
        item["rubric"] = [dict(crit, name=f"c{i}") for i in range(value)]
    elif kind == "items":
        body["items"] = [dict(item, id=f"q:{i}") for i in range(value)]
    elif kind == "top":
        return value
    elif kind == "rubric_type":
        item["rubric"] = value
    return body


def rubric_mutations():
    keys = st.sampled_from(["id", "document", "problem", "reference"])
    return st.one_of(
        st.tuples(st.just("type"), keys, WRONG_FOR_STR),
        st.tuples(st.just("drop"), st.sampled_from(["id", "document", "problem", "reference", "answers"]), st.none()),
        st.tuples(
            st.just("answers"),
            st.none(),
            st.one_of(
                st.just([]), st.just([""]), st.lists(WRONG_FOR_STR, min_size=1, max_size=3), st.just(["a"] * 300)
            ),
        ),
        st.tuples(st.just("unknown"), st.none(), st.text(min_size=1, max_size=20)),
        st.tuples(st.just("seed"), st.none(), BAD_SEED),
    )


def mutate_rubric(m) -> dict:
    kind, key, value = m
    body = copy.deepcopy(RUBRIC_REQ)
    if kind == "type":
        body[key] = value
    elif kind == "drop":
        del body[key]
    elif kind == "answers":
        body["answers"] = value
    elif kind == "unknown":
        body["x_" + value] = 1
    elif kind == "seed":
        body["seed"] = value
    return body


# ---------------------------------------------------------------- the test


def test_over_a_thousand_hostile_requests_get_readable_4xx(fuzz_server, engine):
    calls_before = engine.stats["calls"]
    c = Checker(fuzz_server.url)
    valid_json = json.dumps(SCORE).encode()

    @settings_for(400)
    @given(score_mutations())
    def score_bodies(m):
        c.post("/v1/score", mutate_score(m))

    @settings_for(120)
    @given(rubric_mutations())
    def rubric_bodies(m):
        c.post("/v1/rubric", mutate_rubric(m))

    @settings_for(150)
    @given(st.binary(min_size=1, max_size=300), st.sampled_from(["/v1/score", "/v1/rubric"]))
    def random_bytes(raw, path):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and ("items" in parsed or "id" in parsed):
            return  # astronomically unlikely to be valid, but never risk a model call
        c.send("POST", path, raw)

    @settings_for(150)
    @given(st.integers(0, len(valid_json) - 1), st.sampled_from(["/v1/score", "/v1/rubric"]))
    def truncated_json(cut, path):
        c.send("POST", path, valid_json[:cut])

    @settings_for(120)
    @given(
        st.integers(0, len(valid_json)),
        st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]),
    )
    def invalid_utf8(pos, junk):
        c.send("POST", "/v1/score", valid_json[:pos] + junk + valid_json[pos:])

    @settings_for(60)
    @given(st.sampled_from(['"\\ud800"', '"\\udfff x"', '"a\\ud83d"']), st.sampled_from(["id", "problem", "answer"]))
    def lone_surrogates(text, key):
        raw = json.dumps(SCORE).replace(json.dumps(SCORE_ITEM[key]), text, 1).encode()
        c.send("POST", "/v1/score", raw)

    @settings_for(60)
    @given(
        st.one_of(
            st.text(max_size=12).filter(lambda t: t.strip() and _is_bad_timeout(t)),
            st.sampled_from(["0", "-1", "nan", "inf", "1e9", "", "1s"]),
        )
    )
    def bad_timeout_header(value):
        try:
            c.send("POST", "/v1/score", valid_json, {"X-Pop-Timeout-S": value})
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            pass  # not a header httpx will send

    @settings_for(60)
    @given(
        st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"])
    )
    def wrong_content_type(ct):
        c.send("POST", "/v1/score", b"items=1", {"content-type": ct})

    @settings_for(60)
    @given(
        st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
        st.sampled_from(["/v1/score", "/v1/rubric"]),
    )
    def wrong_method(method, path):
        c.send(method, path, valid_json if method != "GET" else None)

    @settings_for(60)
    @given(st.from_regex(r"[a-z0-9][a-z0-9_/-]{0,29}", fullmatch=True))
    def unknown_path(path):
        if "/" + path.strip("/") in (
            "/v1/score",
            "/v1/rubric",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/docs",
            "/redoc",
            "/docs/oauth2-redirect",
        ):
            return
        c.send("GET", "/" + path)
        c.send("POST", "/" + path, valid_json)

    score_bodies()
    rubric_bodies()
    random_bytes()
    truncated_json()
    invalid_utf8()
    lone_surrogates()
    bad_timeout_header()
    wrong_content_type()
    wrong_method()
    unknown_path()

    # Over the body limit (1 MiB here), declared or streamed, and deeply nested JSON.
    big = b'{"items": [' + b'{"id": "x"},' * 120_000 + b"]}"
    assert c.send("POST", "/v1/score", big).status_code == 413

    def chunks():
        for _ in range(40):
            yield b" " * 32_768

    assert c.send("POST", "/v1/score", chunks()).status_code == 413  # no Content-Length: counted as it streams
    assert c.send("POST", "/v1/score", b"[" * 100_000).status_code in (400, 422)
    assert c.send("POST", "/v1/score", b'{"items":' * 50_000).status_code in (400, 422)
    tenk = copy.deepcopy(SCORE)
    tenk["items"][0]["rubric"] = [dict(CRITERION, name=f"c{i}") for i in range(10_000)]
    assert c.post("/v1/score", tenk).status_code == 422
    neg = copy.deepcopy(SCORE)
    neg["items"][0]["rubric"][0]["weight"] = -3
    assert "greater than 0" in c.post("/v1/score", neg).json()["error"]

    print(f"fuzz: {c.count} requests, status codes {dict(sorted(c.statuses.items()))}")
    assert c.count >= 1000, c.count
    assert set(c.statuses) <= set(range(400, 500)), c.statuses
    # Nothing reached the model, and the server is healthy.
    assert engine.stats["calls"] == calls_before
    assert c.client.get("/healthz").json()["status"] == "ready"
    metrics = c.client.get("/metrics").text
    assert "pop_critic_items_total{" not in metrics
    assert 'code="5' not in metrics
    c.client.close()


def _is_bad_timeout(t: str) -> bool:
    try:
        v = float(t)
    except ValueError:
        return True
    return not 0 < v <= 86_400
