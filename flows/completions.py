"""serve-model's engine: a registered model behind OpenAI's completions API, requests batched by Ray Serve.

Ray Serve runs it as a deployment (one replica per machine share, many on a Ray cluster). Requests that arrive
while a batch generates wait for the next one (Ray Serve's `@serve.batch`, counted in rows: prompts x n), which runs
as one transformers generate (flows/batch_generation.py). Every request meets the limits of the MLflow path: a body
past its size (413) or too slow (408), a field of the wrong kind or out of range (400), more requests than
generate and wait (503, with Retry-After), a generation past its time (504); a caller that goes away frees its turn
at once and its rows stop at their next token. The replica follows an alias (`models:/<name>@champion`): when
promote or rollback moves it, the new version is loaded beside the old and takes over between two batches, so no
request mixes versions; each answer names its version (the `model` field and the X-Model-Version header).
/health says what is served; /metrics is Prometheus text.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as objects.

import asyncio
import collections
import contextlib
import functools
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flows.batch_generation import Row, generate_rows
from flows.model_server import INVOCATIONS, Refused, read_body
from flows.openai_api import (
    COMPLETIONS,
    DONE,
    MODELS,
    ApiError,
    Completion,
    answer,
    chunk,
    new_id,
    parse,
    rows_of,
    usage,
)
from tasks.tracking.serving import Limits

VERSION_HEADER = "x-model-version"
APP = "gpt2-pipeline"  # the Ray Serve application
LOG = logging.getLogger("gpt2_pipeline.serving")


@dataclass(frozen=True)
class EngineSettings:
    """What serve-model hands each replica."""

    name: str  # the registered model
    alias: str | None  # followed when set (champion); else version is served as is
    version: str | None
    limits: Limits
    batch_wait_seconds: float = 0.25  # the longest a batch waits for more requests (Pace)
    follow_seconds: float = 10.0  # how often the alias is looked up
    threads: int = 0  # torch's compute threads in a replica; 0: its default

    def as_json(self) -> str:
        values = {**self.__dict__, "limits": self.limits.as_config()}
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> "EngineSettings":
        values = json.loads(text)
        return cls(**{**values, "limits": Limits(**values["limits"])})


@dataclass
class Served:
    version: str
    model: Any
    tokenizer: Any

    @property
    def positions(self) -> int:
        return self.model.config.n_positions


@dataclass
class Job:
    """One request's rows on their way through a batch."""

    rows: list[Row]
    served: Served  # the version its prompts were tokenized for, which runs them
    version: str | None = None  # set once its batch starts
    started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False
    released: bool = False
    task: Any = None  # the batch it runs in, kept while it runs

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled.set()


def load_version(name: str, version: str) -> Served:
    from tasks.tracking.loading import load_pretrained

    model, tokenizer = load_pretrained(f"models:/{name}/{version}", key="--model")
    return Served(version, model.eval(), tokenizer)


