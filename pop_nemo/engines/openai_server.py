"""``pop-nemo serve-openai``: an OpenAI-compatible chat-completions server over the HF engine.

It serves the HF engine (SmolLM2 on a CPU, or any HF model on a GPU) behind the subset of the
OpenAI API that rollouts and teacher roles use, so :class:`~pop_nemo.engines.openai.OpenAIEngine`
can be tested against a real server here, and a small model can be served where vLLM or
``trtllm-serve`` are not available.

``POST /v1/chat/completions`` takes ``model``, ``messages``, ``n``, ``seed``, ``temperature``,
``top_p``, ``max_tokens`` (or ``max_completion_tokens``), ``logprobs`` (the sampled token's
logprob; ``top_logprobs`` must be 0), ``response_format`` (``text``, ``json_object``,
``json_schema``, and trtllm-serve's ``json``/``regex``/``ebnf``), and the vLLM extensions ``guided_json``/``guided_grammar``/``guided_regex``
and ``return_token_ids``. Anything else the server cannot honour (``stream``, ``stop``,
``tools``, ``logit_bias``, penalties) is refused with a 400 rather than ignored. Also
``GET /v1/models`` and ``GET /healthz``.

Concurrent requests are batched by the shared :class:`pop_nemo.serving.Batcher`: one engine
thread runs whatever arrived within ``max_wait_ms`` of the oldest waiting request (up to
``max_batch`` requests) in one ``generate`` call. A full queue answers 503 with ``Retry-After``;
a request past ``item_timeout_s`` answers 504. Auth (``$POP_NEMO_OPENAI_TOKEN`` on ``/v1/``),
the bind rule, body limits and ``GET /metrics`` are :mod:`pop_nemo.serving`'s, as in the critic.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from pop_nemo import serving
from pop_nemo.engines.base import Completion, Guide, Sampling
from pop_nemo.engines.base import Request as EngineRequest
from pop_nemo.serving import ServeLimits

if TYPE_CHECKING:
    from pop_nemo.engines.hf import HFEngine

TOKEN_ENV = "POP_NEMO_OPENAI_TOKEN"
MAX_SEED = 2**63


# ---------------------------------------------------------------- wire format


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "schema"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``text``/``json_object``/``json_schema``, and trtllm-serve's ``json`` (with
    ``schema``), ``regex`` and ``ebnf`` (xgrammar) types."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema", "json", "regex", "ebnf"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    regex: str | None = None
    ebnf: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM extensions
    guided_json: dict[str, Any] | str | None = None
    guided_grammar: str | None = None
    guided_regex: str | None = None
    return_token_ids: bool = False
    # Accepted only at their no-op values (clients often send them explicitly).
    stream: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


_ERROR_KINDS = {401: "authentication_error", 413: "invalid_request_error", 400: "invalid_request_error"}
_KNOWN_PATHS = ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics")


def _error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape, for the shared guard's 400/401/413."""
    return {
        "error": {"message": message, "type": _ERROR_KINDS.get(status, "server_error"), "param": None, "code": None}
    }


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def to_guide(req: ChatRequest) -> Guide | None:
    """The one decoding constraint a request asks for (400 when it asks for more than one)."""
    guides: list[Guide] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format.type=json_schema needs response_format.json_schema", "response_format")
        guides.append(Guide("json_schema", json.dumps(rf.json_schema.schema_)))
    elif rf is not None and rf.type == "json_object":
        guides.append(Guide("json_schema", json.dumps({"type": "object"})))
    elif rf is not None and rf.type != "text":  # trtllm-serve's dialect
        value = {"json": rf.schema_, "regex": rf.regex, "ebnf": rf.ebnf}[rf.type]
        if value is None:
            key = "schema" if rf.type == "json" else rf.type
            raise APIError(400, f"response_format.type={rf.type} needs response_format.{key}", "response_format")
        kind = {"json": "json_schema", "regex": "regex", "ebnf": "ebnf"}[rf.type]
        guides.append(Guide(kind, json.dumps(value) if rf.type == "json" else value))
    if req.guided_json is not None:
        spec = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
        guides.append(Guide("json_schema", spec))
    if req.guided_grammar is not None:
        guides.append(Guide("ebnf", req.guided_grammar))
    if req.guided_regex is not None:
        guides.append(Guide("regex", req.guided_regex))
    if len(guides) > 1:
        raise APIError(400, "give at most one of response_format (json), guided_json, guided_grammar, guided_regex")
    return guides[0] if guides else None


