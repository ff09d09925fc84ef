"""Benchmark of the Label Studio backend over real HTTP.

The backend runs as its own process (``python -m labelstudio_backend``, as in
production; a client in the server's process would measure GIL hand-offs
instead). Images come from a stand-in for Label Studio's ``/data/upload``.
Measured in one run, on the same images:

1. per-click latency through HTTP with the image already embedded, against the
   predictor alone on the same image (``predictor.predict`` on cached features,
   in this process);
2. the server's own overhead (HTTP + JSON + prompt + result building / RLE) at
   1024x1024 and 4000x3000 = HTTP p50 - predictor p50, with its parts timed
   alone (request parsing, result building with RLE, answer JSON);
3. concurrent annotators: C clients x N clicks, each on its own image: errors,
   p50/p95 latency, throughput, and the server process's peak RSS;
4. repeat clicks on an embedded image alone and while B pre-annotation batches
   of T tasks run (clicks go before batch work on the device): p50 ratio.

Uses a tiny random model by default (``--model tiny``); pass an artifact with
``--model path/to/model.safetensors`` (and ``--device cuda``) for real figures.
Prints its figures; the last line is one JSON object.

    .venv/bin/python bench/backend.py [--model tiny|PATH] [--device cpu|cuda] [--clicks 50]
                                      [--clients 8] [--clicks-per-client 50] [--sizes 1024x1024,4000x3000]
                                      [--batches 2] [--batch-tasks 20]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import BackendProcess  # noqa: E402  (bench/ is the script's folder)

FIXTURES = REPO / "tests" / "backend" / "fixtures" / "label_studio"
TOKEN = "bench-token"


def http_client(base_url: str) -> Any:
    """An HTTP client with TCP_NODELAY, as Label Studio's (requests/urllib3) has."""
    import httpx

    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=base_url, timeout=300, transport=transport)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {"n": 0}
    return {"n": int(ms.size), "p50": round(float(np.percentile(ms, 50)), 3),
            "p95": round(float(np.percentile(ms, 95)), 3), "mean": round(float(ms.mean()), 3)}


def make_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth image with a few bright blobs (compresses well even at 4000x3000)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (xx / width * 120).astype(np.uint8)
    img[..., 2] = (yy / height * 120).astype(np.uint8)
    for _ in range(4):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        r = rng.uniform(0.05, 0.2) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(100, 255, 3)
    return img


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ImageServer:
    """Stands in for Label Studio's /data/upload (checks the token like Label Studio does)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = files.get(self.path) if self.headers.get("Authorization") == f"Token {TOKEN}" else None
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes) -> str:
        path = f"/data/upload/1/{name}"
        self.files[path] = data
        return path


def click_body(template: dict[str, Any], image_path: str, width: int, height: int, x: float, y: float) -> dict[str, Any]:
    """The recorded interactive payload, pointed at another image and click position (percent)."""
    body = copy.deepcopy(template)
    body["tasks"][0]["data"]["image"] = image_path
    body["tasks"][0]["predictions"] = []  # the size of a fresh task's request
    region = body["params"]["context"]["result"][0]
    region.update(original_width=width, original_height=height)
    region["value"].update(x=x, y=y)
    return body


def build_model(model: str, workdir: Path) -> Path:
    if model != "tiny":
        return Path(model).resolve()
    from ovsam.artifact import save_artifact
    from ovsam.random_model import build_random

    art = build_random("tiny", ["cat", "dog", "car"], 0, "tiny-bench", cache_dir=workdir / "vocab")
    return save_artifact(workdir / "tiny-bench.safetensors", art.model, art.vocabulary, art.version,
                         text_encoder=art.text_encoder)


class LocalPredictor:
    """The predictor alone, on this process's copy of the same model, for the comparison."""

    def __init__(self, artifact: Path, device: str, label_config: str) -> None:
        from labelstudio_io.label_config import parse_label_config
        from ovsam.artifact import load_artifact
        from ovsam.predictor import OVSAMPredictor
        from ovsam.vocabulary import artifact_vocabulary

        loaded = load_artifact(artifact)
        self.schema = parse_label_config(label_config)
        vocabulary = artifact_vocabulary(loaded, self.schema.labels, self.schema.synonyms)  # as the server builds it
        self.predictor = OVSAMPredictor(loaded.model, vocabulary, cache_bytes=4 << 30, device=device)


