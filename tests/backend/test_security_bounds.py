"""Issue 24, items 4, 5, 6, 9, 12, 13, 14: what a client can make the server hold, and what it shows.

Each case is sent as an attacker or a careless client would send it: real HTTP
(httpx, or raw sockets where the framing itself is the attack) against the app
running under uvicorn on 127.0.0.1. Memory bounds are asserted structurally
(sizes the server reports or keeps), never by measuring the process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from labelstudio_backend import webhooks
from labelstudio_io import label_config
from labelstudio_backend.metrics_log import Metrics

REPO = Path(__file__).resolve().parents[2]


# -- helpers -------------------------------------------------------------------
def _connect(url: str, timeout: float = 60.0) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _interactive(helpers: Any, fixture: str = "predict_interactive_keypoint", **region: Any) -> dict[str, Any]:
    body = helpers.fixture_body(fixture)
    first = body["params"]["context"]["result"][0]
    value = region.pop("value", None)
    first.update(region)
    if value:
        first["value"].update(value)
    return body


def _config(labels: list[str], padding: str = "") -> str:
    items = "".join(f'<Label value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/><!-- {padding} -->'
            f'<BrushLabels name="tag" toName="image">{items}</BrushLabels></View>')


# -- item 4: the claimed image size ------------------------------------------------
def test_claimed_image_size_is_bounded_by_the_real_image(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        # 30000 x 30000 claimed on a 160 x 120 image: refused before any mask is drawn at that size
        r = http.post("/predict", json=_interactive(helpers, original_width=30000, original_height=30000))
        assert r.status_code == 422, r.text
        message = " ".join(r.json()["errors"])
        assert "30000x30000" in message and "160x120" in message
        # the same aspect ratio, 3 % larger: beyond rounding
        r = http.post("/predict", json=_interactive(helpers, original_width=165, original_height=124))
        assert r.status_code == 422 and "must not exceed" in r.text
        # another aspect ratio at a smaller size
        r = http.post("/predict", json=_interactive(helpers, original_width=160, original_height=60))
        assert r.status_code == 422 and "aspect ratios differ" in r.text
        # a smaller claim with the image's aspect ratio is still served, at the claimed (smaller) size
        r = http.post("/predict", json=_interactive(helpers, original_width=80, original_height=60))
        assert r.status_code == 200, r.text
        region = r.json()["results"][0]["result"][0]
        assert (region["original_width"], region["original_height"]) == (80, 60)
        # off by one pixel (rounding) is fine
        r = http.post("/predict", json=_interactive(helpers, original_width=161, original_height=120))
        assert r.status_code == 200, r.text


# -- item 5: the request body budget ------------------------------------------------
def test_chunked_body_over_the_limit_is_cut_off_with_413(backend_env: dict[str, str], helpers: Any) -> None:
    total = 256 * 1024 * 1024  # what the client would send if nobody stopped it
    env = {**backend_env, "MAX_REQUEST_MB": "0.05"}
    with helpers.live_server(helpers.build_app(env)) as url:
        sock = _connect(url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        sent = 0
        stop = threading.Event()

        def pump() -> None:
            nonlocal sent
            try:
                while sent < total and not stop.is_set():
                    sock.sendall(frame)
                    sent += len(chunk)
            except OSError:  # the server closed the connection: exactly what should happen
                pass

        sender = threading.Thread(target=pump, daemon=True)
        sender.start()
        try:
            status, headers, body = _read_response(sock)
        finally:
            stop.set()
            sender.join(timeout=30)
            sock.close()
        assert status == 413, body
        assert "MAX_REQUEST_MB" in json.loads(body)["errors"][0]
        assert headers.get("connection") == "close"
        print(f"413 after the client had sent {sent} of {total} bytes")
        assert sent < total // 4, f"the server let the client send {sent} bytes"

        with httpx.Client(base_url=url, timeout=30) as http:
            # a small chunked body is still read in full and served
            chunks = iter([json.dumps(helpers.fixture_body("setup")).encode()])
            r = http.post("/setup", content=chunks, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            assert r.request.headers.get("transfer-encoding") == "chunked"
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").json()["requests"]["POST /predict"]["client_errors"] == 1


def test_body_that_never_arrives_gets_408_and_the_connection_is_closed(
    backend_env: dict[str, str], helpers: Any
) -> None:
    env = {**backend_env, "REQUEST_BODY_TIMEOUT_S": "1"}
    with helpers.live_server(helpers.build_app(env)) as url:
        # Content-Length announces 1000 bytes, 11 are sent
        sock = _connect(url)
        start = time.monotonic()
        sock.sendall(b"POST /setup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"project\":")
        status, headers, body = _read_response(sock)
        assert status == 408, body
        assert "REQUEST_BODY_TIMEOUT_S" in json.loads(body)["errors"][0]
        assert time.monotonic() - start < 30
        assert _closed_by_server(sock)
        sock.close()
        # a chunked body whose last chunk never comes
        sock = _connect(url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"tas\r\n")
        status, _, body = _read_response(sock)
        assert status == 408, body
        assert _closed_by_server(sock)
        sock.close()
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200


def test_body_deadline_ends_with_the_body(
    backend_env: dict[str, str], helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model work longer than REQUEST_BODY_TIMEOUT_S is not cut: the deadline is for receiving the body."""
    from ovsam.predictor import OVSAMPredictor

    original = OVSAMPredictor.predict

    def slow_predict(self: OVSAMPredictor, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OVSAMPredictor, "predict", slow_predict)
    env = {**backend_env, "REQUEST_BODY_TIMEOUT_S": "0.5"}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["result"]) == 1


