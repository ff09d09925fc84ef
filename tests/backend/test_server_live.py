"""Against a real uvicorn server: concurrency, responsiveness during model work, and the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ovsam.predictor import OVSAMPredictor

REPO = Path(__file__).resolve().parents[2]


def test_health_and_setup_stay_fast_while_the_model_is_busy(
    backend_env: dict[str, str], helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    original = OVSAMPredictor.predict

    def slow_predict(self: OVSAMPredictor, *args: Any, **kwargs: Any) -> Any:
        with self.model_lock:  # hold the device lock, as a long model call does
            entered.set()
            time.sleep(2.5)
            return original(self, *args, **kwargs)

    monkeypatch.setattr(OVSAMPredictor, "predict", slow_predict)
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = helpers.fixture_body("predict_interactive_keypoint")
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(http.post, "/predict", json=body) for _ in range(2)]
            assert entered.wait(20)
            for _ in range(3):
                start = time.perf_counter()
                assert http.get("/health").status_code == 200
                assert time.perf_counter() - start < 1.0
                start = time.perf_counter()
                r = http.post("/setup", json=helpers.fixture_body("setup"))
                assert r.status_code == 200 and r.json()["model_version"] == "tiny-1"
                assert time.perf_counter() - start < 1.0
                start = time.perf_counter()
                assert http.post("/webhook", json=helpers.fixture_body("webhook_annotation_created")).status_code == 200
                assert time.perf_counter() - start < 1.0
            assert not slow[1].done()  # the second click queues behind the first on the device lock
            for future in slow:
                r = future.result()
                assert r.status_code == 200 and len(r.json()["results"][0]["result"]) == 1
        health_ms = http.get("/metrics").json()["requests"]["GET /health"]["latency_ms"]
        assert health_ms["max"] < 1000


def test_concurrent_annotators_on_one_image_embed_it_once(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        fixtures = ["predict_interactive_keypoint", "predict_interactive_keypoints_pos_neg"] * 4
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda name: http.post("/predict", json=helpers.fixture_body(name)), fixtures))
        assert [a.status_code for a in answers] == [200] * 8
        assert all(a.json()["results"][0]["model_version"] == "tiny-1" for a in answers)
        cache = http.get("/health").json()["model"]["embedding_cache"]
        assert cache["entries"] == 1 and cache["misses"] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_starts_with_no_model_configured(tmp_path: Path) -> None:
    """``python -m labelstudio_backend`` on a fresh machine: the offline default, flagged in /health."""
    from labelstudio_backend.runtime import DEFAULT_MODEL_PATH

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OVSAM_CHECKPOINT", "LABEL_STUDIO_URL", "BASIC_AUTH_USER")}
    env.update(MODEL_DIR=str(tmp_path / "models"), OVSAM_CACHE_DIR=str(tmp_path / "cache"), DEVICE="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelstudio_backend", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, "the backend did not answer /health"
        assert health["status"] == "UP"
        expected = "default-demo" if DEFAULT_MODEL_PATH.is_file() else "untrained-tiny"
        assert health["model"]["kind"] == expected
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    if expected == "untrained-tiny":
        assert "WARNING" in output and "UNTRAINED" in output


def test_hot_swap_lets_requests_in_flight_finish_on_the_old_model(
    backend_env: dict[str, str], helpers: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    new_artifact = helpers.save_tiny_artifact(tmp_path / "tiny-2.safetensors", "tiny-2", seed=1)
    entered, release = threading.Event(), threading.Event()
    original = OVSAMPredictor.predict

    def held_predict(self: OVSAMPredictor, *args: Any, **kwargs: Any) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(20)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OVSAMPredictor, "predict", held_predict)
    app = helpers.build_app(backend_env)
    with helpers.live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = helpers.fixture_body("predict_interactive_keypoint")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(http.post, "/predict", json=body)
            assert entered.wait(20)
            runtime = app.state.backend.runtime
            runtime.install_for_project("1", runtime.load_for_swap(new_artifact, "1"))  # what a promoted job does
            assert http.post("/setup", json=helpers.fixture_body("setup")).json()["model_version"] == "tiny-2"
            release.set()
            old = in_flight.result().json()
        assert old["model_version"] == old["results"][0]["model_version"] == "tiny-1"
        assert len(old["results"][0]["result"]) == 1
        new = http.post("/predict", json=body).json()
        assert new["model_version"] == "tiny-2"
        other = http.post("/setup", json={**helpers.fixture_body("setup"), "project": "2.1795380221"}).json()
        assert other["model_version"] == "tiny-1"  # the swap was project 1's
