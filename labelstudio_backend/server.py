"""The HTTP server: Label Studio's ML backend protocol on FastAPI.

Label Studio gives ``/health`` 1 s and ``/setup`` 3 s and treats a slower
backend as broken, so those two never wait for the model: prediction and
vocabulary work run in a dedicated thread pool (and queue on the per-device
model lock there), while ``/health`` reads plain references and ``/setup``
parses the label config (cached) in Starlette's own thread pool within a 2 s
budget. ``/predict`` runs on lanes: clicks, batches and image downloads each on
threads of their own, text embeddings on the runtime's vocabulary thread, waits
in between held by no thread. Training runs in background jobs (``jobs.py``).

Errors are always JSON ``{"errors": [...]}``: 400 for a body that is not the
protocol's shape, 422 for input the model cannot use, 401 without the
configured basic auth, 413 for a body over ``MAX_REQUEST_MB`` (announced or
chunked: reading stops at the limit), 408 for a body that has not arrived
within ``REQUEST_BODY_TIMEOUT_S``, and 500 (still JSON) only for a bug.

``/health``, ``/metrics``, ``/versions`` and ``/jobs`` are open to whoever
reaches the port unless basic auth is configured, so without it they name
files, not paths (``public_view``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labelstudio_io.images import ImageLoader, ImageLoaderConfig
from labelstudio_io.label_config import cache_stats as label_config_cache_stats
from labelstudio_io.label_config import set_cache_limit as set_label_config_cache_limit

from .config import Settings
from .job_store import JobStore
from .jobs import JobManager
from .metrics_log import Metrics, configure_logging
from .model import OVSAMBackend, PredictPlan, RequestError, project_id_of
from .public_view import without_paths
from .registry import ModelRegistry
from .runtime import ModelRuntime

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _errors(status: int, *messages: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": list(messages)}, status_code=status, headers=dict(headers or {}))


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


# Methods counted by name in /metrics; any other (a client's invention) counts as OTHER.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Answers that leave part of the body unread close the connection instead of reading on.
_CLOSE = {"Connection": "close"}


class _BodyRefused(Exception):
    """Raised by the guarded ``receive`` when the body breaks a limit; ``_Guard`` answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Guard:
    """ASGI middleware: basic auth, request-body budget, and per-endpoint metrics for every request.

    The body budget is enforced on what is actually received, not only on the
    announced ``Content-Length``: a chunked body is cut off at ``MAX_REQUEST_MB``
    (413), and the whole body must arrive within ``REQUEST_BODY_TIMEOUT_S``
    (408), so a client sending less than it announced cannot hold a worker.
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.auth = settings.basic_auth
        self.max_bytes = settings.max_request_bytes
        self.body_timeout_s = settings.request_body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            rejection = self._reject(scope)
            if rejection is not None:
                await rejection(scope, receive, send_and_record)
                return
            try:
                await self.app(scope, self._bounded(receive, start + self.body_timeout_s), send_and_record)
            except _BodyRefused as exc:
                log.warning("refused request body (%d): %s", exc.status, exc.message)
                if not started:  # otherwise the answer is cut short, and uvicorn closes the connection
                    await _errors(exc.status, exc.message, headers=_CLOSE)(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.observe(f"{method} {endpoint}", status, time.perf_counter() - start)

    def _bounded(self, receive: Receive, deadline: float) -> Receive:
        """``receive`` that counts body bytes against the limit and the body against its deadline.

        Once the body is complete, calls pass straight through: waiting for the
        client's disconnect afterwards is not bounded by the body deadline.
        """
        received = 0
        complete = False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                raise _BodyRefused(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                        "(REQUEST_BODY_TIMEOUT_S)") from None
            if message["type"] != "http.request":
                complete = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyRefused(413, f"request body is more than the limit of {self.max_bytes} bytes "
                                        "(MAX_REQUEST_MB); stopped reading it")
            complete = not message.get("more_body", False)
            return message

        return bounded_receive

    def _reject(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.auth is not None and not self._authorised(headers.get("authorization", "")):
            return _errors(401, "authentication required (HTTP basic auth)",
                           headers={"WWW-Authenticate": 'Basic realm="ovsam-backend"'})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return _errors(413, f"request body of {length} bytes is more than the limit of "
                                f"{self.max_bytes} bytes (MAX_REQUEST_MB)", headers=_CLOSE)
        return None

    def _authorised(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or self.auth is None:
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        want_user, want_pass = self.auth
        ok_user = secrets.compare_digest(user.encode(), want_user.encode())
        ok_pass = secrets.compare_digest(password.encode(), want_pass.encode())
        return ok_user and ok_pass


def _image_cache_stats(images: ImageLoader) -> dict[str, Any]:
    """Download-cache figures (ImageLoader exposes no stats method, so read its byte LRU)."""
    cache = getattr(images, "_cache", None)
    return {
        "entries": len(cache) if cache is not None else None,
        "bytes": getattr(cache, "size", None),
        "max_bytes": images.config.cache_bytes,
    }


async def _read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:  # the parser recurses per level; Label Studio's bodies are a few levels deep
        raise RequestError(400, "request body is nested too deeply to parse (JSON arrays/objects "
                                "more than about 1000 levels deep)") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _predict_input(data: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any, dict[str, Any] | None]:
    """Shape-check a /predict body: tasks, label config, and the interactive context if any (the project is
    ``data["project"]``)."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RequestError(400, "'tasks' must be a non-empty list of task objects")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise RequestError(400, f"tasks[{i}] must be an object, got {type(task).__name__}")
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        raise RequestError(400, "'params' must be an object")
    context = (params or {}).get("context")
    if context is not None and not isinstance(context, dict):
        raise RequestError(400, "'params.context' must be an object or null")
    return tasks, data.get("label_config"), context


