"""The Engine protocol over any OpenAI-compatible chat-completions server.

A minimal client (written for the offline recipe's teacher roles): one HTTP request per
:class:`~pop_nemo.engines.base.Request`, sent concurrently (the server batches them), with the
request's own sampling (temperature, top_p, max tokens, ``n``, ``seed``) and its guide passed
the way the server understands it (``guide_format``). By default token ids and logprobs are not
returned (``Completion.token_ids`` is empty; ``meta["completion_tokens"]`` holds the server's
count): an endpoint plays roles whose tokens are not trained here. With a ``tokenizer``,
``prompt_ids`` come from its chat template and ``token_ids`` from the server when it returns them
(``return_token_ids=True``: vLLM and ``pop-nemo serve-openai``), else from re-tokenizing the text;
``logprobs=True`` asks for the sampled tokens' logprobs.

Transient failures (connection errors, timeouts, 408/429/5xx) are retried with backoff and,
when retries run out, raise :class:`EngineError` (a synthesis chunk is then not committed,
and a rerun resumes it). A request the server rejects (other 4xx, e.g. a prompt over its
context) comes back as completions with ``finish_reason="error"`` and empty text, so one bad
prompt cannot stall a run; the reason is in ``meta["error"]``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx

from pop_nemo.engines.base import Completion, Guide, Request

GuideFormat = Literal["json_schema", "trtllm", "vllm", "none"]
_TRANSIENT = {408, 409, 425, 429, 500, 502, 503, 504}


class EngineError(RuntimeError):
    pass


def guide_fields(guide: Guide | None, fmt: GuideFormat) -> dict[str, Any]:
    """The request-body fields that carry ``guide`` for a server of kind ``fmt``."""
    if guide is None or fmt == "none":
        return {}
    if fmt == "json_schema":  # OpenAI structured outputs: JSON schemas only
        if guide.kind != "json_schema":
            return {}
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "guide", "schema": json.loads(guide.spec)},
            }
        }
    if fmt == "trtllm":  # trtllm-serve's ResponseFormat (xgrammar backend)
        if guide.kind == "json_schema":
            return {"response_format": {"type": "json", "schema": json.loads(guide.spec)}}
        return {"response_format": {"type": guide.kind, guide.kind: guide.spec}}
    if fmt == "vllm":
        key = {"json_schema": "guided_json", "ebnf": "guided_grammar", "regex": "guided_regex"}[guide.kind]
        return {key: json.loads(guide.spec) if guide.kind == "json_schema" else guide.spec}
    raise ValueError(f"unknown guide format {fmt!r}")


class OpenAIEngine:
    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        guide_format: GuideFormat = "json_schema",
        timeout_s: float = 600.0,
        max_concurrency: int = 16,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        tokenizer=None,
        logprobs: bool = False,
        return_token_ids: bool = False,
    ):
        self.url = url.rstrip("/")
        self.model = model
        self.guide_format = guide_format
        self.max_concurrency, self.max_retries, self.backoff_s = max_concurrency, max_retries, backoff_s
        self.tokenizer, self.logprobs, self.return_token_ids = tokenizer, logprobs, return_token_ids
        self.pad_id: int | None = None
        if tokenizer is not None:
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "calls": 0, "requests": 0, "rejected": 0}

    @classmethod
    def from_env(cls, url: str, model: str, api_key_env: str | None, **kw: Any) -> OpenAIEngine:
        return cls(url, model, api_key=os.environ.get(api_key_env) if api_key_env else None, **kw)

    def body(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "n": s.n,
        }
        if s.seed is not None:
            body["seed"] = s.seed % (2**63)
        if self.logprobs:
            body["logprobs"] = True
        if self.return_token_ids:
            body["return_token_ids"] = True
        body.update(guide_fields(s.guide, self.guide_format))
        return body

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> list[str]:
        """Poll ``GET {url}/models`` until the server answers (bounded); the served model ids."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                r = self._client.get(f"{self.url}/models", timeout=min(10.0, timeout_s))
                if r.status_code == 200:
                    return [m.get("id") for m in r.json().get("data", [])]
                last = f"HTTP {r.status_code}"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + poll_s > deadline:
                raise EngineError(f"{self.url} not ready after {timeout_s:g} s ({last})")
            time.sleep(poll_s)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            out = list(pool.map(self._one, requests))
        self.stats["calls"] += 1
        return out

    def _one(self, request: Request) -> list[Completion]:
        body = self.body(request)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._client.post(f"{self.url}/chat/completions", json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in _TRANSIENT:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code >= 400:
                self.stats["rejected"] += 1
                err = f"HTTP {r.status_code}: {r.text[:300]}"
                return [Completion("", [], [], [], "error", {"error": err}) for _ in range(request.sampling.n)]
            return self._parse(r.json(), request.sampling.n, request)
        raise EngineError(f"{self.url}/chat/completions failed after {self.max_retries + 1} attempts: {last}")

    def _parse(self, data: dict[str, Any], n: int, request: Request | None = None) -> list[Completion]:
        usage = data.get("usage") or {}
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise EngineError(f"{self.url} returned {len(choices)} choices for n={n}")
        self.stats["requests"] += 1
        self.stats["generated_tokens"] += int(usage.get("completion_tokens") or 0)
        self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        prompt_ids = self._prompt_ids(data, request)
        comps = []
        for c in choices:
            text = (c.get("message") or {}).get("content") or ""
            finish = "length" if c.get("finish_reason") == "length" else "stop"
            meta = {"completion_tokens": usage.get("completion_tokens"), "model": data.get("model")}
            content = (c.get("logprobs") or {}).get("content") or []
            lps = [float(t["logprob"]) for t in content]
            ids = self._token_ids(c, text, finish)
            if ids and len(lps) != len(ids):
                meta["logprobs_unaligned"] = bool(lps)  # logprobs of other tokens than the ids: drop them
                lps = []
            comps.append(Completion(text, ids, lps, prompt_ids, finish, meta))
        return comps

    def _prompt_ids(self, data: dict[str, Any], request: Request | None) -> list[int]:
        if isinstance(data.get("prompt_token_ids"), list):
            return [int(t) for t in data["prompt_token_ids"]]
        if self.tokenizer is None or request is None:
            return []
        out = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _token_ids(self, choice: dict[str, Any], text: str, finish: str) -> list[int]:
        if isinstance(choice.get("token_ids"), list):
            return [int(t) for t in choice["token_ids"]]
        if self.tokenizer is None:
            return []
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if finish == "stop" and eos is not None else ids

    def update_weights(self, source: Any) -> None:
        raise NotImplementedError("an OpenAI-compatible endpoint serves fixed weights; it cannot be refit")

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @property
    def placement(self) -> str:
        return f"endpoint {self.url} (model {self.model})"

    def close(self) -> None:
        self._client.close()