# -- item 6: parsing errors are 4xx ---------------------------------------------------
def test_parser_limits_are_4xx_with_a_message(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        deep = b"[" * 100_000 + b"]" * 100_000
        for path in ("/predict", "/setup", "/webhook"):
            r = http.post(path, content=deep, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            assert "nested too deeply" in r.json()["errors"][0]
        deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
        r = http.post("/predict", content=deep_object, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.text
        # a 400-digit integer coordinate, and image size, as a client can write them in JSON
        for field in ("x", "original_width"):
            body = _interactive(helpers, **({"value": {"x": 123456789}} if field == "x" else {field: 123456789}))
            raw = json.dumps(body).replace("123456789", "9" * 400)
            r = http.post("/predict", content=raw.encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
            assert "finite number" in r.json()["errors"][0] and field in r.json()["errors"][0]
        assert sum(ep["server_errors"] for ep in http.get("/metrics").json()["requests"].values()) == 0


# -- item 9: memory kept for client-chosen data -----------------------------------------
def test_webhook_actions_do_not_grow_the_metrics(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for i in range(30):
            action = f"{i:03d}" + "A" * 100_000
            r = http.post("/webhook", json={"action": action, "project": {"id": 1}})
            assert r.status_code == 200, r.text
            echoed = r.json()["action"]
            assert action.startswith(echoed.removesuffix("...")) and len(echoed) <= webhooks.ECHO_CHARS + 3
        r = http.post("/webhook", json=helpers.fixture_body("webhook_annotation_created"))
        assert r.status_code == 200 and r.json()["action"] == "ANNOTATION_CREATED"
        r = http.post("/webhook", json={"action": "annotation_created", "project": {"id": 1}})  # not LS's spelling
        assert r.status_code == 200
        metrics = http.get("/metrics")
        counters = metrics.json()["counters"]
        webhook_counters = {k: v for k, v in counters.items() if k.startswith("webhook_")}
        assert webhook_counters == {"webhook_unknown": 31, "webhook_annotation_created": 1}
        assert len(metrics.content) < 100_000  # was 3 MB here (and 314 MB with 10 MiB actions)


def test_label_config_cache_is_bounded_in_bytes_of_xml(backend_env: dict[str, str], helpers: Any) -> None:
    limit_mb = 0.25
    env = {**backend_env, "LABEL_CONFIG_CACHE_MB": str(limit_mb)}
    limit = int(limit_mb * 1024 * 1024)
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for i in range(24):  # 24 distinct configs of ~50 kB: 1.2 MB of XML offered
            xml = _config(["cat", "dog"], padding=f"{i} " + "x" * 50_000)
            r = http.post("/setup", json={"project": f"{i}.1", "schema": xml})
            assert r.status_code == 200, r.text
            cache = http.get("/metrics").json()["label_config_cache"]
            assert cache["max_chars"] == limit and cache["chars"] <= limit
        assert cache["entries"] >= 2  # it still caches
        # a config larger than a quarter of the limit is parsed and served, but not kept
        before = cache
        huge = _config(["cat", "dog"], padding="y" * (limit // 4 + 1))
        r = http.post("/setup", json={"project": "99.1", "schema": huge})
        assert r.status_code == 200 and r.json()["labels"] == ["cat", "dog"]
        after = http.get("/metrics").json()["label_config_cache"]
        assert after["chars"] == before["chars"] and after["entries"] == before["entries"]


def test_sized_lru_bounds_by_size_and_evicts_least_recent() -> None:
    from ovsam.cache import SizedLRU

    cache: SizedLRU[str] = SizedLRU(1000, len, max_entry=250)
    for i in range(50):
        cache.put(i, f"{i:03d}" + "x" * 197)  # 200 chars each
        assert cache.size <= 1000
    assert len(cache) == 5
    assert cache.get(49) is not None and cache.get(0) is None
    cache.get(45)  # used: survives the next insertion, 46 does not
    cache.put("new", "n" * 200)
    assert cache.get(45) is not None and cache.get(46) is None
    cache.put("big", "y" * 251)  # over the entry bound: not kept
    assert cache.get("big") is None
    cache.resize(400, max_entry=100)
    assert cache.size <= 400 and len(cache) == 0  # every entry is over the new entry bound


def test_metrics_counters_and_errors_are_bounded() -> None:
    metrics = Metrics()
    for i in range(1000):
        metrics.count(f"name_{i}_" + "z" * 1000)
        metrics.record_error("e" * 10_000, task="t" * 1000, project=i)
    snapshot = metrics.snapshot()
    assert len(snapshot["counters"]) <= 257 and all(len(k) <= 64 for k in snapshot["counters"])
    assert sum(snapshot["counters"].values()) == 1000
    assert len(snapshot["recent_errors"]) == 50 and snapshot["errors_total"] == 1000
    assert all(len(e["message"]) <= 300 and len(e["task"]) <= 64 for e in snapshot["recent_errors"])
    assert snapshot["recent_errors"][-1]["project"] == "999"
    assert metrics.errors_summary()["count"] == 1000


# -- item 12: boxes past the edge ----------------------------------------------------------
def test_smart_box_past_the_edge_is_clipped_not_refused(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        # 3 px past the left edge (x = -3 px on a 160 px wide image), as the editor lets annotators drag
        body = _interactive(helpers, "predict_interactive_rectangle", value={"x": -3 / 1.6, "width": 60.0})
        r = http.post("/predict", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["result"]) == 1
        # past the bottom-right corner
        body = _interactive(helpers, "predict_interactive_rectangle", value={"x": 40.0, "y": 40.0, "width": 70.0, "height": 75.0})
        assert http.post("/predict", json=body).status_code == 200
        # no overlap at all: refused
        body = _interactive(helpers, "predict_interactive_rectangle", value={"x": 102.0})
        r = http.post("/predict", json=body)
        assert r.status_code == 422 and "no extent inside the image" in r.text
        # points keep the small tolerance: far outside is still refused
        r = http.post("/predict", json=_interactive(helpers, value={"x": 110.0}))
        assert r.status_code == 422 and "outside the image" in r.text


# -- item 13: empty pre-annotations say why --------------------------------------------------
def test_failed_preannotation_reason_reaches_metrics_and_health(backend_env: dict[str, str], helpers: Any) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = helpers.fixture_body("predict_batch")
        body["tasks"][0]["data"]["image"] = "images/photo_001.jpg"  # relative path, LOCAL_FILES_DOCUMENT_ROOT unset
        r = http.post("/predict", json=body)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["result"] == [] and len(results) == 2  # still one result per task
        errors = http.get("/metrics").json()["recent_errors"]
        assert len(errors) == 1
        assert errors[0]["task"] == str(body["tasks"][0]["id"]) and errors[0]["project"] == "1"
        assert "LOCAL_FILES_DOCUMENT_ROOT" in errors[0]["message"] and "images/photo_001.jpg" in errors[0]["message"]
        health = http.get("/health").json()["errors"]
        assert health["count"] == 1 and health["latest"]["message"] == errors[0]["message"]


# -- item 14: the surface ---------------------------------------------------------------------
def test_health_head_and_no_paths_without_auth(backend_env: dict[str, str], helpers: Any, tiny_artifact: Path) -> None:
    with helpers.live_server(helpers.build_app(backend_env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.head("/health")
        assert r.status_code == 200 and r.content == b""
        assert http.head("/").status_code == 200
        health = http.get("/health")
        assert health.json()["model"]["path"] == tiny_artifact.name
        metrics = http.get("/metrics")
        assert metrics.json()["model"]["path"] == tiny_artifact.name
        versions = http.get("/versions")
        assert versions.status_code == 200 and all("/" not in d["path"] for d in versions.json()["details"])
        for text in (health.text, metrics.text, versions.text):
            assert str(tiny_artifact.parent) not in text and backend_env["MODEL_DIR"] not in text
        assert "HEAD /health" in metrics.json()["requests"]


def test_paths_shown_to_authenticated_callers(backend_env: dict[str, str], helpers: Any, tiny_artifact: Path) -> None:
    env = {**backend_env, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret"}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.head("/health").status_code == 401
        assert http.get("/health").status_code == 401
        authed = http.get("/health", auth=("ls", "secret")).json()
        assert authed["model"]["path"] == str(tiny_artifact)
        assert http.head("/health", auth=("ls", "secret")).status_code == 200


def test_unknown_methods_share_one_metrics_entry(client: Any) -> None:
    for i in range(20):
        client.request(f"X{i}METHOD", "/health")
    keys = client.get("/metrics").json()["requests"].keys()
    assert not any("METHOD" in k for k in keys)


def test_default_bind_address_is_loopback_and_the_image_listens_on_all() -> None:
    out = subprocess.run([sys.executable, "-m", "labelstudio_backend", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "default 127.0.0.1" in out.stdout and "0.0.0.0" in out.stdout
    from labelstudio_backend.__main__ import DEFAULT_HOST

    assert DEFAULT_HOST == "127.0.0.1"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert '"--host", "0.0.0.0"' in dockerfile
    readme = (REPO / "README.md").read_text()
    assert "http://localhost:9090" in readme and "--host 0.0.0.0" in readme


def test_data_uri_images_are_not_remembered_by_url(backend_env: dict[str, str], helpers: Any) -> None:
    """A data: URI is the whole image: keeping 4096 of them as cache keys would be gigabytes."""
    import base64

    app = helpers.build_app(backend_env)
    with helpers.live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        for seed in range(3):
            uri = "data:image/png;base64," + base64.b64encode(helpers.png_bytes(seed=seed)).decode()
            body = _interactive(helpers)
            body["tasks"][0]["data"]["image"] = uri
            r = http.post("/predict", json=body)
            assert r.status_code == 200, r.text
        remembered = app.state.backend._url_keys.keys()
        assert all(len(u) <= 4096 for u in remembered)


def test_public_view_reduces_paths_to_names() -> None:
    from labelstudio_backend.public_view import without_paths

    payload = {
        "model": {"path": "/srv/models/versions/tiny-2.safetensors", "version": "tiny-2"},
        "jobs": {"latest": {"1": {"artifact": "/srv/models/out/tiny-3.safetensors", "message": "trained tiny-3"}}},
        "recent_errors": [
            {"message": "no prediction: local file '/srv/images/a/b.png' cannot be read: No such file"},
            {"message": "'/data/upload/1/x.png' is relative to Label Studio but LABEL_STUDIO_URL is not set"},
        ],
    }
    out = without_paths(payload)
    assert out["model"] == {"path": "tiny-2.safetensors", "version": "tiny-2"}
    assert out["jobs"]["latest"]["1"]["artifact"] == "tiny-3.safetensors"
    assert "/srv" not in json.dumps(out) and "'.../b.png'" in out["recent_errors"][0]["message"]
    assert out["recent_errors"][1] == payload["recent_errors"][1]  # Label Studio URLs are not server paths
    assert payload["model"]["path"].startswith("/srv")  # the input is not changed
