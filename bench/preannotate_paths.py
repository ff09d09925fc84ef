"""The end-to-end pre-annotation paths of ``bench/preannotate.py`` (issue 22 item 5), on the same images.

- **server**: the backend as its own process (``python -m labelstudio_backend``), one Retrieve-Predictions
  ``/predict`` request with every image as a task (``PREDICT_BATCH_BUDGET_S=0``: all answered in the request),
  images served by a stand-in for Label Studio's ``/data/upload``: download, decode, encode, automatic mode,
  regions with brush RLE, JSON.
- **bulk**: what ``python -m labelstudio_backend preannotate`` and the background prediction jobs run,
  ``OVSAMBackend.iter_predictions`` (images downloading while the model works) and ``post_prediction`` to the
  stand-in's ``/api/predictions/``, in this process.

Both report images/s, to be compared with the model-only figure of the same run.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from harness import QuietHandler, serve  # bench/ is the importing script's folder

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "backend" / "fixtures" / "label_studio"
TOKEN = "bench-token"


class FakeLabelStudio:
    """Serves ``/data/upload`` images and stores ``POST /api/predictions/``, checking the token as Label Studio does."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.posted = 0
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = fake.files.get(self.path) if self.headers.get("Authorization") == f"Token {TOKEN}" else None
                self.send(200 if body is not None else 404, body or b"")

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.headers.get("Authorization") == f"Token {TOKEN}" and self.path == "/api/predictions/"
                fake.posted += ok
                self.send(201 if ok else 401, b"{}")

        self.server, self.url = serve(Handler)

    def add_images(self, images: Sequence[np.ndarray]) -> list[str]:
        from PIL import Image

        paths = []
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            path = f"/data/upload/1/bench-{i}.png"
            self.files[path] = buf.getvalue()
            paths.append(path)
        return paths

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def warm_up_image(images: Sequence[np.ndarray]) -> np.ndarray:
    """An image none of the measured ones equals (so none is in the embedding cache), of the same size.

    Every path then measures the very images the model-only figure was measured on: automatic mode's cost
    depends on what is in the image (how many grid masks pass its filters).
    """
    return np.ascontiguousarray(images[0][::-1, ::-1])


def _batch_body(paths: Sequence[str], label_config: str) -> dict[str, Any]:
    template = json.loads((FIXTURES / "predict_batch.json").read_text())["body"]
    body = copy.deepcopy(template)
    task = body["tasks"][0]
    body["tasks"] = [{**copy.deepcopy(task), "id": 1000 + i, "data": {"image": p}} for i, p in enumerate(paths)]
    body["label_config"] = label_config
    return body


def backend_env(model: Path, ls_url: str, workdir: Path, device: str, automatic: dict[str, Any],
                threshold: float, encoder_runtime: str) -> dict[str, str]:
    return {
        "ENCODER_RUNTIME": encoder_runtime,
        "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(workdir / "models"),
        "OVSAM_CHECKPOINT": str(model), "DEVICE": device, "LOG_LEVEL": "WARNING",
        "OVSAM_CACHE_DIR": str(workdir / "cache"), "PREDICT_BATCH_BUDGET_S": "0",
        "PREANNOTATION_THRESHOLD": str(threshold),
        "AUTO_POINTS_PER_SIDE": str(automatic["points_per_side"]),
        "AUTO_STABILITY_THRESHOLD": str(automatic["stability_threshold"]),
        "AUTO_MIN_SUPPORT": str(automatic.get("min_support", 0.5)),
    }


def measure_server_path(model: Path, images: Sequence[np.ndarray], label_config: str, device: str,
                        automatic: dict[str, Any], threshold: float, encoder_runtime: str) -> dict[str, Any]:
    """Images/s through HTTP: one batch ``/predict`` request to the backend process."""
    import httpx

    from harness import BackendProcess

    ls = FakeLabelStudio()
    warm, *paths = ls.add_images([warm_up_image(images), *images])
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        server = BackendProcess(backend_env(model, ls.url, Path(tmp), device, automatic, threshold, encoder_runtime),
                                Path(tmp) / "backend.log")
        try:
            with httpx.Client(base_url=server.url, timeout=3600) as http:
                encoder = _wait_for_encoder(http, encoder_runtime, device)
                http.post("/predict", json=_batch_body([warm], label_config)).raise_for_status()
                start = time.perf_counter()
                r = http.post("/predict", json=_batch_body(paths, label_config))
                seconds = time.perf_counter() - start
                r.raise_for_status()
                answered = sum(isinstance(x, dict) for x in r.json()["results"])
        finally:
            server.stop()
            ls.close()
    return {"server_images_per_s": answered / seconds, "server_seconds": seconds, "server_images": answered,
            "server_image_encoder": encoder}


def _wait_for_encoder(http: Any, encoder_runtime: str, device: str, timeout_s: float = 600.0) -> str:
    """Wait until the backend's start-up export (or load) of the ONNX encoder is done, when it makes one, so the
    measured batch never shares the cores with it; returns the runtime /health reports."""
    from ovsam.encoder_runtime import wants_onnx

    deadline = time.monotonic() + timeout_s
    while True:
        model = http.get("/health").json().get("model") or {}
        runtime = model.get("image_encoder", "")
        if not wants_onnx(encoder_runtime, device) or runtime == "onnx" or time.monotonic() > deadline:
            return runtime
        time.sleep(0.5)


def measure_bulk_path(model: Path, images: Sequence[np.ndarray], label_config: str, device: str,
                      automatic: dict[str, Any], threshold: float, encoder_runtime: str) -> dict[str, Any]:
    """Images/s of the bulk path: iter_predictions (prefetching downloads) and a POST per prediction."""
    import os

    ls = FakeLabelStudio()
    warm, *paths = ls.add_images([warm_up_image(images), *images])
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        env = backend_env(model, ls.url, Path(tmp), device, automatic, threshold, encoder_runtime)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from labelstudio_backend.bulk import post_prediction
            from labelstudio_backend.config import Settings
            from labelstudio_io.images import ImageLoader, ImageLoaderConfig
            from labelstudio_backend.jobs import JobManager
            from labelstudio_backend.metrics_log import Metrics
            from labelstudio_backend.model import OVSAMBackend
            from labelstudio_backend.registry import ModelRegistry
            from labelstudio_backend.runtime import ModelRuntime

            settings = Settings.from_env()
            runtime = ModelRuntime(settings, ModelRegistry(settings.model_dir))
            serving = runtime.start()
            if serving.encoder_setup is not None:  # the start-up export/load of the ONNX encoder: not measured
                serving.encoder_setup.join()
            loader = ImageLoader(ImageLoaderConfig.from_env())
            backend = OVSAMBackend(settings, runtime, loader, JobManager(), Metrics())
            schema = backend.schema(label_config)
            list(backend.iter_predictions([{"id": 1, "data": {"image": warm}, "project": 1}], schema))
            tasks = [{"id": 2000 + i, "data": {"image": p}, "project": 1} for i, p in enumerate(paths)]
            start = time.perf_counter()
            posted = 0
            encoder = serving.predictor.image_encoder.runtime
            for task, outcome in backend.iter_predictions(tasks, schema):
                if not isinstance(outcome, Exception):
                    post_prediction(loader, task["id"], outcome)
                    posted += 1
            seconds = time.perf_counter() - start
            backend.close()
            runtime.close()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            ls.close()
    return {"bulk_images_per_s": posted / seconds, "bulk_seconds": seconds, "bulk_images": posted,
            "bulk_posted": ls.posted, "bulk_image_encoder": encoder}