# /setup answers within this, whatever the label config (Label Studio waits 3 s).
_SETUP_BUDGET_S = 2.0
# How often a running batch checks that its client is still connected.
_DISCONNECT_POLL_S = 0.25


def _call_for_project(function: Any, project: str | None) -> Any:
    """``function(project)``; a project id that cannot name a folder is the request's error."""
    try:
        return function(project)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from exc


def _consume_outcome(task: "asyncio.Future[Any]") -> None:
    """Retrieve a background task's exception (it was logged where it happened)."""
    if not task.cancelled():
        task.exception()


async def _await_vocabulary(be: OVSAMBackend, plan: PredictPlan, wait_s: float) -> None:
    """Wait, without holding a thread, for the project's text embeddings; 503 with progress after ``wait_s``."""
    future = be.vocabulary_future(plan)
    if not future.done():
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait_s)
        except asyncio.TimeoutError:
            raise be.vocabulary_pending(plan) from None
        except Exception:
            pass  # use_vocabulary turns the failure into a 503
    be.use_vocabulary(plan, future)


async def _run_batch(
    request: Request,
    loop: asyncio.AbstractEventLoop,
    pool: ThreadPoolExecutor,
    be: OVSAMBackend,
    plan: PredictPlan,
    deadline: float | None,
) -> bytes:
    """Pre-annotation on the batch lane; it stops between tasks once Label Studio has disconnected.

    What is not computed by ``deadline`` (counted from the request's arrival) is posted later by a job.
    """
    gone = threading.Event()

    async def watch() -> None:
        while not gone.is_set():
            if await request.is_disconnected():
                gone.set()
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        return await loop.run_in_executor(pool, lambda: _json_bytes(be.run(plan, gone.is_set, deadline)))
    finally:
        watcher.cancel()


