"""The HTTP server: Label Studio's ML backend protocol on FastAPI.

Label Studio gives ``/health`` 1 s and ``/setup`` 3 s and treats a slower
backend as broken, so those two never wait for the model: prediction and
vocabulary work run in a dedicated thread pool (and queue on the per-device
model lock there), while ``/health`` reads plain references and ``/setup``
parses the label config (cached) in Starlette's own thread pool. Training runs
in background jobs (``jobs.py``).

Errors are always JSON ``{"errors": [...]}``: 400 for a body that is not the
protocol's shape, 422 for input the model cannot use, 401 without the
configured basic auth, 413 for an oversized body, and 500 (still JSON) only
for a bug.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
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

from .config import Settings
from .images import ImageLoader, ImageLoaderConfig
from .jobs import JobManager
from .metrics_log import Metrics, configure_logging
from .model import OVSAMBackend, RequestError, project_id_of
from .registry import ModelRegistry
from .runtime import ModelRuntime

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _errors(status: int, *messages: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": list(messages)}, status_code=status, headers=dict(headers or {}))


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


class _Guard:
    """ASGI middleware: basic auth, body-size limit, and per-endpoint metrics for every request."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.auth = settings.basic_auth
        self.max_bytes = settings.max_request_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rejection = self._reject(scope)
            if rejection is not None:
                await rejection(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe(f"{scope['method']} {endpoint}", status, time.perf_counter() - start)

    def _reject(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.auth is not None and not self._authorised(headers.get("authorization", "")):
            return _errors(401, "authentication required (HTTP basic auth)",
                           headers={"WWW-Authenticate": 'Basic realm="ovsam-backend"'})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return _errors(413, f"request body of {length} bytes is more than the limit of "
                                f"{self.max_bytes} bytes (MAX_REQUEST_MB)")
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
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _predict_input(data: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any, dict[str, Any] | None]:
    """Shape-check a /predict body: tasks, label config, and the interactive context if any."""
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


def create_app(settings: Settings | None = None, *, image_config: ImageLoaderConfig | None = None) -> FastAPI:
    """The ASGI app. The model is loaded at start-up (lifespan), before the first request is served.

    ``settings`` and ``image_config`` default to the environment.
    """
    settings = settings or Settings.from_env()
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=settings.predict_workers, thread_name_prefix="predict")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        runtime = ModelRuntime(settings, ModelRegistry(settings.model_dir))
        await asyncio.get_running_loop().run_in_executor(executor, runtime.start)
        images = ImageLoader(image_config or ImageLoaderConfig.from_env())
        for warning in images.config.warnings():
            log.warning("%s", warning)
        app.state.backend = OVSAMBackend(settings, runtime, images, JobManager(), metrics)
        log.info("ready: serving model %s", app.state.backend.model_version)
        try:
            yield
        finally:
            app.state.backend.close()
            executor.shutdown(wait=False, cancel_futures=True)

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
        return _errors(500, f"internal error: {type(exc).__name__}: {exc}")

    # -- endpoints -------------------------------------------------------------
    @app.get("/")
    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        be = backend(request)
        serving = be.runtime.current
        return {
            "status": "UP",
            "model_class": "OVSAMBackend",
            "model_version": serving.version,
            "model": serving.describe(),
            "jobs": be.jobs.summary(),
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        data = await _read_json(request)
        be = backend(request)
        out = await run_in_threadpool(be.setup, data)
        if data.get("schema") is not None:
            asyncio.get_running_loop().run_in_executor(executor, be.warm_vocabulary, data["schema"])
        return out

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        tasks, label_config, context = _predict_input(await _read_json(request))

        def work() -> bytes:
            return _json_bytes(backend(request).predict(tasks, label_config, context))

        content = await asyncio.get_running_loop().run_in_executor(executor, work)
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
        """Label Studio's legacy training call (feature flag off): annotations come in the body."""
        data = await _read_json(request)
        tasks = data.get("annotations")
        project_id = project_id_of(data.get("project"))
        if not isinstance(tasks, list) or project_id is None:
            raise RequestError(400, "/train needs 'annotations' (a list) and 'project'")
        return await run_in_threadpool(backend(request).start_training, project_id, data.get("label_config"), tasks)

    @app.get("/versions")
    async def versions(request: Request) -> dict[str, Any]:
        runtime = backend(request).runtime
        infos = await run_in_threadpool(runtime.versions)
        return {
            "versions": [v.version for v in infos],
            "current": runtime.current.version,
            "details": [v.to_json() for v in infos],
        }

    @app.get("/jobs")
    async def jobs(request: Request) -> dict[str, Any]:
        return {"jobs": [j.to_json() for j in backend(request).jobs.list()]}

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> dict[str, Any]:
        found = backend(request).jobs.get(job_id)
        if found is None:
            raise RequestError(404, f"no job {job_id!r}")
        return found.to_json()

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> dict[str, Any]:
        be = backend(request)
        serving = be.runtime.current
        snapshot = metrics.snapshot()
        snapshot.update(
            model_version=serving.version,
            model=serving.describe(),
            image_cache=_image_cache_stats(be.images),
            jobs=be.jobs.summary(),
        )
        return snapshot

    return app
