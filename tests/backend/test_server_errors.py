"""Bad input gets a clear 4xx (or, in batch mode, an empty result for that task); the server keeps serving."""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable

import pytest

from ovsam.predictor import OVSAMPredictor

NO_IMAGE_CONFIG = '<View><Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="a"/></Choices></View>'


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.png"


def interactive(helpers: Any, **changes: Any) -> dict[str, Any]:
    body = helpers.fixture_body("predict_interactive_keypoint")
    for key, value in changes.items():
        if key == "image":
            body["tasks"][0]["data"] = {"image": value} if value is not None else {}
        elif key == "region_value":
            body["params"]["context"]["result"][0]["value"].update(value)
        elif key == "region":
            body["params"]["context"]["result"][0].update(value)
        elif key == "context":
            body["params"]["context"] = value
        else:
            body[key] = value
    return body


# (name, request as (path, kwargs) built from helpers, expected status, a fragment of the message)
BAD_REQUESTS: list[tuple[str, Callable[[Any], tuple[str, dict[str, Any]]], int, str]] = [
    ("malformed json", lambda h: ("/predict", {"content": b'{"tasks": [}'}), 400, "not valid JSON"),
    ("empty body", lambda h: ("/predict", {"content": b""}), 400, "empty"),
    ("body is a list", lambda h: ("/predict", {"json": [1, 2]}), 400, "JSON object"),
    ("no tasks", lambda h: ("/predict", {"json": {"label_config": "<View/>"}}), 400, "'tasks'"),
    ("empty tasks", lambda h: ("/predict", {"json": {"tasks": []}}), 400, "'tasks'"),
    ("task not an object", lambda h: ("/predict", {"json": {"tasks": ["x"]}}), 400, "tasks[0]"),
    ("params not an object", lambda h: ("/predict", {"json": interactive(h, params=[1])}), 400, "'params'"),
    ("context not an object", lambda h: ("/predict", {"json": interactive(h, context="click")}), 400, "context"),
    ("no label config", lambda h: ("/predict", {"json": interactive(h, label_config=None)}), 422, "label config"),
    ("label config not xml", lambda h: ("/predict", {"json": interactive(h, label_config="<View><Image")}), 422, "label config"),
    ("label config without image", lambda h: ("/predict", {"json": interactive(h, label_config=NO_IMAGE_CONFIG)}), 422, "Image"),
    ("setup config without image", lambda h: ("/setup", {"json": {"project": "1.1", "schema": NO_IMAGE_CONFIG}}), 422, "Image"),
    ("task without image", lambda h: ("/predict", {"json": interactive(h, image=None)}), 422, "has no image"),
    ("unreachable image url", lambda h: ("/predict", {"json": interactive(h, image=closed_port_url())}), 422, "cannot connect"),
    ("non-image url", lambda h: ("/predict", {"json": interactive(h, image="/data/upload/1/notes.txt")}), 422, "not an image"),
    ("missing image", lambda h: ("/predict", {"json": interactive(h, image="/data/upload/1/gone.png")}), 422, "404"),
    ("unsupported scheme", lambda h: ("/predict", {"json": interactive(h, image="ftp://example.com/a.png")}), 422, "scheme"),
    ("point outside the image", lambda h: ("/predict", {"json": interactive(h, region_value={"x": 150.0})}), 422, "outside"),
    ("coordinate not a number", lambda h: ("/predict", {"json": interactive(h, region_value={"y": "middle"})}), 422, "number"),
    ("only a negative point", lambda h: ("/predict", {"json": interactive(h, region={"is_positive": False})}), 422, "positive"),
    ("empty context result", lambda h: ("/predict", {"json": interactive(h, context={"result": []})}), 422, "empty"),
    ("context result not a list", lambda h: ("/predict", {"json": interactive(h, context={"result": "x"})}), 422, "list"),
    ("no prompt region", lambda h: ("/predict", {"json": interactive(h, context={"result": [{"type": "choices", "value": {}}]})}), 422, "no keypoint or rectangle"),
    ("two tasks for one click", lambda h: ("/predict", {"json": interactive(h, tasks=interactive(h)["tasks"] * 2)}), 422, "exactly one task"),
    ("webhook without action", lambda h: ("/webhook", {"json": {"project": {"id": 1}}}), 400, "'action'"),
    ("webhook malformed", lambda h: ("/webhook", {"content": b"nope"}), 400, "not valid JSON"),
    ("training without project", lambda h: ("/webhook", {"json": {"action": "START_TRAINING"}}), 400, "project"),
    ("unknown job", lambda h: ("/jobs/nope", {}), 404, "no job"),
    ("unknown path", lambda h: ("/nope", {}), 404, "Not Found"),
]