def create_app(settings: Settings | None = None, *, image_config: ImageLoaderConfig | None = None) -> FastAPI:
    """The ASGI app. The model is loaded at start-up (lifespan), before the first request is served.

    ``settings`` and ``image_config`` default to the environment.
    """
    settings = settings or Settings.from_env()
    metrics = Metrics()
    set_label_config_cache_limit(settings.label_config_cache_bytes)
    # Lanes: clicks, batches and image downloads each have their own threads, so none can take all of
    # another's (a slow image host or a long batch never holds a thread a click on an embedded image needs).
    executor = ThreadPoolExecutor(max_workers=settings.predict_workers, thread_name_prefix="predict")
    batches = ThreadPoolExecutor(max_workers=settings.preannotate_workers, thread_name_prefix="preannotate")
    downloads = ThreadPoolExecutor(max_workers=settings.image_download_workers, thread_name_prefix="download")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        runtime = ModelRuntime(settings, ModelRegistry(settings.model_dir))
        await asyncio.get_running_loop().run_in_executor(executor, runtime.start)
        images = ImageLoader(image_config or ImageLoaderConfig.from_env())
        for warning in images.config.warnings():
            log.warning("%s", warning)
        jobs = JobManager(JobStore(settings.model_dir))  # training job records survive a restart
        app.state.backend = OVSAMBackend(settings, runtime, images, jobs, metrics)
        log.info("ready: serving model %s", app.state.backend.model_version)
        try:
            yield
        finally:
            app.state.backend.close()
            runtime.close()
            for pool in (executor, batches, downloads):
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="OVSAM Label Studio ML backend", lifespan=lifespan)
    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    def backend(request: Request) -> OVSAMBackend:
        return request.app.state.backend

    # -- errors ----------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        log.warning("rejected request (%d): %s", exc.status, "; ".join(exc.messages))
        return _errors(exc.status, *exc.messages)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _errors(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _errors(422, *[f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()])

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        metrics.record_error(f"internal error in {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return _errors(500, f"internal error: {type(exc).__name__}: {exc}")

    def public(payload: dict[str, Any]) -> dict[str, Any]:
        """/health, /metrics, /versions and /jobs name files, not paths, unless callers must authenticate."""
        return payload if settings.basic_auth is not None else without_paths(payload)

    # -- endpoints -------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"])
    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health(request: Request) -> dict[str, Any]:
        be = backend(request)
        serving = be.runtime.current
        problems = dict(be.runtime.problems)
        # Label Studio only needs a 2xx JSON answer; "status" stays "UP" (the backend serves), and a project whose
        # model had to be repaired shows as model_status "degraded" with the reasons.
        return public({
            "status": "UP",
            "model_status": "degraded" if problems else "ok",
            "problems": [{"project": p, "reason": r} for p, r in problems.items()],
            "model_class": "OVSAMBackend",
            "model_version": serving.version,
            "model": serving.describe(),
            "projects": await run_in_threadpool(be.runtime.served_versions),
            "loaded_projects": be.runtime.loaded_projects(),
            "jobs": be.jobs.summary(),
            "errors": metrics.errors_summary(),  # failures no answer shows; the list is in /metrics
        })

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        """Answers within Label Studio's 3 s: a config still being read after the budget is answered "ok"."""
        data = await _read_json(request)
        be = backend(request)
        task = asyncio.ensure_future(run_in_threadpool(be.setup, data))
        try:
            return await asyncio.wait_for(asyncio.shield(task), _SETUP_BUDGET_S)
        except asyncio.TimeoutError:
            task.add_done_callback(_consume_outcome)
            log.warning("/setup: the label config is still being read after %.1f s; answering now", _SETUP_BUDGET_S)
            pid = project_id_of(data.get("project"))
            return {"model_version": be.runtime.project_version(pid, load_unreadable=False), "status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        budget = settings.predict_batch_budget_s
        deadline = time.monotonic() + budget if budget > 0 else None  # counted from the request's arrival
        body = await _read_json(request)
        tasks, label_config, context = _predict_input(body)
        be = backend(request)
        loop = asyncio.get_running_loop()
        plan = await run_in_threadpool(be.plan, tasks, label_config, context, body.get("project"))
        await _await_vocabulary(be, plan, settings.vocabulary_wait_s)
        if plan.interactive:
            if plan.needs_image:
                await loop.run_in_executor(downloads, be.load_image, plan)
            content = await loop.run_in_executor(executor, lambda: _json_bytes(be.run(plan)))
        else:
            content = await _run_batch(request, loop, batches, be, plan, deadline)
        return Response(content, media_type="application/json")

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        data = await _read_json(request)
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise RequestError(400, "webhook body needs an 'action' string")
        return await run_in_threadpool(backend(request).fit, action, data)

    @app.post("/train")
    async def train(request: Request) -> dict[str, Any]:
        """Label Studio's legacy training call (feature flag off): annotations come in the body.

        Off unless LEGACY_TRAIN=true: the annotations are whatever the caller sends, and the model it trains
        would be promoted; START_TRAINING (the webhook) exports them from Label Studio instead.
        """
        if not settings.legacy_train:
            raise RequestError(404, "POST /train is disabled (LEGACY_TRAIN=false): Label Studio 1.23 sends "
                                    "START_TRAINING to /webhook; set LEGACY_TRAIN=true for older versions")
        data = await _read_json(request)
        tasks = data.get("annotations")
        project_id = project_id_of(data.get("project"))
        if not isinstance(tasks, list) or project_id is None:
            raise RequestError(400, "/train needs 'annotations' (a list) and 'project'")
        return await run_in_threadpool(backend(request).start_training, project_id, data.get("label_config"), tasks)

    @app.get("/versions")
    async def versions(request: Request, project: str | None = None) -> dict[str, Any]:
        """``?project=<id>``: the base and that project's versions, ``current`` the one it serves. Label Studio
        sends no project (its GET has no body), so without it: the base and every project's versions."""
        be = backend(request)
        runtime = be.runtime
        pid = project_id_of(project)
        infos = await run_in_threadpool(_call_for_project, runtime.versions, pid)
        current = await run_in_threadpool(be.project_version, pid)
        return public({
            "versions": [v.version for v in infos],
            "current": current,
            "project": pid,
            "projects": await run_in_threadpool(runtime.served_versions),
            "details": [v.to_json() for v in infos],
        })

    @app.get("/jobs")
    async def jobs(request: Request, project: str | None = None) -> dict[str, Any]:
        return public({"jobs": [j.to_json() for j in backend(request).jobs.list(project_id_of(project))]})

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> dict[str, Any]:
        found = backend(request).jobs.get(job_id)
        if found is None:
            raise RequestError(404, f"no job {job_id!r}")
        return public(found.to_json())

    @app.post("/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        """Stop a prediction job after its current task, or a training job (its process is terminated)."""
        jobs = backend(request).jobs
        found = jobs.get(job_id)
        if found is None:
            raise RequestError(404, f"no job {job_id!r}")
        if not found.cancellable:
            raise RequestError(409, f"job {job_id!r} cannot be cancelled: it has ended ({found.status})")
        jobs.cancel(job_id)
        return public(found.to_json())

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> dict[str, Any]:
        be = backend(request)
        serving = be.runtime.current
        snapshot = metrics.snapshot()
        snapshot.update(
            model_version=serving.version,
            model=serving.describe(),
            image_cache=_image_cache_stats(be.images),
            label_config_cache=label_config_cache_stats(),
            jobs=be.jobs.summary(),
        )
        return public(snapshot)

    return app
