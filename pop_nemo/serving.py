"""What the two HTTP servers share: the bind rule, bearer auth, body limits, the lifespan, the
request metrics and one dynamic batcher with per-item deadlines.

``critic/server.py`` (the rubric critic) and ``engines/openai_server.py`` (the OpenAI-compatible
server) differ only in their wire formats and in what a batch runs; everything here is theirs
in common, so a fix to auth, limits or batching lands in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# ---------------------------------------------------------------- the bind rule and auth


@dataclass
class ServeLimits:
    """The settings both servers take, by the same names (each server's config adds its own)."""

    host: str = "127.0.0.1"  # anything but loopback needs a bearer token in the server's token variable
    port: int = 8000
    max_batch: int = 16  # items per engine call
    max_wait_ms: float = 10.0  # wait at most this long after the oldest queued item for a fuller batch
    max_queue: int = 256  # items waiting for the engine; beyond that requests get 503
    item_timeout_s: float = 600.0  # deadline of an item (the critic's callers may ask for less)
    max_body_mb: float = 16.0
    retry_after_s: int = 1  # Retry-After of a 503


def check_limits(s: ServeLimits, section: str) -> None:
    """One-line errors naming the field, before anything loads."""
    from pop_nemo.config import ConfigError

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{section}.{msg}")

    need(0 <= s.port < 65536, f"port={s.port} must be in 0..65535")
    need(s.max_batch >= 1, "max_batch must be >= 1")
    need(s.max_wait_ms >= 0, "max_wait_ms must be >= 0")
    need(s.max_queue >= s.max_batch, f"max_queue must be >= {section}.max_batch")
    need(s.item_timeout_s > 0, "item_timeout_s must be > 0")
    need(s.max_body_mb > 0, "max_body_mb must be > 0")
    need(s.retry_after_s >= 1, "retry_after_s must be >= 1 (whole seconds, as HTTP wants)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_from_env(token: str | None, env: str) -> str | None:
    """The token given, else the one in ``$env``; an empty variable is no token."""
    return token if token is not None else (os.environ.get(env) or None)


def check_bind(host: str, token: str | None, env: str, what: str = "the server") -> None:
    """A server reachable from other machines must ask for a token: refuse to bind otherwise."""
    from pop_nemo.config import ConfigError

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"binding {host!r} exposes {what} beyond this machine: set a bearer token in ${env} "
            "(clients send it as 'Authorization: Bearer ...'), or bind 127.0.0.1"
        )


def bearer_ok(authorization: str, token: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


# ---------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RequestMetrics:
    """Per-endpoint request count and latency, in the app's own registry (two apps in one
    process, as in the tests, never share a counter)."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        self.requests = Counter(
            f"{prefix}_requests", "HTTP requests by endpoint and status code.", ("endpoint", "code"), registry=registry
        )
        self.latency = Histogram(
            f"{prefix}_request_latency_seconds",
            "HTTP request latency.",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)


# ---------------------------------------------------------------- the guard (ASGI middleware)

ErrorBody = Callable[[int, str], dict[str, Any]]


def detail_body(status: int, message: str) -> dict[str, Any]:
    return {"detail": message}


class Guard:
    """Pure ASGI middleware: bearer token on every path under ``auth_prefix``, the request body
    limit (declared and streamed), UTF-8 bodies, and request metrics. ``error_body`` shapes the
    server's own error JSON."""

    def __init__(
        self,
        app,
        token: str | None,
        max_body: int,
        metrics: RequestMetrics | None = None,
        known_paths: Sequence[str] = (),
        auth_prefix: str = "/",
        error_body: ErrorBody = detail_body,
    ):
        self.app, self.token, self.max_body, self.metrics = app, token, max_body, metrics
        self.known, self.auth_prefix, self.error_body = set(known_paths), auth_prefix, error_body

    async def _reply(self, send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(self.error_body(status, detail)).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            if self.token is not None and path.startswith(self.auth_prefix):
                if not bearer_ok(headers.get(b"authorization", b"").decode("latin-1"), self.token):
                    return await self._reply(
                        send_wrapped, 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"}
                    )
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(headers, receive, send_wrapped)
                if body is None:
                    return
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
            if self.metrics is not None:
                endpoint = path if path in self.known else "other"
                self.metrics.observe(endpoint, status["code"], time.perf_counter() - t0)

    async def _read_body(self, headers: dict[bytes, bytes], receive, send) -> bytes | None:
        """The whole body, or None after answering 400/413 (or when the client left)."""
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._reply(send, 400, "Content-Length is not a number")
                return None
            if size > self.max_body:
                await self._reply(send, 413, f"request body of {size} bytes exceeds the limit of {self.max_body}")
                return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            await self._reply(send, 400, f"request body is not valid UTF-8 (byte {e.start})")
            return None
        return body


def guard_and_metrics(
    app, token: str | None, max_body_mb: float, app_metrics: Any, known_paths: Sequence[str], **options: Any
) -> None:
    """What both servers put on their FastAPI app: the :class:`Guard` (``options``: its
    ``auth_prefix`` and ``error_body``) with ``app_metrics.http`` as its request metrics, and
    ``GET /metrics``: ``app_metrics.registry`` (the app's own) in the Prometheus text format."""
    app.add_middleware(
        Guard,
        token=token,
        max_body=int(max_body_mb * 1024 * 1024),
        metrics=app_metrics.http,
        known_paths=known_paths,
        **options,
    )

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(app_metrics.registry), media_type=CONTENT_TYPE_LATEST)


def lifespan(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]):
    """A FastAPI lifespan that starts a service with the app and stops it after the last request."""

    @contextlib.asynccontextmanager
    async def run(app):
        await start()
        try:
            yield
        finally:
            await stop()

    return run


# ---------------------------------------------------------------- the dynamic batcher


class QueueFull(Exception):
    pass


class Stopped(Exception):
    """The server shut down before the item ran."""


@dataclass(eq=False)
class Item[P]:
    key: Hashable  # items of one key share a batch (the critic: judge or rubric)
    payload: P
    future: asyncio.Future
    enqueued: float  # loop time
    deadline: float  # loop time
    created: float = field(default_factory=time.monotonic)
    # Plain flags shared with the engine thread (single writes, single reads: no lock needed).
    started: bool = False  # the engine thread began running it
    abandoned: bool = False  # its caller stopped waiting; the engine skips it


@dataclass
class Batcher[P, R]:
    """A bounded queue, a batcher task on the event loop and the one engine thread.

    The batcher merges items of the oldest item's key into one ``run`` call on the engine thread:
    up to ``max_batch`` items, or whatever has arrived ``max_wait_ms`` after the oldest. Every
    item has a deadline; ``submit`` returns when all its items are done or the deadline passes,
    and an item past its deadline is never started. ``run`` gets the live items (``started`` set)
    and returns one result per item; if it raises, every item of the batch gets the exception.
    """

    run: Callable[[list[Item[P]]], Sequence[R]]  # P: what a caller submits; R: what the engine makes of it
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    name: str = "engine"

    def __post_init__(self) -> None:
        # The one thread that touches the model: the server loads it here too.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-engine")
        self._queue: deque[Item[P]] = deque()
        self.busy = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def depth(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            w = self._queue.popleft()
            if not w.future.done():
                w.future.set_exception(Stopped("the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, key: Hashable, payloads: Sequence[P], timeout_s: float) -> list[Item[P]]:
        """Queue ``payloads`` and wait up to ``timeout_s``. Each returned item's future holds its
        result (or exception); an item whose future is not done missed its deadline and was
        abandoned (``started`` says whether the engine had begun it)."""
        if len(self._queue) + len(payloads) > self.max_queue:
            raise QueueFull(f"queue full ({len(self._queue)} of {self.max_queue} items waiting)")
        assert self._wake is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [Item(key, p, loop.create_future(), now, now + timeout_s) for p in payloads]
        self._queue.extend(items)
        self._wake.set()
        try:
            await asyncio.wait([w.future for w in items], timeout=max(0.0, now + timeout_s - loop.time()))
        except asyncio.CancelledError:  # the caller is gone: the engine need not do its work
            self._abandon(items)
            raise
        self._abandon([w for w in items if not w.future.done()])
        return items

    def _abandon(self, items: list[Item[P]]) -> None:
        for w in items:
            w.abandoned = True
            w.future.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(w)

    def _take_batch(self, now: float) -> list[Item[P]]:
        """Up to max_batch live items of the oldest item's key, in arrival order."""
        key = self._queue[0].key
        batch: list[Item[P]] = []
        keep: deque[Item[P]] = deque()
        while self._queue:
            w = self._queue.popleft()
            if w.future.done():
                continue  # its caller gave up
            if w.key == key and len(batch) < self.max_batch and now < w.deadline:
                batch.append(w)
            else:
                keep.append(w)  # expired items stay until their caller times them out
        self._queue = keep
        return batch

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        max_wait = self.max_wait_ms / 1000
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            same = sum(1 for w in self._queue if w.key == head.key)
            remaining = head.enqueued + max_wait - loop.time()
            if same < self.max_batch and remaining > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
                continue  # re-examine: more items, the head timed out, or the wait is over
            batch = self._take_batch(loop.time())
            if not batch:
                # only expired items are left: sleep until their callers remove them
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                continue
            self.busy = True
            try:
                results = await loop.run_in_executor(self.executor, self._run_live, batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            finally:
                self.busy = False
            for w, r in zip(batch, results):
                if w.started and not w.future.done():
                    w.future.set_result(r)

    def _run_live(self, batch: list[Item[P]]) -> list[R | None]:
        """On the engine thread: run the items whose callers still wait (None for the rest)."""
        live = [w for w in batch if not w.abandoned]
        if not live:
            return [None] * len(batch)
        for w in live:
            w.started = True
        got = iter(self.run(live))
        return [next(got) if w.started else None for w in batch]
