"""``pop-nemo serve-critic``: the rubric writer and judge behind HTTP, with dynamic batching.

One engine thread owns the model. Requests put their items on a bounded queue; the shared
batcher (:class:`pop_nemo.serving.Batcher`) merges items of one kind from many requests into
one engine call (up to ``max_batch`` items, or whatever has arrived ``max_wait_ms`` after the
oldest waiting item) and hands each item its result. A full queue answers 503 with
``Retry-After``; every item has a deadline and comes back ``timed_out`` instead of waiting
forever. Auth, the bind rule, body limits and the lifespan are :mod:`pop_nemo.serving`'s, as in
the OpenAI-compatible server. The work itself is :class:`~pop_nemo.critic.local.LocalCritic`:
the same prompts, guides, parsers and scoring as the in-process critic.

Endpoints: ``POST /v1/score``, ``POST /v1/rubric``, ``GET /healthz``, ``GET /metrics``
(Prometheus text), ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pop_nemo import serving
from pop_nemo.critic.base import Critic, JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.critic.metrics import CriticMetrics
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
from pop_nemo.serving import QueueFull, ServeLimits, Stopped

log = logging.getLogger("pop_nemo.critic")


# ---------------------------------------------------------------- config


@dataclass
class ServeConfig(ServeLimits):
    """The ``serve:`` section of a critic config (the rest is an ordinary pop_nemo config:
    ``model``, ``task``, ``rollout.rubric``/``rollout.judge`` sampling and ``rollout.guide``).
    ``host`` beyond loopback needs a bearer token in $POP_NEMO_CRITIC_TOKEN."""

    port: int = 8765
    max_batch: int = 32
    max_queue: int = 2048
    engine: Literal["hf", "trtllm"] = "hf"  # trtllm: GPU only (the NGC image)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None  # torch CPU threads; None = torch default


def check_serve_config(s: ServeConfig) -> ServeConfig:
    from pop_nemo.config import ConfigError

    serving.check_limits(s, "serve")
    if not (s.num_threads is None or s.num_threads >= 1):
        raise ConfigError("serve.num_threads must be >= 1 or null")
    return s


def load_serve_config(path: str | None, overrides: Sequence[str] = ()) -> tuple[Any, ServeConfig]:
    """A pop_nemo config plus its ``serve:`` section (dotted overrides reach both: serve.port=9000)."""
    from pop_nemo.config import Config, apply_overrides, build_section, load_yaml, validate

    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    serve = data.pop("serve", None) or {}
    cfg = validate(build_section(Config, data, ""))
    return cfg, check_serve_config(build_section(ServeConfig, serve, "serve"))


# ---------------------------------------------------------------- the batching service


class NotReady(Exception):
    pass


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
    """The model's lifecycle and the batcher. ``load`` runs on the engine thread and returns the
    Critic that does the work (in practice a LocalCritic over an HF engine)."""

    load: Callable[[], Critic]
    cfg: ServeConfig = field(default_factory=ServeConfig)
    info: dict[str, Any] = field(default_factory=dict)
    on_load_failed: Callable[[BaseException], None] | None = None

    def __post_init__(self) -> None:
        self.state: Literal["loading", "ready", "failed", "stopped"] = "loading"
        self.load_error: str | None = None
        self.critic: Critic | None = None
        self.batcher: serving.Batcher[JudgeItem | RubricItem, _Outcome] = serving.Batcher(
            self._run_batch, self.cfg.max_batch, self.cfg.max_wait_ms, self.cfg.max_queue, name="critic"
        )
        self.executor = self.batcher.executor  # the one thread that touches the model
        self.metrics = CriticMetrics(
            queue_depth=self.batcher.depth,
            ready=lambda: 1.0 if self.state == "ready" else 0.0,
            busy=lambda: 1.0 if self.batcher.busy else 0.0,
        )

    # ---- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.batcher.start()
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
        await self.batcher.stop()

    # ---- requests

    def queue_depth(self) -> int:
        return self.batcher.depth()

    async def submit(
        self, kind: Literal["judge", "rubric"], items: Sequence[JudgeItem | RubricItem], timeout_s: float | None
    ) -> list[_Outcome]:
        if self.state != "ready":
            self.metrics.rejected.labels("not_ready").inc()
            raise NotReady(self.load_error or "the model is loading")
        timeout = self.cfg.item_timeout_s if timeout_s is None else min(timeout_s, self.cfg.item_timeout_s)
        try:
            works = await self.batcher.submit(kind, items, timeout)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        out = []
        for w in works:
            if w.future.cancelled():
                where = "while the model was generating it" if w.started else "before the engine reached it"
                out.append(_failed(kind, w.payload, f"deadline of {timeout:.3g} s passed {where}", timed_out=True))
            elif isinstance(w.future.exception(), Stopped):
                out.append(_failed(kind, w.payload, "the critic server is shutting down"))
            else:
                out.append(w.future.result())
        for o in out:
            self.metrics.items.labels(kind, o.outcome).inc()
            if o.outcome == "parse_failure":
                self.metrics.parse_failures.labels(kind).inc()
            elif o.outcome == "timeout":
                self.metrics.timeouts.labels(kind).inc()
        return out

    # ---- the engine thread

    def _run_batch(self, live: list[serving.Item]) -> list[_Outcome]:
        """On the engine thread: one engine call for the batch's live items."""
        kind = live[0].key
        t0 = time.perf_counter()
        now = time.monotonic()
        for w in live:
            self.metrics.queue_wait.labels(kind).observe(now - w.created)
        self.metrics.batch_size.labels(kind).observe(len(live))
        out = self._run_engine(kind, [w.payload for w in live])
        self.metrics.engine_latency.labels(kind).observe(time.perf_counter() - t0)
        return out

    def _run_engine(self, kind: str, items: list[JudgeItem | RubricItem]) -> list[_Outcome]:
        """An exception fails only the items that cause it (the batch is retried one by one)."""
        critic = self.critic
        assert critic is not None
        fn = critic.judge if kind == "judge" else critic.write_rubrics
        try:
            return [_Outcome(r, "valid" if r.valid else "parse_failure") for r in fn(items)]  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - reported per item, counted, logged
            self.metrics.engine_errors.labels(kind).inc()
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


_KNOWN_PATHS = ("/v1/score", "/v1/rubric", "/healthz", "/metrics", "/openapi.json", "/docs")


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

    app = FastAPI(
        title="pop-nemo critic",
        summary="Rubric writer and judge for POP self-play, with dynamic batching.",
        version="1",
        lifespan=serving.lifespan(service.start, service.stop),
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

    serving.guard_and_metrics(app, token, service.cfg.max_body_mb, service.metrics, _KNOWN_PATHS)
    return app


# ---------------------------------------------------------------- running it


def build_local_critic(cfg: Any, scfg: ServeConfig) -> Critic:
    """The reference model as rubric writer and judge (runs on the engine thread)."""
    import torch

    from pop_nemo import build
    from pop_nemo.models import load_tokenizer, resolve_model_path

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
    return build.local_critic(cfg, engine, engine)


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

    token = serving.token_from_env(token, TOKEN_ENV)
    serving.check_bind(scfg.host, token, TOKEN_ENV, "the critic")
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

        serving.check_bind(host, token, TOKEN_ENV, "the critic")
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
