"""Lanes, against a real uvicorn server: what one client or project makes the backend do never starves another's clicks.

Issue 24 items 7 (slow downloads), 8 (vocabulary builds, /setup budget, label limits) and 10 (batches whose
client left; clicks ahead of batch work). Fake hosts run on other 127.0.0.1 ports; slowness is made by the
tests (a host that never answers, a text tower that sleeps), never measured as a speed target: the bounds
below are many times what the work takes, and each test asserts the slow thing is still going on when the
fast one has answered.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from labelstudio_backend.lanes import PriorityLock, background_lane
from ovsam.automatic import AutomaticMaskGenerator
from ovsam.text import TextEncoder

# Generous: the click itself takes well under a second on the tiny model.
CLICK_BOUND_S = 15.0


@contextmanager
def silent_host() -> Iterator[tuple[str, Any]]:
    """A host that accepts connections and never answers; yields its address and a function that closes it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(conn)

    def close() -> None:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", close
    finally:
        close()


def click_body(helpers: Any, image_url: str | None = None) -> dict[str, Any]:
    body = helpers.fixture_body("predict_interactive_keypoint")
    if image_url is not None:
        body["tasks"][0]["data"]["image"] = image_url
    return body


def many_labels_config(n: int) -> str:
    labels = "".join(f'<Label value="thing {i}"/>' for i in range(n))
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
        f'<KeyPointLabels name="kp" toName="image" smart="true">{labels}</KeyPointLabels></View>'
    )


def test_clicks_on_embedded_images_do_not_wait_for_downloads_that_hang(backend_env: dict[str, str], helpers: Any) -> None:
    with silent_host() as (hang, close_hang):
        env = {**backend_env, "PREDICT_WORKERS": "2", "IMAGE_DOWNLOAD_WORKERS": "2", "IMAGE_TIMEOUT_S": "60",
               "ALLOWED_IMAGE_HOSTS": hang}
        with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/predict", json=click_body(helpers)).status_code == 200  # embeds the image
            with ThreadPoolExecutor(6) as pool:
                hanging = [pool.submit(http.post, "/predict", json=click_body(helpers, f"http://{hang}/x{i}.png"))
                           for i in range(6)]  # more than every worker of both lanes
                time.sleep(1.0)
                start = time.monotonic()
                r = http.post("/predict", json=click_body(helpers))
                took = time.monotonic() - start
                assert r.status_code == 200 and len(r.json()["results"][0]["result"]) == 1
                assert took < CLICK_BOUND_S
                assert not any(f.done() for f in hanging)  # the downloads were still hanging meanwhile
                close_hang()  # the host goes away: the downloads fail with a 4xx, the server stays healthy
                answers = [f.result() for f in hanging]
            assert all(a.status_code == 422 for a in answers), [a.text for a in answers]
            assert http.get("/health").status_code == 200