class Metrics:
    """Prometheus counters of one replica."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        prefix = "gpt2_serve_"
        self.requests = Counter(
            prefix + "requests", "requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.in_flight = Gauge(prefix + "in_flight", "requests admitted and not yet answered", registry=self.registry)
        self.queue = Gauge(prefix + "queue_depth", "requests admitted and waiting for a batch", registry=self.registry)
        self.batch_rows = Histogram(
            prefix + "batch_rows",
            "rows (prompts x n) in each batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.tokens = Counter(prefix + "generated_tokens", "tokens generated", registry=self.registry)
        self.latency = Histogram(
            prefix + "request_seconds",
            "seconds from a request's arrival to its last byte",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Engine:
    """The model of one replica and the requests it has admitted; HTTP comes and goes through `Deployment`."""

    def __init__(self, settings: EngineSettings):
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings, self.limits = settings, settings.limits
        self.served = load_version(settings.name, settings.version or self.alias_version())
        self.stopping = threading.Event()
        self.admitted = 0
        self.metrics = Metrics()

    def alias_version(self) -> str:
        from tasks.tracking.registry import alias_version

        version = alias_version(self.settings.name, self.settings.alias)
        if version is None:
            raise ApiError(503, f"models:/{self.settings.name}@{self.settings.alias}: no such alias")
        return version

    async def follow(self) -> None:
        """Load the version the alias points at whenever it moves; the next batch runs on it."""
        while self.settings.alias and not self.stopping.is_set():
            await asyncio.sleep(self.settings.follow_seconds)
            try:
                version = await asyncio.to_thread(self.alias_version)
                if version != self.served.version:
                    loaded = await asyncio.to_thread(load_version, self.settings.name, version)
                    LOG.warning("serving version %s (was %s)", version, self.served.version)
                    self.served = loaded  # for requests from now on; those tokenized before run on the old one
            except Exception as exc:  # the registry down or the version unloadable: keep serving what is loaded
                LOG.warning("following %s: %s", self.settings.alias, str(exc).splitlines()[0] if str(exc) else exc)

    async def run_batch(self, jobs: list[Job]) -> list[Job]:
        """Generate every row of these jobs, each on the version its prompts were tokenized for (its tokenizer may
        differ from the next version's): one generate, two when the alias moved while the batch formed."""
        versions: dict[str, list[Job]] = {}
        for job in jobs:
            versions.setdefault(job.served.version, []).append(job)
        try:
            for same in versions.values():
                await self.generate(same, same[0].served)
        finally:  # a generate that failed leaves the jobs after it finished, none waiting for good
            for job in jobs:
                if not job.finished:
                    self.metrics.queue.dec()
                    job.version, job.finished = job.served.version, True
                    job.started.set()
                    job.changed.set()
        return jobs

    async def generate(self, jobs: list[Job], served: Served) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.version = served.version
            job.started.set()
        self.metrics.queue.dec(len(jobs))
        rows = [row for job in jobs for row in job.rows]
        self.metrics.batch_rows.observe(len(rows))

        streams = [job for job in jobs if any(row.stream for row in job.rows)]

        def on_step() -> None:  # wakes the streams only: each wake-up costs the generating thread the GIL
            for job in streams:
                loop.call_soon_threadsafe(job.changed.set)

        try:
            await asyncio.to_thread(generate_rows, served.model, served.tokenizer, rows, self.stopping, on_step)
        finally:
            self.metrics.tokens.inc(sum(len(row.tokens) for row in rows))
            for job in jobs:
                job.finished = True
                job.changed.set()

    def admit(self) -> None:
        if self.admitted >= self.limits.max_concurrent + self.limits.max_queue:
            raise ApiError(
                503,
                f"busy: {self.admitted} requests in progress (serve-model --max-concurrent/--max-queue); retry later",
                code="server_busy",
            )
        self.admitted += 1
        self.metrics.in_flight.inc()

    def release(self, job: Job | None) -> None:
        if job is not None:
            if job.released:
                return
            job.released = True
            job.cancel()  # rows still generating stop at their next token
        self.admitted -= 1
        self.metrics.in_flight.dec()

    async def read(self, request) -> Completion:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ApiError(
                413,
                f"request body: {int(declared):,} bytes, more than {self.limits.max_body_bytes:,} "
                "(serve-model --max-body-bytes)",
                code="request_too_large",
            )
        try:
            body = await read_body(request.receive, self.limits.max_body_bytes, self.limits.body_timeout_seconds)
        except Refused as refused:
            raise ApiError(refused.status, str(refused), code=refused.error_code.lower()) from None
        completion = parse(body, self.limits)
        name = self.settings.name
        if completion.model not in {name, f"{name}@{self.settings.alias}", f"{name}/{self.served.version}"}:
            raise ApiError(
                404,
                f"model: {completion.model!r} is not served here; this server serves {name!r}",
                "model",
                "model_not_found",
            )
        return completion

    def job_of(self, completion: Completion, arrived: float) -> Job:
        served = self.served
        rows = rows_of(completion, served.tokenizer, served.positions, arrived + self.limits.timeout_seconds)
        return Job(rows, served)

    def model_field(self, job: Job) -> str:
        return f"{self.settings.name}/{job.version}"


class Pace:
    """When Ray Serve's batcher starts the next batch: how long it waits for more rows, and how many make it full.

    On the CPU a batch takes about as long whatever its rows (a step's cost is mostly per step, not per row), so it
    pays to wait while rows come faster than a batch runs, and only then: the wait is the last batch's duration less
    the time between two rows (from the last `window` seconds' arrivals), at most `cap`; a lone client does not wait.
    A batch that forms while another runs also waits for that one to end (at most `cap` more), so the requests of the
    batch that ends, back a moment later, join it. Once no batch runs, a batch counts as full, and starts, when it
    has as many rows as the last two batches had with the rows left waiting: no waiting for rows that will not come."""

    def __init__(self, cap: float, max_rows: int, window: float = 2.0):
        self.cap, self.max_rows, self.window = cap, max_rows, window
        self.arrivals: collections.deque[tuple[float, int]] = collections.deque()  # (when, rows)
        self.waiting: dict[int, int] = {}  # request: rows, handed to the batcher and not yet in a batch
        self.sizes: collections.deque[int] = collections.deque([max_rows], maxlen=2)  # the last batches' rows
        self.batch_seconds = cap  # the last batch's duration; until one has run, the cap
        self.running_until: float | None = None  # when the batch running should end

    def queued(self, request: int, rows: int, now: float) -> None:
        self.arrivals.append((now, rows))
        self.waiting[request] = rows

    def gone(self, request: int) -> None:
        """The request left before a batch took it."""
        self.waiting.pop(request, None)

    def started(self, requests: list[int], now: float) -> None:
        rows = sum(self.waiting.pop(request, 0) for request in requests)
        self.sizes.append(rows + sum(self.waiting.values()))
        self.running_until = now + self.batch_seconds

    def ended(self, seconds: float) -> None:
        self.batch_seconds, self.running_until = seconds, None

    def size(self, rows: int) -> int:
        """A batch's size for Ray Serve's batcher: its rows, or the most it takes once it has the rows expected and
        no batch runs (while one runs, a batch sealed early could not start anyway: it keeps taking rows)."""
        expected = min(max(*self.sizes, 1), self.max_rows)
        idle = self.running_until is None
        return self.max_rows if idle and expected <= rows <= self.max_rows else rows

    def wait(self, now: float) -> float:
        while self.arrivals and self.arrivals[0][0] < now - self.window:
            self.arrivals.popleft()
        rate = sum(rows for _, rows in self.arrivals) / self.window
        worth = min(max(self.batch_seconds - 1 / rate, 0.0), self.cap) if rate else 0.0
        if self.running_until is None:
            return worth
        return worth + min(max(self.running_until - now, 0.0), self.cap)


def refusal(error: ApiError):
    from starlette.responses import Response

    headers = {"retry-after": "1"} if error.status == 503 else {}
    if error.status == 408:  # the rest of a body that timed out may still come: close rather than read it
        headers["connection"] = "close"
    return Response(error.body(), error.status, headers, media_type="application/json")


async def batch_started(job: Job, running: asyncio.Future) -> None:
    """Until the job's batch has started, or its batch failed before (its error raised here)."""
    waiter = asyncio.ensure_future(job.started.wait())
    try:
        await asyncio.wait({waiter, running}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not job.started.is_set():
        await running


def timed_out(job: Job, limits: Limits) -> ApiError | None:
    if any(row.finish_reason == "timeout" for row in job.rows):
        return ApiError(
            504,
            f"generation stopped before it finished: {limits.timeout_seconds:g} s passed "
            "(serve-model --timeout) or the server is stopping",
            code="timeout",
        )
    return None


@functools.cache
def event_stream() -> type:
    """The streaming response of a completion (Starlette's, Ray and Starlette imported only by the server)."""
    from ray.exceptions import TaskCancelledError
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """Ends when the caller leaves, also when Ray Serve tells so with an error from receive (its call to the
        proxy was cancelled) instead of a disconnect message: raised, the error became a traceback in the log."""

        async def listen_for_disconnect(self, receive) -> None:
            with contextlib.suppress(TaskCancelledError):
                await super().listen_for_disconnect(receive)

    return EventStream


def deployment(max_ongoing: int, max_batch_rows: int, batch_wait: float):
    """The Ray Serve deployment class (Ray and FastAPI imported only by the server)."""
    from fastapi import FastAPI, Request
    from ray import serve
    from starlette.responses import JSONResponse, Response

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    pace = Pace(batch_wait, max_batch_rows)  # each replica has its copy (the class is pickled with it)

    @serve.deployment(max_ongoing_requests=max_ongoing, health_check_period_s=5)
    @serve.ingress(app)
    class Deployment:
        def __init__(self, settings_json: str):
            self.engine = Engine(EngineSettings.from_json(settings_json))
            self.pace = pace
            self.following = asyncio.get_event_loop().create_task(self.engine.follow())

        @serve.batch(
            max_batch_size=max_batch_rows,
            batch_wait_timeout_s=0.0,
            batch_size_fn=lambda jobs: pace.size(sum(len(job.rows) for job in jobs)),
        )
        async def batched(self, jobs: list[Job]) -> list[Job]:
            began = time.monotonic()
            self.pace.started([id(job) for job in jobs], began)
            try:
                return await self.engine.run_batch(jobs)
            finally:
                self.pace.ended(time.monotonic() - began)

        def enqueue(self, job: Job) -> asyncio.Future:
            """Hand the job to Ray Serve's batcher, which reads the wait when a batch's first request comes."""
            self.pace.queued(id(job), len(job.rows), time.monotonic())
            self.batched.set_batch_wait_timeout_s(self.pace.wait(time.monotonic()))
            self.engine.metrics.queue.inc()
            return asyncio.ensure_future(self.batched(job))

        def left(self, job: Job | None) -> None:
            """The caller is done: a job that never reached a batch leaves the queue."""
            if job is not None and job.version is None:
                self.pace.gone(id(job))
                self.engine.metrics.queue.dec()
            self.engine.release(job)

        @app.post(COMPLETIONS)
        async def completions(self, request: Request) -> Response:
            arrived, engine = time.monotonic(), self.engine
            try:
                engine.admit()
            except ApiError as busy:
                return self._answered(refusal(busy), arrived)
            job, streaming = None, False
            try:
                completion = await engine.read(request)
                job = engine.job_of(completion, arrived)
                running = self.enqueue(job)
                job.task = running  # kept: the batch goes on for the others if this caller leaves
                if completion.stream:
                    await batch_started(job, running)  # the version is known: it goes in the headers
                    streaming = True  # the stream releases the job when it ends
                    return event_stream()(
                        self._stream(job, completion, arrived),
                        media_type="text/event-stream",
                        headers={VERSION_HEADER: job.version},
                    )
                await running
                late = timed_out(job, engine.limits)
                if late:
                    return self._answered(refusal(late), arrived)
                body = answer(new_id(), engine.model_field(job), job.rows, completion.n)
                return self._answered(JSONResponse(body, headers={VERSION_HEADER: job.version}), arrived)
            except ApiError as refused:
                return self._answered(refusal(refused), arrived)
            finally:
                if not streaming:
                    self.left(job)

        async def _stream(self, job: Job, completion: Completion, arrived: float):
            engine, request_id = self.engine, new_id()
            model = engine.model_field(job)
            try:
                while True:
                    await job.changed.wait()
                    job.changed.clear()
                    finished = job.finished
                    choices = []
                    for index, row in enumerate(job.rows):
                        text = row.ready_text()
                        if text or (finished and row.finish_reason != "timeout"):
                            reason = row.finish_reason if finished else None
                            choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
                    if choices:
                        yield chunk(request_id, model, choices)
                    if finished:
                        break
                late = timed_out(job, engine.limits)
                if late:
                    yield b"data: " + late.body() + b"\n\n"
                elif completion.include_usage:
                    yield chunk(request_id, model, [], usage(job.rows, completion.n))
                yield DONE
                engine.metrics.requests.labels("200").inc()
                engine.metrics.latency.observe(time.monotonic() - arrived)
            finally:
                engine.release(job)

        def _answered(self, response: Response, arrived: float) -> Response:
            self.engine.metrics.requests.labels(str(response.status_code)).inc()
            self.engine.metrics.latency.observe(time.monotonic() - arrived)
            return response

        @app.get(MODELS)
        async def models(self) -> Response:
            settings, served = self.engine.settings, self.engine.served
            entry = {
                "id": settings.name,
                "object": "model",
                "created": 0,
                "owned_by": "gpt2-pipeline",
                "version": served.version,
            }
            return JSONResponse({"object": "list", "data": [entry]}, headers={VERSION_HEADER: served.version})

        @app.get("/health")
        async def health(self) -> Response:
            served = self.engine.served
            return JSONResponse(
                {"status": "ok", "model": self.engine.settings.name, "version": served.version},
                headers={VERSION_HEADER: served.version},
            )

        @app.get("/metrics")
        async def metrics(self) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(self.engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

        @app.post(INVOCATIONS)
        async def invocations(self) -> Response:
            message = (
                f"POST {INVOCATIONS} is MLflow's scoring API; this server speaks OpenAI's POST {COMPLETIONS} "
                "(serve-model --api mlflow serves the MLflow API)"
            )
            return refusal(ApiError(404, message, code="not_found"))

        def __del__(self):
            self.engine.stopping.set()

    return Deployment


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_server(settings: EngineSettings, host: str, port: int, replicas: int, ray_address: str | None) -> None:
    """Serve until SIGTERM or Ctrl-C: Ray Serve on a Ray of this machine's own, or on the cluster at ray_address."""
    import os
    import signal

    import ray
    from ray import serve

    from tasks.tracking import store

    uri = store.tracking_uri()
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    own = ray_address is None
    cpus = os.cpu_count() or 1
    # On a Ray of its own the replicas share this machine's cores but one, left to Ray Serve's HTTP proxy (measured
    # faster on 2 cores than letting torch take both); on a cluster each takes one core of a node.
    per_replica = max((cpus - 1) // replicas, 1) if own else 1
    settings = EngineSettings(**{**settings.__dict__, "threads": per_replica})
    runtime_env: dict[str, Any] = {"env_vars": env}
    if not own:  # the nodes run this copy of the code, whatever they have installed
        import flows
        import tasks

        runtime_env["py_modules"] = [flows, tasks]
    ray.init(
        address=ray_address,
        num_cpus=cpus if own else None,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )
    # A supervisor's SIGTERM ends it as Ctrl-C does, also when started in the background (`&`, nohup), where SIGINT
    # comes ignored and Python's own handler is not there to copy.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}  # no access log: a path may hold a secret
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
        rows = settings.limits.max_concurrent
        app = deployment(rows + settings.limits.max_queue + 1, rows, settings.batch_wait_seconds)
        served = app.options(num_replicas=replicas, ray_actor_options={"num_cpus": per_replica}, logging_config=quiet)
        serve.run(served.bind(settings.as_json()), name=APP, route_prefix="/", blocking=False)
        where = f"models:/{settings.name}" + (f"@{settings.alias}" if settings.alias else f"/{settings.version}")
        print(f"serving {where} from {store.shown_uri()} at http://{host}:{port}{COMPLETIONS}", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if not own:  # the cluster stays; the replicas go. A Ray of its own goes whole with ray.shutdown.
            serve.delete(APP)
        ray.shutdown()