def check_supported(req: ChatRequest) -> None:
    if req.stream:
        raise APIError(400, "stream=true is not supported by this server", "stream")
    if req.stop:
        raise APIError(400, "stop sequences are not supported by this server", "stop")
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence/frequency penalties are not supported by this server")
    if req.top_logprobs:
        raise APIError(400, "only top_logprobs=0 is supported (the sampled token's logprob)", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both")


# ---------------------------------------------------------------- batching service


@dataclass
class ServeOpenAIConfig(ServeLimits):
    """The served model's name and generation defaults, plus the settings both servers share
    (:class:`pop_nemo.serving.ServeLimits`: host, port, batching, deadline, body limit)."""

    model_name: str = "smollm2"
    default_max_tokens: int = 256
    max_context: int | None = None  # prompt + max_tokens limit; None = the model's


def check_openai_config(cfg: ServeOpenAIConfig) -> ServeOpenAIConfig:
    from pop_nemo.config import ConfigError

    serving.check_limits(cfg, "serve")
    if cfg.default_max_tokens < 1:
        raise ConfigError("serve.default_max_tokens must be >= 1")
    if cfg.max_context is not None and cfg.max_context < 2:
        raise ConfigError("serve.max_context must be >= 2 or null")
    return cfg


@dataclass
class OpenAIService:
    load: Callable[[], HFEngine]  # the served engine: its tokenizer, grammars and context length are used
    cfg: ServeOpenAIConfig
    state: str = "loading"  # loading | ready | failed
    load_error: str | None = None
    engine: Any = None
    max_context: int | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "batches": 0, "rejected": 0})

    def __post_init__(self) -> None:
        self.batcher: serving.Batcher[EngineRequest, Completion] = serving.Batcher(
            self._run_batch, self.cfg.max_batch, self.cfg.max_wait_ms, self.cfg.max_queue, name="openai"
        )
        self.metrics = OpenAIMetrics(self)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.batcher.start()
        fut = loop.run_in_executor(self.batcher.executor, self.load)

        def loaded(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                self.state, self.load_error = "failed", f"{type(f.exception()).__name__}: {f.exception()}"
                return
            self.engine = f.result()
            self.max_context = self.cfg.max_context or _model_context(self.engine)
            self.state = "ready"

        fut.add_done_callback(loaded)

    async def stop(self) -> None:
        await self.batcher.stop()

    async def submit(self, request: EngineRequest) -> list[Completion]:
        try:
            (item,) = await self.batcher.submit(None, [request], self.cfg.item_timeout_s)
        except serving.QueueFull:
            self.stats["rejected"] += 1
            raise APIError(503, "server busy: request queue is full", kind="server_busy") from None
        if item.future.cancelled():
            raise APIError(
                504, f"deadline of {self.cfg.item_timeout_s:g} s passed (serve.item_timeout_s)", kind="timeout"
            )
        err = item.future.exception()
        if isinstance(err, serving.Stopped):
            raise APIError(503, str(err), kind="server_busy")
        if err is not None:
            raise APIError(500, f"generation failed: {err}", kind="server_error")
        return item.future.result()

    def _run_batch(self, live: list[serving.Item[EngineRequest]]) -> list[list[Completion]]:
        """On the engine thread: one ``generate`` call for the batch."""
        self.stats["batches"] += 1
        self.metrics.batch_size.observe(len(live))
        return self.engine.generate([w.payload for w in live])


class OpenAIMetrics:
    """``GET /metrics``: requests, batch sizes, queue depth, readiness (a registry per app)."""

    def __init__(self, service: OpenAIService):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http = serving.RequestMetrics("pop_openai", r)
        self.batch_size = Histogram(
            "pop_openai_batch_size", "Requests per engine call.", buckets=serving.BATCH_BUCKETS, registry=r
        )
        Gauge("pop_openai_queue_depth", "Requests waiting for the engine.", registry=r).set_function(
            service.batcher.depth
        )
        Gauge("pop_openai_ready", "1 when the model is loaded.", registry=r).set_function(
            lambda: 1.0 if service.state == "ready" else 0.0
        )
        Gauge("pop_openai_engine_busy", "1 while the engine runs a batch.", registry=r).set_function(
            lambda: 1.0 if service.batcher.busy else 0.0
        )


def _model_context(engine: HFEngine) -> int | None:
    n = getattr(engine.model.config, "max_position_embeddings", None)  # not every model config has it
    return int(n) if n else None


# ---------------------------------------------------------------- the app


def _logprobs_content(comp: Completion, tokenizer) -> dict[str, Any]:
    content = []
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        text = tokenizer.decode([tok]) if tokenizer is not None else str(tok)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def create_app(service: OpenAIService, token: str | None = None) -> FastAPI:
    app = FastAPI(title="pop_nemo OpenAI-compatible server", lifespan=serving.lifespan(service.start, service.stop))
    serving.guard_and_metrics(
        app,
        token,
        service.cfg.max_body_mb,
        service.metrics,
        _KNOWN_PATHS,
        auth_prefix="/v1/",  # /healthz and /metrics stay open, as probes expect
        error_body=_error_body,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", loc)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": str(service.cfg.retry_after_s)} if exc.status == 503 else None
        return _error(exc.status, exc.message, exc.param, exc.kind, headers)

    @app.get("/healthz")
    async def healthz():
        body = {"status": service.state, "model": service.cfg.model_name, **service.stats}
        if service.state != "ready":
            body["detail"] = service.load_error
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(service.cfg.retry_after_s)})
        return body

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": service.cfg.model_name, "object": "model", "created": 0, "owned_by": "pop_nemo"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if service.state != "ready":
            raise APIError(503, f"model is {service.state}", kind="server_busy")
        if req.model != service.cfg.model_name:
            raise APIError(
                404,
                f"model {req.model!r} is not served here (serving {service.cfg.model_name!r})",
                "model",
                "not_found_error",
            )
        check_supported(req)
        guide = to_guide(req)
        engine = service.engine
        max_tokens = req.max_completion_tokens or req.max_tokens or service.cfg.default_max_tokens
        seed = None if req.seed is None else req.seed % MAX_SEED
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
        sampling = Sampling(req.temperature, req.top_p, max_tokens, req.n, seed, guide)
        er = EngineRequest(messages, sampling, id=uuid.uuid4().hex)
        prompt_ids = list(engine.encode(er))
        if service.max_context and len(prompt_ids) + max_tokens > service.max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {service.max_context} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages",
                "context_length_exceeded",
            )
        if guide is not None:
            try:
                engine.grammars.compile(guide)
            except Exception as e:
                raise APIError(400, f"the guide does not compile: {e}", "response_format") from None
        service.stats["requests"] += 1
        comps = await service.submit(er)
        tok = engine.tokenizer
        choices = []
        for k, c in enumerate(comps):
            choice: dict[str, Any] = {
                "index": k,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": "length" if c.finish_reason == "length" else "stop",
                "logprobs": _logprobs_content(c, tok) if req.logprobs else None,
            }
            if req.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in comps)
        body: dict[str, Any] = {
            "id": f"chatcmpl-{er.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": service.cfg.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt_ids
        return body

    return app


# ---------------------------------------------------------------- running it


def serve(load: Callable[[], HFEngine], cfg: ServeOpenAIConfig, token: str | None = None) -> int:
    import uvicorn

    token = serving.token_from_env(token, TOKEN_ENV)
    serving.check_bind(cfg.host, token, TOKEN_ENV, "the server")
    check_openai_config(cfg)
    service = OpenAIService(load=load, cfg=cfg)
    server = uvicorn.Server(
        uvicorn.Config(create_app(service, token), host=cfg.host, port=cfg.port, log_level="info", access_log=False)
    )
    server.run()
    return 1 if service.state == "failed" else 0