def single_size(http: Any, local: LocalPredictor, images: ImageServer, template: dict[str, Any],
                width: int, height: int, clicks: int) -> dict[str, Any]:
    """HTTP click vs predictor alone vs the server's parts, at one image size."""
    from labelstudio_io.results import schema_mask_result

    image = make_image(width, height, seed=width)
    path = images.add(f"bench-{width}x{height}.png", png(image))
    rng = np.random.default_rng(0)
    positions = [(float(rng.uniform(10, 90)), float(rng.uniform(10, 90))) for _ in range(clicks)]
    encoded = [json.dumps(click_body(template, path, width, height, x, y)).encode() for x, y in positions]
    http.post("/predict", content=encoded[0], headers={"Content-Type": "application/json"}).raise_for_status()

    feats = local.predictor.set_image(image)
    http_s, predictor_s, build_s, answer_json_s, parse_s = [], [], [], [], []
    answers: list[bytes] = []
    for (x, y), data in zip(positions, encoded):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        r = http.post("/predict", content=data, headers={"Content-Type": "application/json"})
        http_s.append(time.perf_counter() - t)
        r.raise_for_status()
        answers.append(r.content)
        t = time.perf_counter()
        pred = local.predictor.predict(points=[[x / 100 * width, y / 100 * height]], point_labels=[1], top_k=5,
                                       features=feats)
        predictor_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        region = schema_mask_result(local.schema, pred.mask, pred.label, pred.score, {"top_k": []})
        build_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        json.dumps({"results": [{"result": [region] if region else []}]})
        answer_json_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        json.loads(data)
        parse_s.append(time.perf_counter() - t)
    out = {
        "size": f"{width}x{height}",
        "http_click_ms": percentiles(http_s),
        "predictor_ms": percentiles(predictor_s),
        "parts_ms": {"request_json_parse": percentiles(parse_s)["p50"],
                     "result_build_with_rle": percentiles(build_s)["p50"],
                     "answer_json": percentiles(answer_json_s)["p50"]},
        "answer_bytes_p50": int(np.median([len(a) for a in answers])),
    }
    out["server_overhead_ms"] = round(out["http_click_ms"]["p50"] - out["predictor_ms"]["p50"], 3)
    return out


def concurrent_annotators(url: str, images: ImageServer, template: dict[str, Any], clients: int, clicks: int,
                          width: int = 1024, height: int = 768) -> dict[str, Any]:
    paths = [images.add(f"annotator-{i}.png", png(make_image(width, height, seed=100 + i))) for i in range(clients)]
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def annotator(i: int) -> None:
        rng = np.random.default_rng(i)
        with http_client(url) as http:
            for _ in range(clicks):
                body = click_body(template, paths[i], width, height, float(rng.uniform(5, 95)), float(rng.uniform(5, 95)))
                t = time.perf_counter()
                try:
                    r = http.post("/predict", json=body)
                    ok = r.status_code == 200 and len(r.json()["results"]) == 1
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except Exception as exc:  # a bench counts every failure
                    problem = repr(exc)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if problem:
                        errors.append(problem)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(annotator, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "clicks_per_client": clicks, "image": f"{width}x{height}", "errors": len(errors),
            "first_errors": errors[:3], "latency_ms": percentiles(latencies),
            "clicks_per_s": round(len(latencies) / wall, 2)}