@pytest.fixture
def bad_client(make_client: Any, fake_ls: Any) -> Any:
    fake_ls.files["/data/upload/1/notes.txt"] = (b"these are not pixels", "text/plain")
    # The unreachable image is on loopback: allowed here so that the connection is tried.
    return make_client(ALLOWED_IMAGE_HOSTS="127.0.0.1")


@pytest.mark.parametrize("name,build,status,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(bad_client: Any, helpers: Any, name: str, build: Any, status: int, fragment: str) -> None:
    path, kwargs = build(helpers)
    method = bad_client.get if path.startswith(("/jobs", "/nope")) else bad_client.post
    r = method(path, **kwargs)
    assert r.status_code == status, r.text
    errors = r.json()["errors"]
    assert errors and all(isinstance(e, str) for e in errors)
    assert fragment.lower() in " ".join(errors).lower()


def test_server_keeps_serving_after_every_bad_input(bad_client: Any, helpers: Any) -> None:
    for _, build, _, _ in BAD_REQUESTS:
        path, kwargs = build(helpers)
        method = bad_client.get if path.startswith(("/jobs", "/nope")) else bad_client.post
        assert method(path, **kwargs).status_code < 500
    assert bad_client.get("/health").json()["status"] == "UP"
    r = bad_client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
    assert r.status_code == 200
    assert len(r.json()["results"][0]["result"]) == 1
    metrics = bad_client.get("/metrics").json()["requests"]
    assert sum(ep["server_errors"] for ep in metrics.values()) == 0


def test_huge_image_is_refused_before_decoding(make_client: Any, helpers: Any) -> None:
    client = make_client(IMAGE_MAX_PIXELS="10000")  # the 160x120 test image has 19200
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
    assert r.status_code == 422
    assert "pixels" in r.json()["errors"][0]


def test_oversized_body_gets_413(make_client: Any, helpers: Any) -> None:
    client = make_client(MAX_REQUEST_MB="0.001")
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
    assert r.status_code == 413
    assert "MAX_REQUEST_MB" in r.json()["errors"][0]


def test_unknown_label_on_the_smart_tool(make_client: Any, helpers: Any) -> None:
    body = interactive(helpers, region_value={"keypointlabels": ["zebra"], "labels": ["zebra"]})
    # Default: the recognised class decides, so the annotator's unknown label does not matter.
    assert make_client().post("/predict", json=body).status_code == 200
    # When the annotator's label should win, an unknown one cannot be used.
    r = make_client(RECOGNISED_LABEL_WINS="false").post("/predict", json=body)
    assert r.status_code == 422
    assert "zebra" in r.json()["errors"][0]


def test_batch_failures_give_empty_results_for_those_tasks_only(bad_client: Any, helpers: Any, caplog: Any) -> None:
    body = helpers.fixture_body("predict_batch")
    good = body["tasks"][0]
    body["tasks"] = [
        {**good, "id": 11, "data": {}},
        {**good, "id": 12, "data": {"image": closed_port_url()}},
        {**good, "id": 13, "data": {"image": "/data/upload/1/notes.txt"}},
        good,
    ]
    with caplog.at_level(logging.WARNING):
        r = bad_client.post("/predict", json=body)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 4
    for item in results[:3]:
        assert item == {"result": [], "score": 0.0, "model_version": "tiny-1"}
    for task_id in (11, 12, 13):
        assert f"task {task_id}: no prediction" in caplog.text
    health = bad_client.get("/health").json()["model"]["embedding_cache"]
    assert health["misses"] == 1  # the good task was still embedded


def test_a_bug_is_a_500_with_a_json_body(client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(OVSAMPredictor, "predict", broken)
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
    assert r.status_code == 500
    assert "simulated bug" in r.json()["errors"][0]
    monkeypatch.undo()
    assert client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint")).status_code == 200
