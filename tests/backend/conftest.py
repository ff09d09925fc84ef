"""Shared fixtures for the backend tests: a tiny model artifact, a fake Label Studio, app clients.

The fake Label Studio serves task images under ``/data/upload/...`` and the
export API, and answers 401 unless the request carries ``Token <API key>``,
like a real one with legacy tokens enabled.
"""

from __future__ import annotations

import copy
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "label_studio"
API_KEY = "test-legacy-token"
# The image URLs of the recorded payloads, served by the fake Label Studio.
DISK_URL = "/data/upload/1/0f341070-e2e_disk.png"
RECT_URL = "/data/upload/1/418fec2e-e2e_rect.png"


def fixture_body(name: str) -> dict[str, Any]:
    """The request body of a recorded Label Studio call (a fresh copy)."""
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text())["body"])


def png_bytes(width: int = 160, height: int = 120, shape: str = "disk", seed: int = 0) -> bytes:
    """A synthetic RGB PNG: a bright disk or rectangle on a noisy dark background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    if shape == "disk":
        inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(width, height) / 3) ** 2
    else:
        inside = (abs(yy - height / 2) < height / 4) & (abs(xx - width / 2) < width / 4)
    img[inside] = (220, 180, 40)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    """A threaded HTTP server standing in for Label Studio's file, export and prediction endpoints."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {
            DISK_URL: (png_bytes(shape="disk"), "image/png"),
            RECT_URL: (png_bytes(shape="rect", seed=1), "image/png"),
        }
        self.export_tasks: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None]] = []
        self.predictions: list[dict[str, Any]] = []  # bodies of POST /api/predictions/ it stored
        self.tasks: list[dict[str, Any]] = []  # the project's tasks for /api/tasks/ (predictions kept in them)
        self.label_config: str | None = None  # the project's label config for /api/projects/<id>/
        self.before_post: Callable[[dict[str, Any]], None] | None = None  # runs before a prediction is stored
        self.export_status = 200  # what the export answers (500: a failing Label Studio)
        self.holds: dict[str, threading.Event] = {}  # GETs of paths with these prefixes wait for the event
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                auth = self.headers.get("Authorization")
                fake.requests.append((self.path, auth))
                if auth != f"Token {API_KEY}":
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}', "application/json")
                path = self.path.split("?", 1)[0]
                for prefix, event in list(fake.holds.items()):
                    if path.startswith(prefix):
                        event.wait(120)
                if path.startswith("/api/projects/") and path.endswith("/export"):
                    if fake.export_status != 200:
                        return self._send(fake.export_status, b'{"detail": "export failed"}', "application/json")
                    return self._send(200, json.dumps(fake.export_tasks).encode(), "application/json")
                if path.startswith("/api/projects/") and fake.label_config is not None:
                    return self._send(200, json.dumps({"id": 1, "label_config": fake.label_config}).encode(),
                                      "application/json")
                if path == "/api/tasks/":
                    return self._task_page()
                if path in fake.files:
                    body, content_type = fake.files[path]
                    return self._send(200, body, content_type)
                return self._send(404, b"not found", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                auth = self.headers.get("Authorization")
                fake.requests.append((self.path, auth))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if auth != f"Token {API_KEY}":
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}', "application/json")
                if self.path == "/api/predictions/":
                    prediction = json.loads(body)
                    if not isinstance(prediction.get("task"), int) or not isinstance(prediction.get("result"), list):
                        return self._send(400, b'{"task": ["required"]}', "application/json")
                    if fake.before_post is not None:
                        fake.before_post(prediction)
                    fake.predictions.append(prediction)
                    for task in fake.tasks:
                        if task["id"] == prediction["task"]:
                            task.setdefault("predictions", []).append(prediction)
                    return self._send(201, json.dumps({"id": len(fake.predictions), **prediction}).encode(), "application/json")
                return self._send(404, b"not found", "text/plain")

            def _task_page(self) -> None:
                """Label Studio's paged task list: ``{"tasks": [...], "total": N}``, 404 past the last page."""
                from urllib.parse import parse_qs, urlsplit

                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
                chunk = fake.tasks[(page - 1) * size: page * size]
                if page > 1 and not chunk:
                    return self._send(404, b'{"detail": "Invalid page."}', "application/json")
                body = {"tasks": chunk, "total": len(fake.tasks)}
                return self._send(200, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def image_requests(self) -> list[str]:
        return [path for path, _ in self.requests if path.startswith("/data/")]

    def __enter__(self) -> "FakeLabelStudio":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.export_status = 500  # a job still waiting on a hold ends quickly instead of training
        for event in self.holds.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def vocab_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep text-embedding caches out of the home directory."""
    path = tmp_path_factory.mktemp("ovsam-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVSAM_CACHE_DIR", str(path))
        yield path


def save_tiny_artifact(path: Path, version: str, seed: int = 0, labels: tuple[str, ...] = ("cat", "dog", "car")) -> Path:
    """A tiny OVSAM artifact with random (seeded) weights and its own text tower."""
    from ovsam.artifact import save_artifact
    from ovsam.random_model import build_random

    art = build_random("tiny", labels, seed, version, cache_dir=path.parent / ".vocab")
    return save_artifact(path, art.model, art.vocabulary, version, text_encoder=art.text_encoder)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, vocab_cache_dir: Path) -> Path:
    return save_tiny_artifact(tmp_path_factory.mktemp("artifacts") / "tiny-1.safetensors", "tiny-1")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small synthetic labelled data set (Label Studio export with relative image paths, its label config)."""
    from training.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(SynthConfig(out=root, num_images=3, width=128, height=128, seed=0), progress=False)
    return {"root": root, "tasks": json.loads((root / "tasks.json").read_text()),
            "config": (root / "label_config.xml").read_text()}


# Training jobs of the tests: one step, one evaluation mode, and a gate that promotes (tolerance 1).
FAST_TRAINING = {"epochs": 1, "max_steps": 1, "eval_prompts": ["box"], "tensorboard": False, "val_fraction": 0.34,
                 "gate_tolerance": 1.0}


@pytest.fixture
def training_env(backend_env: dict[str, str], synth_data: dict[str, Any], fake_ls: "FakeLabelStudio",
                 tmp_path: Path) -> dict[str, str]:
    """A backend whose START_TRAINING jobs really train (in their child process) on the synthetic export."""
    fake_ls.export_tasks = copy.deepcopy(synth_data["tasks"])
    options = {**FAST_TRAINING, "cache_dir": str(tmp_path / "vocab-cache")}
    return {**backend_env, "LOCAL_FILES_DOCUMENT_ROOT": str(synth_data["root"]), "TRAINING_OPTIONS": json.dumps(options)}


def train_body(project: int, label_config: str) -> dict[str, Any]:
    """Label Studio's START_TRAINING webhook for a project (its body carries the project object only)."""
    body = fixture_body("train")
    body["project"] = {**body["project"], "id": project, "label_config": label_config}
    return body


def for_project(body: dict[str, Any], project: int) -> dict[str, Any]:
    """A recorded /setup or /predict body, as Label Studio sends it for another project."""
    body = copy.deepcopy(body)
    body["project"] = f"{project}.1795380221"
    for task in body.get("tasks") or []:
        task["project"] = project
    return body


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio() as ls:
        yield ls


@pytest.fixture
def backend_env(tiny_artifact: Path, fake_ls: FakeLabelStudio, tmp_path: Path) -> dict[str, str]:
    """Environment of a backend that serves ``tiny-1`` and reads images from the fake Label Studio."""
    return {
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": API_KEY,
        "MODEL_DIR": str(tmp_path / "models"),
        "OVSAM_CHECKPOINT": str(tiny_artifact),
        "DEVICE": "cpu",
        "ENCODER_RUNTIME": "torch",  # no background export racing the tests (test_encoder_runtime covers onnx)
        "LOG_LEVEL": "INFO",
        "PREANNOTATION_THRESHOLD": "0",
        "AUTO_POINTS_PER_SIDE": "4",
        "EMBEDDING_CACHE_MB": "64",
    }


def build_app(env: dict[str, str]) -> Any:
    from labelstudio_backend.config import Settings
    from labelstudio_io.images import ImageLoaderConfig
    from labelstudio_backend.server import create_app

    return create_app(Settings.from_env(env), image_config=ImageLoaderConfig.from_env(env))


@pytest.fixture
def make_client(backend_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    """``make_client(**env_overrides)`` -> a started TestClient (closed after the test)."""
    from fastapi.testclient import TestClient

    clients: list[Any] = []

    def make(**overrides: str) -> Any:
        client = TestClient(build_app({**backend_env, **overrides}), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    return make_client()


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def helpers() -> Any:
    """The helper functions above, for test modules (conftest cannot be imported under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        fixture_body=fixture_body,
        png_bytes=png_bytes,
        save_tiny_artifact=save_tiny_artifact,
        build_app=build_app,
        live_server=live_server,
        wait_for=wait_for,
        train_body=train_body,
        for_project=for_project,
        API_KEY=API_KEY,
        DISK_URL=DISK_URL,
        RECT_URL=RECT_URL,
    )