@pytest.fixture
def slow_text_tower(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Each text batch takes 0.5 s (a big project on a slow machine); the event stops the slowness."""
    original = TextEncoder.encode
    done = threading.Event()

    def encode(self: TextEncoder, texts: Any, batch_size: int = 256, before_batch: Any = None) -> Any:
        def slow(i: int, n: int) -> None:
            if before_batch is not None:
                before_batch(i, n)
            if not done.is_set():
                time.sleep(0.5)

        return original(self, texts, batch_size=batch_size, before_batch=slow)

    monkeypatch.setattr(TextEncoder, "encode", encode)
    yield done
    done.set()


def test_a_big_new_vocabulary_never_delays_another_projects_clicks(
    backend_env: dict[str, str], helpers: Any, slow_text_tower: threading.Event
) -> None:
    big = many_labels_config(300)  # 300 labels x 80 templates = 94 text batches of 0.5 s here
    env = {**backend_env, "PREDICT_WORKERS": "2", "VOCABULARY_WAIT_S": "0.5"}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/predict", json=click_body(helpers)).status_code == 200
        setup = {**helpers.fixture_body("setup"), "schema": big, "project": "7.1795380221"}
        for _ in range(9):  # Label Studio calls /setup before every prediction, from every annotator
            start = time.monotonic()
            r = http.post("/setup", json=setup)
            assert r.status_code == 200 and time.monotonic() - start < 3.0
        vocabularies = http.get("/health").json()["model"]["vocabularies"]
        assert len(vocabularies["building"]) + vocabularies["queued"] == 1  # nine /setup calls, one build

        start = time.monotonic()
        r = http.post("/predict", json=click_body(helpers))  # another project: its vocabulary is ready
        assert r.status_code == 200 and time.monotonic() - start < CLICK_BOUND_S

        big_click = click_body(helpers)
        big_click["label_config"] = big
        big_click["params"]["context"]["result"][0]["value"]["keypointlabels"] = ["thing 1"]
        big_click["params"]["context"]["result"][0]["from_name"] = "kp"
        r = http.post("/predict", json=big_click)
        assert r.status_code == 503
        assert "300 labels are being built" in r.json()["errors"][0] and "label texts done" in r.json()["errors"][0]

        slow_text_tower.set()  # let the build finish: then the big project is served too
        helpers.wait_for(lambda: http.post("/predict", json=big_click).status_code == 200, timeout=60, interval=0.5)
        assert http.get("/health").json()["model"]["vocabularies"]["building"] == []


def test_label_counts_and_configs_that_cannot_be_served_are_refused_at_once(
    backend_env: dict[str, str], helpers: Any
) -> None:
    env = {**backend_env, "MAX_LABELS": "50", "MAX_LABEL_CONFIG_KB": "64"}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=30) as http:
        setup = helpers.fixture_body("setup")
        r = http.post("/setup", json={**setup, "schema": many_labels_config(51)})
        assert r.status_code == 422 and "51 labels" in r.json()["errors"][0] and "MAX_LABELS" in r.json()["errors"][0]
        huge = many_labels_config(50).replace("<View>", "<View>" + "<!--" + "x" * 70_000 + "-->")
        r = http.post("/setup", json={**setup, "schema": huge})
        assert r.status_code == 413 and "MAX_LABEL_CONFIG_KB" in r.json()["errors"][0]
        body = click_body(helpers)
        body["label_config"] = many_labels_config(51)
        assert http.post("/predict", json=body).status_code == 422
        assert http.post("/setup", json=setup).status_code == 200


@pytest.mark.parametrize("batch_images", ["1", "4"])  # 4: images encoded in groups, as on a GPU
def test_a_batch_stops_when_label_studio_disconnects(
    backend_env: dict[str, str], helpers: Any, monkeypatch: pytest.MonkeyPatch, batch_images: str
) -> None:
    original = AutomaticMaskGenerator.generate

    def slow_generate(self: AutomaticMaskGenerator, features: Any) -> Any:
        time.sleep(0.3)
        return original(self, features)

    monkeypatch.setattr(AutomaticMaskGenerator, "generate", slow_generate)
    body = helpers.fixture_body("predict_batch")
    body["tasks"] = [copy.deepcopy(body["tasks"][i % 2]) | {"id": i + 1} for i in range(60)]  # 60 x 0.3 s = 18 s
    env = {**backend_env, "PREDICT_BATCH_IMAGES": batch_images}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=30) as http:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/predict", json=body, timeout=1.5)  # Label Studio gives up and closes the connection

        def counters() -> dict[str, int]:
            return http.get("/metrics").json()["counters"]

        helpers.wait_for(lambda: counters().get("batches_abandoned") == 1, timeout=30, interval=0.2)
        predicted = counters().get("tasks_predicted", 0)
        assert predicted < 60
        time.sleep(1.0)
        assert counters().get("tasks_predicted", 0) == predicted  # and nothing more is computed for it


def test_a_click_overtakes_waiting_background_work_on_the_device() -> None:
    lock = PriorityLock()
    order: list[str] = []
    holding = threading.Event()

    def background(name: str, hold: threading.Event | None = None) -> None:
        with background_lane(), lock:
            order.append(name)
            if hold is not None:
                holding.set()
                hold.wait(10)

    release = threading.Event()
    first = threading.Thread(target=background, args=("batch-1", release))
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=background, args=("batch-2",))
    second.start()
    time.sleep(0.2)  # batch-2 is waiting now; a click arrives after it

    def click() -> None:
        with lock:
            order.append("click")

    third = threading.Thread(target=click)
    third.start()
    deadline = time.monotonic() + 10
    while lock.interactive_waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in (first, second, third):
        t.join(10)
    assert order == ["batch-1", "click", "batch-2"]


def test_the_device_lock_is_reentrant_and_owned() -> None:
    lock = PriorityLock()
    with lock, lock:
        pass
    with pytest.raises(RuntimeError):
        lock.release()
