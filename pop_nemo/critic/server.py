"""``pop-nemo serve-critic``: the rubric writer and judge behind HTTP, with dynamic batching.

One engine thread owns the model. Requests put their items on a bounded queue; a batcher on
the event loop merges items from many requests into one engine call (up to ``max_batch``
items, or whatever has arrived ``max_wait_ms`` after the oldest waiting item), runs it on the
engine thread and hands each item its result. A full queue answers 503 with ``Retry-After``;
every item has a deadline and comes back ``timed_out`` instead of waiting forever. The work
itself is :class:`~pop_nemo.critic.local.LocalCritic`: the same prompts, guides, parsers and
scoring as the in-process critic.

Endpoints: ``POST /v1/score``, ``POST /v1/rubric``, ``GET /healthz``, ``GET /metrics``
(Prometheus text), ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from pop_nemo.critic.base import Critic, JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.critic.metrics import CONTENT_TYPE, CriticMetrics
from pop_nemo.critic.schema import (
    TIMEOUT_HEADER,
    TOKEN_ENV,
    Health,
    RubricRequest,
    RubricResponse,
    ScoreItemOut,
    ScoreRequest,
    ScoreResponse,
)

log = logging.getLogger("pop_nemo.critic")


# ---------------------------------------------------------------- config


@dataclass
class ServeConfig:
    """The ``serve:`` section of a critic config (the rest is an ordinary pop_nemo config:
    ``model``, ``task``, ``rollout.rubric``/``rollout.judge`` sampling and ``rollout.guide``)."""

    host: str = "127.0.0.1"  # anything but loopback needs a bearer token in $POP_NEMO_CRITIC_TOKEN
    port: int = 8765
    engine: Literal["hf", "trtllm"] = "hf"  # trtllm: GPU only (the NGC image)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None  # torch CPU threads; None = torch default
    max_batch: int = 32  # items per engine call
    max_wait_ms: float = 10.0  # wait at most this long after the oldest queued item for a fuller batch
    max_queue: int = 2048  # items waiting for the engine; beyond that requests get 503
    item_timeout_s: float = 600.0  # deadline of an item unless the caller asks for less (X-Pop-Timeout-S)
    max_body_mb: float = 16.0
    retry_after_s: int = 1  # Retry-After of a 503


def check_serve_config(s: ServeConfig) -> ServeConfig:
    from pop_nemo.config import ConfigError

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(0 <= s.port < 65536, f"serve.port={s.port} must be in 0..65535")
    need(s.max_batch >= 1, "serve.max_batch must be >= 1")
    need(s.max_wait_ms >= 0, "serve.max_wait_ms must be >= 0")
    need(s.max_queue >= s.max_batch, "serve.max_queue must be >= serve.max_batch")
    need(s.item_timeout_s > 0, "serve.item_timeout_s must be > 0")
    need(s.max_body_mb > 0, "serve.max_body_mb must be > 0")
    need(s.retry_after_s >= 1, "serve.retry_after_s must be >= 1 (whole seconds, as HTTP wants)")
    need(s.num_threads is None or s.num_threads >= 1, "serve.num_threads must be >= 1 or null")
    return s


def load_serve_config(path: str | None, overrides: Sequence[str] = ()) -> tuple[Any, ServeConfig]:
    """A pop_nemo config plus its ``serve:`` section (dotted overrides reach both: serve.port=9000)."""
    from pop_nemo.config import Config, apply_overrides, build_section, load_yaml, validate

    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    serve = data.pop("serve", None) or {}
    cfg = validate(build_section(Config, data, ""))
    return cfg, check_serve_config(build_section(ServeConfig, serve, "serve"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    from pop_nemo.config import ConfigError

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"binding {host!r} exposes the critic beyond this machine: set a bearer token in ${TOKEN_ENV} "
            "(clients send it as 'Authorization: Bearer ...'), or bind 127.0.0.1"
        )


# ---------------------------------------------------------------- the batching service


class QueueFull(Exception):
    pass


class NotReady(Exception):
    pass


@dataclass(eq=False)
class _Work:
    kind: Literal["judge", "rubric"]
    item: JudgeItem | RubricItem
    future: asyncio.Future
    enqueued: float  # loop time
    deadline: float  # loop time
    created: float = field(default_factory=time.monotonic)
    # Plain flags shared with the engine thread (single writes, single reads: no lock needed).
    started: bool = False  # the engine thread began generating it
    abandoned: bool = False  # its request stopped waiting; the engine skips it


@dataclass
class _Outcome:
    result: Judgement | RubricResult
    outcome: Literal["valid", "parse_failure", "timeout", "error"]
    timed_out: bool = False


def _failed(kind: str, item: JudgeItem | RubricItem, error: str, timed_out: bool = False) -> _Outcome:
    if kind == "judge":
        res: Judgement | RubricResult = Judgement(item.id, False, error=error, timed_out=timed_out)
    else:
        res = RubricResult(item.id, False, error=error)
    return _Outcome(res, "timeout" if timed_out else "error", timed_out)


@dataclass
class CriticService:
    """Queue, batcher and the engine thread. ``load`` runs on the engine thread and returns the
    Critic that does the work (in practice a LocalCritic over an HF engine)."""

    load: Callable[[], Critic]
    cfg: ServeConfig = field(default_factory=ServeConfig)
    info: dict[str, Any] = field(default_factory=dict)
    on_load_failed: Callable[[BaseException], None] | None = None

    def __post_init__(self) -> None:
        self.state: Literal["loading", "ready", "failed", "stopped"] = "loading"
        self.load_error: str | None = None
        self.critic: Critic | None = None
        # The one thread that touches the model: it loads it and runs every batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic-engine")
        self._queue: deque[_Work] = deque()
        self._busy = False
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self.metrics = CriticMetrics(
            queue_depth=lambda: len(self._queue),
            ready=lambda: 1.0 if self.state == "ready" else 0.0,
            busy=lambda: 1.0 if self._busy else 0.0,
        )

    # ---- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._batcher = loop.create_task(self._run_batcher(), name="critic-batcher")
        t0 = time.perf_counter()
        fut = loop.run_in_executor(self.executor, self.load)

        def loaded(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            err = f.exception()
            if err is not None:
                self.state, self.load_error = "failed", f"{type(err).__name__}: {err}"
                log.error("critic model failed to load: %s", self.load_error)
                if self.on_load_failed:
                    self.on_load_failed(err)
                return
            self.critic, self.state = f.result(), "ready"
            log.info("critic ready in %.1f s", time.perf_counter() - t0)

        fut.add_done_callback(loaded)

    async def stop(self) -> None:
        self.state = "stopped"
        if self._batcher:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        while self._queue:
            w = self._queue.popleft()
            if not w.future.done():
                w.future.set_result(_failed(w.kind, w.item, "the critic server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- requests

    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(
        self, kind: Literal["judge", "rubric"], items: Sequence[JudgeItem | RubricItem], timeout_s: float | None
    ) -> list[_Outcome]:
        if self.state != "ready":
            self.metrics.rejected.inc(reason="not_ready")
            raise NotReady(self.load_error or "the model is loading")
        if len(self._queue) + len(items) > self.cfg.max_queue:
            self.metrics.rejected.inc(reason="queue_full")
            raise QueueFull(f"queue full ({len(self._queue)} of {self.cfg.max_queue} items waiting)")
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        timeout = self.cfg.item_timeout_s if timeout_s is None else min(timeout_s, self.cfg.item_timeout_s)
        now = loop.time()
        works = [_Work(kind, it, loop.create_future(), now, now + timeout) for it in items]
        self._queue.extend(works)
        self._wake.set()
        try:
            await asyncio.wait([w.future for w in works], timeout=max(0.0, now + timeout - loop.time()))
        except asyncio.CancelledError:  # the request is gone (shutdown): the engine need not do its work
            for w in works:
                w.abandoned = True
                with contextlib.suppress(ValueError):
                    self._queue.remove(w)
            raise
        out = []
        for w in works:
            if w.future.done() and not w.future.cancelled():
                out.append(w.future.result())
                continue
            w.abandoned = True
            where = "while the model was generating it" if w.started else "before the engine reached it"
            w.future.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(w)
            out.append(_failed(kind, w.item, f"deadline of {timeout:.3g} s passed {where}", timed_out=True))
        for o in out:
            self.metrics.items.inc(kind=kind, outcome=o.outcome)
            if o.outcome == "parse_failure":
                self.metrics.parse_failures.inc(kind=kind)
            elif o.outcome == "timeout":
                self.metrics.timeouts.inc(kind=kind)
        return out

    # ---- the batcher (event loop) and the engine thread

    def _take_batch(self, now: float) -> list[_Work]:
        """Up to max_batch live items of the oldest item's kind, in arrival order."""
        kind = self._queue[0].kind
        batch: list[_Work] = []
        keep: deque[_Work] = deque()
        while self._queue:
            w = self._queue.popleft()
            if w.future.done():
                continue  # its request gave up
            if w.kind == kind and len(batch) < self.cfg.max_batch and now < w.deadline:
                batch.append(w)
            else:
                keep.append(w)  # expired items stay until their request times them out
        self._queue = keep
        return batch

    async def _run_batcher(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            same = sum(1 for w in self._queue if w.kind == head.kind)
            remaining = head.enqueued + max_wait - loop.time()
            if same < self.cfg.max_batch and remaining > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
                continue  # re-examine: more items, the head timed out, or the wait is over
            batch = self._take_batch(loop.time())
            if not batch:
                # only expired items are left: sleep until their requests remove them
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                continue
            self._busy = True
            try:
                results = await loop.run_in_executor(self.executor, self._run_batch, batch)
            finally:
                self._busy = False
            for w, r in zip(batch, results):
                if r is not None and not w.future.done():
                    w.future.set_result(r)

    def _run_batch(self, batch: list[_Work]) -> list[_Outcome | None]:
        """On the engine thread: generate for the items whose requests still wait (None for the rest)."""
        live = [w for w in batch if not w.abandoned]
        if not live:
            return [None] * len(batch)
        kind = live[0].kind
        t0 = time.perf_counter()
        for w in live:
            w.started = True
        now = time.monotonic()
        for w in live:
            self.metrics.queue_wait.observe(now - w.created, kind=kind)
        self.metrics.batch_size.observe(len(live), kind=kind)
        got = iter(self._run_engine(kind, [w.item for w in live]))
        self.metrics.engine_latency.observe(time.perf_counter() - t0, kind=kind)
        return [next(got) if w.started else None for w in batch]

    def _run_engine(self, kind: str, items: list[JudgeItem | RubricItem]) -> list[_Outcome]:
        """An exception fails only the items that cause it (the batch is retried one by one)."""
        critic = self.critic
        assert critic is not None
        fn = critic.judge if kind == "judge" else critic.write_rubrics
        try:
            return [_Outcome(r, "valid" if r.valid else "parse_failure") for r in fn(items)]  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - reported per item, counted, logged
            self.metrics.engine_errors.inc(kind=kind)
            log.exception("engine call failed on a batch of %d %s item(s)", len(items), kind)
            if len(items) == 1:
                return [_failed(kind, items[0], f"engine error: {type(e).__name__}: {e}")]
        return [o for it in items for o in self._run_engine(kind, [it])]


# ---------------------------------------------------------------- HTTP


def _safe(text: Any, limit: int = 200) -> str:
    s = str(text)
    s = s if len(s) <= limit else s[:limit] + "..."
    return s.encode("utf-8", "replace").decode("utf-8")


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


_KNOWN_PATHS = {"/v1/score", "/v1/rubric", "/healthz", "/metrics", "/openapi.json", "/docs"}


class _Guard:
    """Pure ASGI middleware: bearer token, request body limit, request metrics."""

    def __init__(self, app, service: CriticService, token: str | None, max_body: int):
        self.app, self.service, self.token, self.max_body = app, service, token, max_body

    async def _reply(self, send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"detail": detail}).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            if self.token is not None:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, given = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                    return await self._reply(
                        send_wrapped, 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"}
                    )
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                declared = headers.get(b"content-length")
                if declared is not None:
                    try:
                        size = int(declared)
                    except ValueError:
                        return await self._reply(send_wrapped, 400, "Content-Length is not a number")
                    if size > self.max_body:
                        return await self._reply(
                            send_wrapped, 413, f"request body of {size} bytes exceeds the limit of {self.max_body}"
                        )
                chunks, total = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > self.max_body:
                        return await self._reply(
                            send_wrapped, 413, f"request body exceeds the limit of {self.max_body} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    return await self._reply(send_wrapped, 400, f"request body is not valid UTF-8 (byte {e.start})")
                sent = False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                receive = replay
            await self.app(scope, receive, send_wrapped)
        finally:
            m = self.service.metrics
            m.requests.inc(endpoint=endpoint, code=str(status["code"]))
            m.request_latency.observe(time.perf_counter() - t0, endpoint=endpoint)


def _validation_detail(exc: RequestValidationError) -> dict[str, Any]:
    errors = exc.errors()
    shown = [
        {
            "loc": [_safe(p, 80) for p in e.get("loc", ())],
            "msg": _safe(e.get("msg", "")),
            "type": _safe(e.get("type", "")),
        }
        for e in errors[:20]
    ]
    for s, e in zip(shown, errors):
        ctx = e.get("ctx") or {}
        if e.get("type") == "json_invalid" and "error" in ctx:
            s["msg"] = f"JSON decode error: {_safe(ctx['error'])}"
    summary = "; ".join(f"{'.'.join(s['loc'])}: {s['msg']}" for s in shown[:5])
    if len(errors) > 5:
        summary += f"; and {len(errors) - 5} more"
    return {"detail": shown, "error": summary}


Timeout = Annotated[
    float | None,
    Header(
        alias=TIMEOUT_HEADER,
        gt=0,
        le=86_400,
        description="Seconds the caller will wait; items still queued or generating by then come back timed_out.",
    ),
]


def create_app(service: CriticService, token: str | None = None) -> FastAPI:
    """The FastAPI app around ``service``; ``token`` set = every request needs it as a bearer token."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="pop-nemo critic",
        summary="Rubric writer and judge for POP self-play, with dynamic batching.",
        version="1",
        lifespan=lifespan,
    )
    retry_after = {"Retry-After": str(service.cfg.retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_response(422, _validation_detail(exc))

    errors = {
        413: {"description": "Request body or item count over the limit"},
        503: {"description": "Model loading or queue full; retry after Retry-After seconds"},
    }

    async def _submit(kind: Literal["judge", "rubric"], items: list, timeout_s: float | None) -> list[_Outcome]:
        if len(items) > service.cfg.max_queue:
            raise HTTPException(413, f"{len(items)} items exceed this server's queue of {service.cfg.max_queue}")
        try:
            return await service.submit(kind, items, timeout_s)
        except (NotReady, QueueFull) as e:
            raise HTTPException(503, str(e), headers=retry_after) from None

    @app.post("/v1/score", response_model=ScoreResponse, responses=errors)
    async def score(body: ScoreRequest, timeout_s: Timeout = None) -> ScoreResponse:
        """Judge answers against their rubrics: per item a score in [0, 2] and a reward in [0, 1]."""
        items = [JudgeItem(it.id, it.problem, it.criteria(), it.answer, it.seed) for it in body.items]
        outcomes = await _submit("judge", items, timeout_s)
        return ScoreResponse(items=[ScoreItemOut.from_judgement(o.result) for o in outcomes])  # type: ignore[arg-type]

    @app.post("/v1/rubric", response_model=RubricResponse, responses=errors)
    async def rubric(body: RubricRequest, timeout_s: Timeout = None) -> RubricResponse:
        """Write a rubric from a document, a problem, its reference answer and candidate answers."""
        item = RubricItem(body.id, body.document, body.problem, body.reference, list(body.answers), body.seed)
        (o,) = await _submit("rubric", [item], timeout_s)
        return RubricResponse.from_result(o.result, timed_out=o.timed_out)  # type: ignore[arg-type]

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz():
        """200 once the model is loaded; 503 while loading (or if loading failed)."""
        if service.state == "ready":
            return Health(
                status="ready",
                model=service.info.get("model"),
                task=service.info.get("task"),
                max_batch=service.cfg.max_batch,
                queue_depth=service.queue_depth(),
            )
        body = Health(status=service.state, detail=service.load_error, model=service.info.get("model"))
        return _json_response(503, body.model_dump(), retry_after)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_Guard, service=service, token=token, max_body=int(service.cfg.max_body_mb * 1024 * 1024))
    return app


# ---------------------------------------------------------------- running it


def build_local_critic(cfg: Any, scfg: ServeConfig) -> Critic:
    """The reference model as rubric writer and judge (runs on the engine thread)."""
    import torch

    from pop_nemo import build
    from pop_nemo.critic.local import LocalCritic
    from pop_nemo.models import load_tokenizer, resolve_model_path
    from pop_nemo.selfplay.roles import get_task

    if scfg.num_threads:
        torch.set_num_threads(scfg.num_threads)
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    if scfg.engine == "trtllm":  # GPU only: TensorRT-LLM from the NGC container
        engine = build.make_trtllm_engine(cfg, path, tok, name="critic")
    else:
        device = build.this_rank_engine_device(requested=scfg.device)
        engine = build.hf_engine(
            path, tok, dtype=cfg.model.dtype, max_batch=scfg.max_batch, seed=cfg.seed, device=device
        )
    return LocalCritic(
        rubric_engine=engine,
        judge_engine=engine,
        rubric_sampling=build.sampling(cfg.rollout.rubric),
        judge_sampling=build.sampling(cfg.rollout.judge),
        writing=get_task(cfg.task).writing,
        limits=build.guide_limits(cfg),
        judge_mode=cfg.rollout.judge.mode,
        paper_parsing=cfg.rollout.judge.parsing == "paper",
    )


def _uvicorn_config(app, host: str, port: int):
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )


def serve(cfg: Any, scfg: ServeConfig, token: str | None = None) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the process exit code."""
    import uvicorn

    from pop_nemo.models import resolve_model_path
    from pop_nemo.run_output import console

    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    check_bind(scfg.host, token)
    resolve_model_path(cfg.model.path)  # a bad model path fails now, not on the engine thread
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    service = CriticService(
        load=lambda: build_local_critic(cfg, scfg),
        cfg=scfg,
        info={"model": cfg.model.path, "task": cfg.task},
    )
    server = uvicorn.Server(_uvicorn_config(create_app(service, token), scfg.host, scfg.port))

    def load_failed(err: BaseException) -> None:
        server.should_exit = True

    service.on_load_failed = load_failed
    from pop_nemo import build

    for warning in build.guide_budget_warnings(cfg):
        if warning.startswith(("rollout.rubric", "rollout.judge")):  # the roles this server plays
            console.print(f"[yellow]warning:[/] {warning}")
    auth = "bearer token required" if token else "no token (loopback only)"
    console.print(
        f"[bold]pop-nemo serve-critic[/] model={cfg.model.path} task={cfg.task} on http://{scfg.host}:{scfg.port} "
        f"(max_batch={scfg.max_batch}, max_wait_ms={scfg.max_wait_ms:g}, max_queue={scfg.max_queue}; {auth})"
    )
    server.run()
    if service.state == "failed":
        console.print(f"[red]error:[/] the critic model did not load: {service.load_error}")
        return 1
    return 0


class ServerThread:
    """The server on a background thread of this process (tests, benchmarks, a colocated judge).

    Binds ``host`` on a free port (or ``port``) before returning, so ``url`` is usable at once;
    ``wait_ready`` blocks until the model is loaded.
    """

    def __init__(
        self,
        service: CriticService,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
    ):
        import uvicorn

        check_bind(host, token)
        self.service = service
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(create_app(service, token), host, self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.service.state != "ready":
            if self.service.state == "failed":
                raise RuntimeError(f"critic failed to load: {self.service.load_error}")
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise TimeoutError(f"critic at {self.url} not ready after {timeout_s} s (state {self.service.state})")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
