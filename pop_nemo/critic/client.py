"""The Critic protocol over HTTP: ``critic.url`` set → the loop talks to ``pop-nemo serve-critic``.

An async core (:class:`AsyncCriticClient`: pooled httpx connections, a concurrency limit, one
deadline per call, retries with backoff for transient failures only) and a synchronous facade
(:class:`CriticClient`) for the loop, which runs the core on its own event-loop thread and also
hands out futures (``judge_async``) so judging can overlap the next generation.

Nothing here raises once the client is up: an item that fails comes back ``valid=False`` with
the reason (``timed_out=True`` when the deadline ended it), and the loop masks that sample.
Transient = connection refused/reset, 503, timeouts; a 4xx answer or a judge output that does
not parse is final and never retried.

Replicas (``critic.url`` a list): each request goes to the in-rotation replica with the least
outstanding items; one that stops answering is taken out (its request is retried on another at
once, so a replica's death costs no sample while another is up) and put back when its
``/healthz`` is green again. :meth:`CriticClient.step_metrics` gives per-replica counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import random
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from pop_nemo.config import ConfigError, critic_urls
from pop_nemo.critic.base import JudgeItem, Judgement, RubricItem, RubricResult
from pop_nemo.critic.schema import TIMEOUT_HEADER, TOKEN_ENV, RubricResponse, ScoreResponse
from pop_nemo.errors import UserError
from pop_nemo.selfplay.rubric import Criterion, Rating

T = TypeVar("T")


class CriticUnavailable(UserError):
    """The critic server did not become ready in time (raised at startup only; the CLI prints it as one line)."""


@dataclass
class _Failure:
    reason: str
    timed_out: bool = False


@dataclass
class ClientStats:
    requests: int = 0  # HTTP attempts
    retries: int = 0
    connect_errors: int = 0  # refused, reset, dropped mid-request
    timeouts: int = 0  # HTTP attempts that ran into the deadline
    status_503: int = 0
    failed_items: int = 0  # items returned valid=False because the call failed (not parse failures)


@dataclass
class ReplicaStats:
    """What one critic replica did (cumulative); the loop logs the per-step difference."""

    items: int = 0  # items it answered (judge items and rubrics)
    failures: int = 0  # attempts that failed on it: unreachable, no answer in time, an error status
    answered: int = 0  # HTTP requests it answered with 200
    latency_s: float = 0.0  # seconds of those requests, summed


@dataclass
class _Replica:
    url: str
    http: httpx.AsyncClient | None = None
    sem: asyncio.Semaphore | None = None
    outstanding: int = 0  # items sent to it and not answered yet
    down: str | None = None  # why it is out of rotation; None = in rotation
    probe: asyncio.Task[None] | None = None
    stats: ReplicaStats = field(default_factory=ReplicaStats)


class AsyncCriticClient:
    def __init__(
        self,
        url: str | Sequence[str],
        timeout_s: float = 120.0,
        max_concurrency: int = 16,
        batch_items: int = 16,
        max_retries: int | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        token: str | None = None,
        log: Any = None,
        probe_interval_s: float = 1.0,
    ):
        """``url``: one address, several (a list or "url1,url2"): replicas that share the items.
        ``timeout_s``: the deadline of one ``judge``/``write_rubrics`` call (all its items).
        ``max_retries`` None = retry transient failures until the deadline.
        ``max_concurrency``: requests in flight per replica."""
        try:
            urls = critic_urls(url if isinstance(url, str) else list(url))
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if timeout_s <= 0 or max_concurrency < 1 or batch_items < 1:
            raise ValueError("timeout_s must be > 0, max_concurrency and batch_items >= 1")
        self.replicas = [_Replica(u) for u in urls]
        self.url = ",".join(urls)  # names every replica in messages
        self.timeout_s, self.max_concurrency, self.batch_items = timeout_s, max_concurrency, batch_items
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.connect_timeout_s, self.probe_interval_s = connect_timeout_s, probe_interval_s
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.stats = ClientStats()
        self._log = log
        self._turn = 0  # breaks ties between equally loaded replicas in turn

    def _client(self, rep: _Replica) -> httpx.AsyncClient:
        if rep.http is None:
            rep.http = httpx.AsyncClient(
                base_url=rep.url,
                headers=self._headers,
                limits=httpx.Limits(
                    max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
                ),
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            )
            rep.sem = asyncio.Semaphore(self.max_concurrency)
        return rep.http

    async def aclose(self) -> None:
        for rep in self.replicas:
            if rep.probe is not None:
                rep.probe.cancel()
                rep.probe = None
            if rep.http is not None:
                await rep.http.aclose()
                rep.http = None

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    # ---- replicas: pick by outstanding work, take out on failure, put back when /healthz is green

    def _pick(self) -> _Replica:
        """The in-rotation replica with the least outstanding work (all of them if none is in rotation)."""
        pool = [r for r in self.replicas if r.down is None] or self.replicas
        n = len(self.replicas)
        self._turn += 1
        return min(pool, key=lambda r: (r.outstanding, (self.replicas.index(r) - self._turn) % n))

    def _take_out(self, rep: _Replica, why: str) -> None:
        if rep.down is None:
            others = len(self.replicas) > 1
            then = (
                "taken out of rotation until its /healthz is green again"
                if others
                else "retrying until the call's deadline, failed items are masked"
            )
            self._say(f"critic server {rep.url} unreachable ({why}); {then}")
            if others and rep.probe is None:
                rep.probe = asyncio.get_running_loop().create_task(self._probe(rep))
        rep.down = why

    def _put_back(self, rep: _Replica, how: str = "") -> None:
        if rep.down is not None:
            rep.down = None
            self._say(f"critic server {rep.url} reachable again{how}")

    async def _healthy(self, rep: _Replica) -> bool:
        try:
            r = await self._client(rep).get("/healthz", timeout=httpx.Timeout(5.0))
        except httpx.TransportError:
            return False
        return r.status_code == 200

    async def _probe(self, rep: _Replica) -> None:
        """Poll a taken-out replica's ``/healthz`` until it is green, then put it back in rotation."""
        try:
            while rep.down is not None:
                await asyncio.sleep(self.probe_interval_s)
                if await self._healthy(rep):
                    self._put_back(rep, " (/healthz is green); back in rotation")
        finally:
            rep.probe = None

    def replica_stats(self) -> dict[str, ReplicaStats]:
        return {r.url: r.stats for r in self.replicas}

    def replicas_up(self) -> int:
        return sum(r.down is None for r in self.replicas)

    # ---- startup

    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait until one replica's ``/healthz`` is green (the others join when theirs is: they start
        out of rotation, probed); raise a message naming the URLs if none is in time."""
        tasks = {asyncio.ensure_future(self._wait_one(r, timeout_s)): r for r in self.replicas}
        pending, errors = set(tasks), []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None:
                        for p in pending:
                            p.cancel()
                            rep = tasks[p]
                            if not await self._healthy(rep):
                                rep.down = "not ready at startup"
                                rep.probe = asyncio.get_running_loop().create_task(self._probe(rep))
                        return t.result()
                    errors.append(t.exception())
        finally:
            for p in pending:
                p.cancel()
        first = errors[0]
        assert isinstance(first, BaseException)
        if len(errors) == 1:
            raise first
        raise CriticUnavailable(f"no critic replica is ready ({len(errors)} tried); the first: {first}")

    async def _wait_one(self, rep: _Replica, timeout_s: float) -> dict[str, Any]:
        client = self._client(rep)
        deadline = time.monotonic() + timeout_s
        last, delay = "no answer yet", 0.1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CriticUnavailable(
                    f"critic server at {rep.url} is not ready after {timeout_s:g} s ({last}). Start it with "
                    f"`pop-nemo serve-critic --config conf/critic_cpu.yaml --port PORT`, raise "
                    "critic.startup_timeout_s, or unset critic.url to judge in-process"
                )
            try:
                r = await client.get("/healthz", timeout=httpx.Timeout(min(remaining, 10.0)))
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        return {}
                last = f"/healthz answered {r.status_code}: {r.text[:200]}"
                if r.status_code in (401, 403):
                    raise CriticUnavailable(
                        f"critic server at {rep.url} refused the bearer token ({r.status_code}); set ${TOKEN_ENV}"
                    )
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 2.0)

    # ---- calls

    async def judge(self, items: Sequence[JudgeItem], timeout_s: float | None = None) -> list[Judgement]:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        chunks = [list(items[i : i + self.batch_items]) for i in range(0, len(items), self.batch_items)]
        done = await asyncio.gather(*(self._judge_chunk(c, deadline) for c in chunks))
        return [j for chunk in done for j in chunk]

    async def write_rubrics(self, items: Sequence[RubricItem], timeout_s: float | None = None) -> list[RubricResult]:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        return list(await asyncio.gather(*(self._rubric(it, deadline) for it in items)))

    async def _judge_chunk(self, chunk: list[JudgeItem], deadline: float) -> list[Judgement]:
        body = {
            "items": [
                {
                    "id": it.id,
                    "problem": it.problem,
                    "rubric": [c.to_dict() for c in it.rubric],
                    "answer": it.answer,
                    **({"seed": it.seed} if it.seed is not None else {}),
                }
                for it in chunk
            ]
        }
        got = await self._post("/v1/score", body, deadline, len(chunk))
        if not isinstance(got, _Failure):
            try:
                resp = ScoreResponse.model_validate(got)
                if [i.id for i in resp.items] != [it.id for it in chunk]:
                    raise ValueError("item ids do not match the request")
            except (ValidationError, ValueError) as e:
                got = _Failure(f"bad response from critic server {self.url}: {str(e)[:300]}")
        if isinstance(got, _Failure):
            self.stats.failed_items += len(chunk)
            return [Judgement(it.id, False, error=got.reason, timed_out=got.timed_out) for it in chunk]
        return [
            Judgement(
                o.id,
                o.valid,
                score=o.score,
                reward=o.reward,
                ratings=[Rating(r.name, r.rating, r.thoughts) for r in o.ratings],
                error=o.error,
                timed_out=o.timed_out,
                raw=o.raw,
            )
            for o in resp.items
        ]

    async def _rubric(self, it: RubricItem, deadline: float) -> RubricResult:
        body = {
            "id": it.id,
            "document": it.document,
            "problem": it.problem,
            "reference": it.reference,
            "answers": list(it.answers),
            **({"seed": it.seed} if it.seed is not None else {}),
        }
        got = await self._post("/v1/rubric", body, deadline, 1)
        if not isinstance(got, _Failure):
            try:
                resp = RubricResponse.model_validate(got)
                if resp.id != it.id:
                    raise ValueError("id does not match the request")
            except (ValidationError, ValueError) as e:
                got = _Failure(f"bad response from critic server {self.url}: {str(e)[:300]}")
        if isinstance(got, _Failure):
            self.stats.failed_items += 1
            return RubricResult(it.id, False, None, error=got.reason)
        rubric = [Criterion(c.name, c.gold, c.description, c.weight) for c in resp.rubric] if resp.rubric else None
        return RubricResult(resp.id, resp.valid and rubric is not None, rubric, error=resp.error, raw=resp.raw)

    async def _post(self, path: str, body: dict[str, Any], deadline: float, items: int) -> dict[str, Any] | _Failure:
        """POST to the least busy replica, with retries (on any replica) for transient failures until
        ``deadline``; never raises. ``items``: the work it carries, for spreading the load."""
        attempt, last = 0, "no attempt made"
        while True:
            retry_after = 0.0
            rep = self._pick()
            client = self._client(rep)
            assert rep.sem is not None
            rep.outstanding += items
            try:
                async with rep.sem:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return _Failure(
                            f"deadline passed for {path} at {self.url} after {attempt} attempt(s); last: {last}",
                            timed_out=True,
                        )
                    # Let the server time items out a little before we stop listening, so its answer says why.
                    server_budget = max(remaining - min(1.0, 0.1 * remaining), 0.001)
                    self.stats.requests += 1
                    t0 = time.monotonic()
                    try:
                        r = await client.post(
                            path,
                            json=body,
                            headers={TIMEOUT_HEADER: f"{server_budget:.3f}"},
                            timeout=httpx.Timeout(remaining, connect=min(self.connect_timeout_s, remaining)),
                        )
                    except httpx.TimeoutException as e:
                        self.stats.timeouts += 1
                        rep.stats.failures += 1
                        last = f"no answer in time from {rep.url} ({type(e).__name__})"
                        self._take_out(rep, last)
                    except httpx.TransportError as e:
                        self.stats.connect_errors += 1
                        rep.stats.failures += 1
                        last = (
                            f"cannot reach the critic server ({type(e).__name__}: {e})" if str(e) else type(e).__name__
                        )
                        self._take_out(rep, last)
                    else:
                        if r.status_code != 503:
                            self._put_back(rep)
                        if r.status_code == 200:
                            try:
                                got = r.json()
                            except ValueError:
                                rep.stats.failures += 1
                                return _Failure(f"critic server {rep.url} answered 200 with a body that is not JSON")
                            rep.stats.items += items
                            rep.stats.answered += 1
                            rep.stats.latency_s += time.monotonic() - t0
                            return got
                        if r.status_code != 503:
                            rep.stats.failures += 1
                            return _Failure(f"critic server {rep.url} answered {r.status_code}: {_detail(r)}")
                        self.stats.status_503 += 1
                        last = f"server busy (503: {_detail(r)})"
                        retry_after = _retry_after(r)
            finally:
                rep.outstanding -= items
            attempt += 1
            if self.max_retries is not None and attempt > self.max_retries:
                return _Failure(f"{last}; gave up after {attempt} attempts")
            if deadline - time.monotonic() <= 0:
                continue  # reported as a deadline miss at the top of the loop
            self.stats.retries += 1
            if rep.down is not None and self.replicas_up() > 0:
                continue  # another replica is in rotation: fail over to it at once
            # Exponential backoff with jitter (clients that failed together do not come back together),
            # never sooner than the server's Retry-After.
            backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.75 + random.random() / 2)
            await asyncio.sleep(max(0.0, min(max(retry_after, backoff), deadline - time.monotonic())))


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    if isinstance(body, dict):
        if "error" in body:
            return str(body["error"])[:300]
        if "detail" in body:
            return str(body["detail"])[:300]
    return str(body)[:300]


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(max(float(r.headers.get("retry-after", "0")), 0.0), 60.0)
    except ValueError:
        return 0.0


class CriticClient:
    """Synchronous Critic for the loop. Waits for ``/healthz`` (bounded) on construction."""

    def __init__(
        self,
        url: str | Sequence[str],
        timeout_s: float = 120.0,
        startup_timeout_s: float = 300.0,
        wait_ready: bool = True,
        **kwargs: Any,
    ):
        from pop_nemo.run_output import console

        def log(msg: str) -> None:
            console.print(f"[yellow]critic:[/] {msg}")

        self.core = AsyncCriticClient(url, timeout_s=timeout_s, log=kwargs.pop("log", log), **kwargs)
        self.url, self.timeout_s = self.core.url, timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="critic-client", daemon=True)
        self._thread.start()
        self.server_info: dict[str, Any] = {}
        self._reported: dict[str, ReplicaStats] = {}
        if wait_ready:
            try:
                self.server_info = self._run(self.core.wait_ready(startup_timeout_s)).result()
            except BaseException:
                self.close()
                raise

    @property
    def stats(self) -> ClientStats:
        return self.core.stats

    def step_metrics(self) -> dict[str, Any]:
        """Per-replica counts since the last call, for the step's metrics row (keys in the README)."""
        now = {url: dataclasses.replace(st) for url, st in self.core.replica_stats().items()}
        out: dict[str, Any] = {"critic_replicas_up": self.core.replicas_up()}
        for k, (url, st) in enumerate(now.items()):
            before = self._reported.get(url, ReplicaStats())
            answered = st.answered - before.answered
            out[f"critic_items_r{k}"] = st.items - before.items
            out[f"critic_failures_r{k}"] = st.failures - before.failures
            out[f"critic_requests_r{k}"] = answered
            out[f"critic_latency_s_r{k}"] = (st.latency_s - before.latency_s) / answered if answered else None
        self._reported = now
        return out

    def _run(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    # ---- futures: start judging now, collect later

    def judge_async(self, items: Sequence[JudgeItem]) -> concurrent.futures.Future[list[Judgement]]:
        return self._run(self.core.judge(list(items)))

    def write_rubrics_async(self, items: Sequence[RubricItem]) -> concurrent.futures.Future[list[RubricResult]]:
        return self._run(self.core.write_rubrics(list(items)))

    # ---- the Critic protocol

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        fut = self.judge_async(items)
        try:
            return fut.result(timeout=self.timeout_s + 30)
        except concurrent.futures.TimeoutError:  # the core honours the deadline; this is a safety net
            fut.cancel()
            return [Judgement(it.id, False, error=f"no result from {self.url} in time", timed_out=True) for it in items]

    def write_rubrics(self, items: Sequence[RubricItem]) -> list[RubricResult]:
        fut = self.write_rubrics_async(items)
        try:
            return fut.result(timeout=self.timeout_s + 30)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            return [RubricResult(it.id, False, None, error=f"no result from {self.url} in time") for it in items]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self._run(self.core.aclose()).result(timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> CriticClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
