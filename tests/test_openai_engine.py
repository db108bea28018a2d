"""The OpenAI-compatible Engine client against a real server on loopback: `pop-nemo serve-openai`
serving the real SmolLM2-135M in its own process (no mock anywhere)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from pop_nemo.engines.base import Guide, Request, Sampling
from pop_nemo.engines.openai import OpenAIEngine, guide_fields
from tests.conftest import ROOT
from tests.processes import stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_CONTEXT = 400
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "pop_nemo.cli",
        "serve-openai",
        "--model",
        "smollm2",
        "--port",
        str(port),
        "--num-threads",
        "1",
        "--max-batch",
        "8",
        "--max-wait-ms",
        "50",
        "--max-context",
        str(MAX_CONTEXT),
    ]
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"serve-openai exited with {proc.returncode}"
            assert time.monotonic() < deadline, "serve-openai not healthy after 240 s"
            time.sleep(0.5)
        yield url
    finally:
        stop(proc, 30)
        log.close()


@pytest.fixture(scope="module")
def client(server, tokenizer):
    eng = OpenAIEngine(
        server + "/v1",
        "smollm2",
        tokenizer=tokenizer,
        logprobs=True,
        return_token_ids=True,
        max_retries=1,
        backoff_s=0.1,
        timeout_s=300,
    )
    yield eng
    eng.close()


def test_models_and_readiness(client):
    assert client.wait_ready(timeout_s=10) == ["smollm2"]


def test_n_and_seed_are_honoured(client):
    req = Request(_msg("Name an animal."), Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, n=3, seed=7))
    other = Request(req.messages, Sampling(1.0, 1.0, 12, n=3, seed=8))
    a, b, c = client.generate([req, req, other])
    assert len(a) == 3
    assert [x.text for x in a] == [x.text for x in b]  # same seed, same samples
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) > 1  # n samples of one request differ


def test_greedy_tokens_and_logprobs_match_the_model(client, engine, hf_model, tokenizer):
    req = Request(_msg("What is the capital of France?"), Sampling(temperature=0.0, max_new_tokens=16))
    (got,) = client.generate([req])[0]
    (local,) = engine.generate([req])[0]
    assert got.prompt_ids == engine.encode(req)  # the chat template, client side and server side
    assert got.token_ids == local.token_ids and got.text == local.text
    # The returned logprobs are the untempered log p(token) under the served model.
    ids = torch.tensor([got.prompt_ids + got.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0, :-1].float(), -1)
    n = len(got.prompt_ids)
    want = [float(logp[n - 1 + i, t]) for i, t in enumerate(got.token_ids)]
    assert got.logprobs == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize("fmt", ["json_schema", "vllm", "trtllm"])
def test_json_schema_guides_always_parse(server, tokenizer, fmt):
    eng = OpenAIEngine(server + "/v1", "smollm2", guide_format=fmt, max_retries=0, timeout_s=300)
    guide = Guide("json_schema", json.dumps(SCHEMA))
    reqs = [
        Request(_msg("Describe a fruit as JSON."), Sampling(1.0, 1.0, 40, n=2, seed=s, guide=guide)) for s in (1, 2)
    ]
    for comps in eng.generate(reqs):
        for c in comps:
            assert c.finish_reason == "stop", c.text
            obj = json.loads(c.text)
            assert set(obj) == {"colour", "count"} and obj["colour"] in {"red", "green", "blue"}
            assert isinstance(obj["count"], int)
    eng.close()


def test_regex_and_ebnf_guides(server):
    eng = OpenAIEngine(server + "/v1", "smollm2", guide_format="vllm", max_retries=0, timeout_s=300)
    regex = Guide("regex", r"(yes|no), [0-9]{2}")
    ebnf = Guide("ebnf", 'root ::= "<answer>" [a-z ]{1,12} "</answer>"')
    out = eng.generate(
        [
            Request(_msg("Is the sky blue?"), Sampling(1.0, 1.0, 16, n=2, seed=3, guide=regex)),
            Request(_msg("Answer in tags."), Sampling(1.0, 1.0, 24, seed=4, guide=ebnf)),
        ]
    )
    assert all(re.fullmatch(r"(yes|no), [0-9]{2}", c.text) for c in out[0]), [c.text for c in out[0]]
    assert re.fullmatch(r"<answer>[a-z ]{1,12}</answer>", out[1][0].text), out[1][0].text
    eng.close()


def test_max_tokens_ends_with_length(client):
    (c,) = client.generate([Request(_msg("Tell me a long story."), Sampling(1.0, 1.0, 5, seed=1))])[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and len(c.logprobs) == 5


def test_rejected_requests_come_back_as_errors_not_exceptions(client, server):
    long = Request(_msg("word " * (MAX_CONTEXT + 50)), Sampling(1.0, 1.0, 8))
    ok = Request(_msg("Hi"), Sampling(0.0, 1.0, 4))
    bad, good = client.generate([long, ok])
    assert bad[0].finish_reason == "error" and "maximum context length" in bad[0].meta["error"]
    assert good[0].finish_reason in ("stop", "length") and good[0].token_ids
    wrong_model = OpenAIEngine(server + "/v1", "gpt-4o", max_retries=0)
    (c,) = wrong_model.generate([ok])[0]
    assert c.finish_reason == "error" and "404" in c.meta["error"]
    wrong_model.close()
    # What the server cannot honour is refused, not silently ignored.
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "smollm2", "messages": _msg("x"), "stop": ["\n"]})
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "smollm2", "messages": _msg("x"), "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_concurrent_requests_are_batched(client, server):
    before = httpx.get(f"{server}/healthz").json()
    reqs = [Request(_msg(f"Count to {i}."), Sampling(1.0, 1.0, 6, seed=i)) for i in range(8)]
    out = client.generate(reqs)
    assert all(len(c) == 1 and c[0].token_ids for c in out)
    after = httpx.get(f"{server}/healthz").json()
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # several requests shared an engine call


def test_guide_fields_wire_format():
    g = Guide("json_schema", json.dumps(SCHEMA))
    assert guide_fields(g, "json_schema")["response_format"]["json_schema"]["schema"] == SCHEMA
    assert guide_fields(g, "trtllm") == {"response_format": {"type": "json", "schema": SCHEMA}}
    assert guide_fields(Guide("regex", "a+"), "vllm") == {"guided_regex": "a+"}
    assert guide_fields(Guide("ebnf", "root ::= x"), "json_schema") == {}  # OpenAI has no EBNF


def test_rollout_backend_openai_puts_the_reference_roles_on_the_endpoint(server, model_path, tokenizer, hf_model):
    from pop_nemo import build
    from pop_nemo.config import load_config
    from pop_nemo.engines.hf import HFEngine
    from pop_nemo.selfplay import roles
    from tests.conftest import TINY

    cfg = load_config(
        TINY,
        [
            "rollout.backend=openai",
            f"rollout.openai.url={server}/v1",
            "rollout.openai.model=smollm2",
            "rollout.openai.guide_format=vllm",
            "rollout.openai.startup_timeout_s=30",
        ],
    )
    policy_engine, reference_engine = build.rollout_engines(cfg, model_path, tokenizer, policy_model=hf_model)
    assert isinstance(policy_engine, HFEngine) and policy_engine.model is hf_model  # trained in place
    assert isinstance(reference_engine, OpenAIEngine)
    # The proposer's EBNF guide travels to the server (vLLM dialect) and its output parses.
    guide = roles.proposer_guide(build.guide_limits(cfg))
    (c,) = reference_engine.generate(
        [Request(_msg("Write a question about sleep."), Sampling(0.7, 1.0, 180, seed=5, guide=guide))]
    )[0]
    assert c.finish_reason == "stop" and roles.parse_proposal(c.text) is not None, c.text
    reference_engine.close()