def clicks_during_batches(url: str, images: ImageServer, template: dict[str, Any], batch_template: dict[str, Any],
                          batches: int, batch_tasks: int, clicks: int, width: int = 640, height: int = 480
                          ) -> dict[str, Any]:
    """Repeat clicks on an embedded image, alone and while ``batches`` pre-annotation requests run (one run)."""
    path = images.add("annotator-batches.png", png(make_image(width, height, seed=7)))
    batch_paths = [images.add(f"batch-{i}.png", png(make_image(width, height, seed=500 + i)))
                   for i in range(batches * batch_tasks)]
    rng = np.random.default_rng(0)

    def click_latencies(http: Any, n: int) -> list[float]:
        out = []
        for _ in range(n):
            body = click_body(template, path, width, height, float(rng.uniform(5, 95)), float(rng.uniform(5, 95)))
            t = time.perf_counter()
            r = http.post("/predict", json=body)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"click failed: HTTP {r.status_code}: {r.text[:200]}")
        return out

    def batch(i: int) -> float:
        body = copy.deepcopy(batch_template)
        task = body["tasks"][0]
        body["tasks"] = [{**copy.deepcopy(task), "id": 1000 + j, "data": {"image": p}}
                         for j, p in enumerate(batch_paths[i * batch_tasks:(i + 1) * batch_tasks])]
        t = time.perf_counter()
        with http_client(url) as http:
            r = http.post("/predict", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"batch failed: HTTP {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t

    with http_client(url) as http:
        click_latencies(http, 1)  # embeds the image
        alone = click_latencies(http, clicks)
        with ThreadPoolExecutor(batches) as pool:
            running = [pool.submit(batch, i) for i in range(batches)]
            time.sleep(0.5)
            during = click_latencies(http, clicks)
            overlapped = sum(not f.done() for f in running)
            batch_s = [f.result() for f in running]
    p_alone, p_during = percentiles(alone), percentiles(during)
    return {"batches": batches, "tasks_per_batch": batch_tasks, "clicks": clicks, "image": f"{width}x{height}",
            "click_alone_ms": p_alone, "click_during_batches_ms": p_during,
            "p50_ratio": round(p_during["p50"] / p_alone["p50"], 2) if p_alone["p50"] else None,
            "batches_still_running_after_clicks": overlapped, "batch_s": [round(b, 2) for b in batch_s]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random weights, default) or a model artifact path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clicks", type=int, default=50, help="clicks per image size")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--clicks-per-client", type=int, default=50)
    parser.add_argument("--sizes", default="1024x1024,4000x3000")
    parser.add_argument("--batches", type=int, default=2, help="pre-annotation requests running during the clicks")
    parser.add_argument("--batch-tasks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the server and the local predictor (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    images = ImageServer()
    artifact = build_model(args.model, workdir)
    env = {"LABEL_STUDIO_URL": images.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(workdir / "models"),
           "OVSAM_CHECKPOINT": str(artifact), "DEVICE": args.device, "LOG_LEVEL": "WARNING",
           "OVSAM_CACHE_DIR": str(workdir / "cache")}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    template = json.loads((FIXTURES / "predict_interactive_keypoint.json").read_text())["body"]
    local = LocalPredictor(artifact, args.device, template["label_config"])
    server = BackendProcess(env, workdir / "backend.log")
    report: dict[str, Any] = {"model": args.model, "device": args.device, "threads": args.threads}
    try:
        with http_client(server.url) as http:
            report["model_version"] = http.get("/health").json()["model_version"]
            report["single_click"] = []
            for spec in args.sizes.split(","):
                w, h = (int(v) for v in spec.lower().split("x"))
                res = single_size(http, local, images, template, w, h, args.clicks)
                report["single_click"].append(res)
                print(f"[{res['size']}] HTTP click p50 {res['http_click_ms']['p50']} ms (p95 {res['http_click_ms']['p95']}), "
                      f"predictor alone p50 {res['predictor_ms']['p50']} ms -> server overhead "
                      f"{res['server_overhead_ms']} ms; parts p50 {res['parts_ms']}")
            conc = concurrent_annotators(server.url, images, template, args.clients, args.clicks_per_client)
            conc["server_peak_rss_mb"] = server.peak_rss_mb()
            conc["server_metrics"] = http.get("/metrics").json()["requests"].get("POST /predict")
            report["concurrent"] = conc
            batch_template = json.loads((FIXTURES / "predict_batch.json").read_text())["body"]
            mixed = clicks_during_batches(server.url, images, template, batch_template, args.batches,
                                          args.batch_tasks, args.clicks)
            report["clicks_during_batches"] = mixed
            print(f"[batches] repeat click p50 {mixed['click_alone_ms']['p50']} ms alone, "
                  f"{mixed['click_during_batches_ms']['p50']} ms while {mixed['batches']} batches of "
                  f"{mixed['tasks_per_batch']} tasks run (x{mixed['p50_ratio']}; batches still running after the "
                  f"clicks: {mixed['batches_still_running_after_clicks']}; batch times {mixed['batch_s']} s)")
            print(f"[concurrent] {conc['clients']} clients x {conc['clicks_per_client']} clicks on {conc['image']}: "
                  f"errors {conc['errors']}, p50 {conc['latency_ms']['p50']} ms, p95 {conc['latency_ms']['p95']} ms, "
                  f"{conc['clicks_per_s']} clicks/s, server peak RSS {conc['server_peak_rss_mb']} MB")
    finally:
        server.stop()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
