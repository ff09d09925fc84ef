"""The ML backend protocol through FastAPI's TestClient, with the recorded Label Studio payloads.

The model has random weights, so these tests check structure (shapes, labels,
versions, order), never what the masks cover.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from ovsam.predictor import OVSAMPredictor

CONFIG_LABELS = ["cat", "dog", "car"]
REPO = Path(__file__).resolve().parents[2]
INTERACTIVE = [
    "predict_interactive_keypoint",
    "predict_interactive_keypoints_pos_neg",
    "predict_interactive_rectangle",
]


def decode_region_mask(region: dict[str, Any]) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)


def record_predict_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Spy on OVSAMPredictor.predict (per-project predictor views share the class)."""
    calls: list[dict[str, Any]] = []
    original = OVSAMPredictor.predict

    def spy(self: OVSAMPredictor, *args: Any, **kwargs: Any) -> Any:
        calls.append({"vocabulary": list(self.vocabulary.labels), **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OVSAMPredictor, "predict", spy)
    return calls


def test_health_answers_fast_with_model_description(client: Any) -> None:
    start = time.perf_counter()
    r = client.get("/health")
    assert time.perf_counter() - start < 1.0
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "UP"
    assert body["model_class"] == "OVSAMBackend"
    assert body["model_version"] == "tiny-1"
    assert body["model"]["kind"] == "checkpoint"
    assert body["model"]["version"] == "tiny-1"
    assert body["model"]["device"] == "cpu"
    assert set(body["model"]["embedding_cache"]) >= {"entries", "bytes", "max_bytes", "hits", "misses"}


def test_setup_with_recorded_body_reports_model_version(client: Any, helpers: Any) -> None:
    start = time.perf_counter()
    r = client.post("/setup", json=helpers.fixture_body("setup"))
    assert time.perf_counter() - start < 3.0
    assert r.status_code == 200
    assert r.json()["model_version"] == "tiny-1"
    assert r.json()["labels"] == CONFIG_LABELS


@pytest.mark.parametrize("fixture", INTERACTIVE)
def test_interactive_fixture_answers_one_brush_region(client: Any, helpers: Any, fake_ls: Any, fixture: str) -> None:
    r = client.post("/predict", json=helpers.fixture_body(fixture))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "tiny-1"
    assert len(body["results"]) == 1
    item = body["results"][0]
    assert item["model_version"] == "tiny-1"
    assert isinstance(item["score"], float)
    assert len(item["result"]) == 1
    region = item["result"][0]
    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
    assert (region["original_width"], region["original_height"]) == (160, 120)
    assert region["value"]["format"] == "rle"
    assert decode_region_mask(region).shape == (120, 160, 4)
    assert region["value"]["brushlabels"][0] in CONFIG_LABELS
    assert region["score"] == item["score"]
    # The recognised class wins by default, and meta carries the alternatives.
    assert region["value"]["brushlabels"][0] == region["meta"]["recognised_label"]
    top_k = region["meta"]["top_k"]
    assert [a["label"] for a in top_k][0] == region["meta"]["recognised_label"]
    assert {a["label"] for a in top_k} <= set(CONFIG_LABELS)
    # The image came from "Label Studio" with the API key (the fake answers 401 otherwise).
    assert fake_ls.image_requests()
    assert all(auth == f"Token {helpers.API_KEY}" for _, auth in fake_ls.requests)


def test_positive_and_negative_points_make_one_prompt(client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_predict_calls(monkeypatch)
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoints_pos_neg"))
    assert r.status_code == 200
    assert len(calls) == 1
    np.testing.assert_allclose(calls[0]["points"], [[80.0, 60.0], [9.6, 7.2]])
    assert list(calls[0]["point_labels"]) == [1, 0]
    assert calls[0]["box"] is None
    assert calls[0]["vocabulary"] == CONFIG_LABELS


def test_smart_rectangle_becomes_a_box_prompt_in_pixels(client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_predict_calls(monkeypatch)
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_rectangle"))
    assert r.status_code == 200
    assert calls[0]["points"] is None
    np.testing.assert_allclose(calls[0]["box"], [36.0, 27.0, 124.0, 93.0])


def test_annotator_label_wins_when_configured(make_client: Any, helpers: Any) -> None:
    body = helpers.fixture_body("predict_interactive_keypoint")  # the annotator picked "cat"
    default = make_client().post("/predict", json=body).json()["results"][0]["result"][0]
    assert default["value"]["brushlabels"] == [default["meta"]["recognised_label"]]
    chosen = make_client(RECOGNISED_LABEL_WINS="false").post("/predict", json=body).json()
    region = chosen["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["cat"]
    assert region["meta"]["recognised_label"] in CONFIG_LABELS


def test_polygon_project_gets_a_polygon_with_its_own_vocabulary(client: Any, helpers: Any) -> None:
    body = helpers.fixture_body("predict_interactive_keypoint")
    body["label_config"] = (REPO / "label_configs" / "polygon_interactive.xml").read_text()
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    region = r.json()["results"][0]["result"][0]
    assert region["type"] == "polygonlabels"
    assert region["value"]["polygonlabels"][0] in ["person", "car", "dog", "cat"]
    points = region["value"]["points"]
    assert len(points) >= 3
    assert all(0.0 <= x <= 100.0 and 0.0 <= y <= 100.0 for x, y in points)
    assert {a["label"] for a in region["meta"]["top_k"]} <= {"person", "car", "dog", "cat"}


def test_rectangle_output_control_gets_a_rectangle(client: Any, helpers: Any) -> None:
    body = helpers.fixture_body("predict_interactive_keypoint")
    body["label_config"] = (
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>'
        '<KeyPointLabels name="tag2" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>'
        "</View>"
    )
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    region = r.json()["results"][0]["result"][0]
    assert (region["from_name"], region["type"]) == ("box", "rectanglelabels")
    value = region["value"]
    assert value["rectanglelabels"][0] in ["cat", "dog"]
    assert 0 <= value["x"] and value["x"] + value["width"] <= 100.0001
    assert 0 <= value["y"] and value["y"] + value["height"] <= 100.0001


class FakeInstance:
    def __init__(self, label: str, probability: float, score: float, mask: np.ndarray) -> None:
        self.label, self.probability, self.score, self.mask = label, probability, score, mask
        self.top_k: list[Any] = []


class FakeGenerator:
    """Two instances per image; their scores depend on the image width, to check task order."""

    def __init__(self, predictor: Any, config: Any = None) -> None:
        self.predictor = predictor

    def generate(self, features: Any) -> list[FakeInstance]:
        h, w = features.frame.original_size
        mask = np.zeros((h, w), bool)
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
        return [
            FakeInstance("dog", 0.9, w / 1000.0, mask),
            FakeInstance("cat", 0.8, w / 2000.0, mask),
            FakeInstance("car", 0.1, 0.05, mask),  # below PREANNOTATION_THRESHOLD=0.5: dropped
        ]


def test_batch_gives_one_result_per_task_in_order(make_client: Any, helpers: Any, fake_ls: Any, caplog: Any) -> None:
    fake_ls.files["/data/upload/1/wide.png"] = (helpers.png_bytes(width=300, height=120), "image/png")
    client = make_client(PREANNOTATION_THRESHOLD="0.5")
    client.app.state.backend._generator_cls = FakeGenerator
    body = helpers.fixture_body("predict_batch")
    tasks = body["tasks"]
    missing = {**tasks[0], "id": 3, "data": {}}
    wide = {**tasks[0], "id": 4, "data": {"image": "/data/upload/1/wide.png"}}
    body["tasks"] = [tasks[0], missing, wide, tasks[1]]
    with caplog.at_level(logging.WARNING):
        r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    assert all(item["model_version"] == "tiny-1" for item in results)
    assert [len(item["result"]) for item in results] == [2, 0, 2, 2]
    # Task score = the weakest region's score; 0 when nothing was found.
    assert [item["score"] for item in results] == pytest.approx([160 / 2000, 0.0, 300 / 2000, 160 / 2000])
    for item in (results[0], results[2], results[3]):
        labels = [region["value"]["brushlabels"][0] for region in item["result"]]
        assert labels == ["dog", "cat"]
        assert len({region["id"] for region in item["result"]}) == 2
    assert decode_region_mask(results[2]["result"][0]).shape == (120, 300, 4)
    assert "task 3" in caplog.text and "has no image" in caplog.text


def test_batch_with_the_real_automatic_mode(client: Any, helpers: Any) -> None:
    from ovsam.automatic import AutomaticConfig

    backend = client.app.state.backend
    backend._automatic_config = lambda: AutomaticConfig(  # random weights: keep every mask
        points_per_side=4, stability_threshold=0.0, confidence_threshold=0.0, min_support=0.0, max_instances=5
    )
    r = client.post("/predict", json=helpers.fixture_body("predict_batch"))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    for item in results:
        assert item["model_version"] == "tiny-1"
        assert 0.0 <= item["score"] <= 1.0
        for region in item["result"]:
            assert region["type"] == "brushlabels"
            assert region["value"]["brushlabels"][0] in CONFIG_LABELS
            assert decode_region_mask(region).shape == (120, 160, 4)
    assert any(item["result"] for item in results)


def test_opening_a_task_warms_the_cache_for_the_first_click(client: Any, helpers: Any, fake_ls: Any) -> None:
    assert client.post("/predict", json=helpers.fixture_body("predict_task_open")).status_code == 200
    cache = client.get("/health").json()["model"]["embedding_cache"]
    assert (cache["entries"], cache["misses"]) == (1, 1)
    downloads = len(fake_ls.image_requests())
    assert client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint")).status_code == 200
    cache = client.get("/health").json()["model"]["embedding_cache"]
    assert cache["misses"] == 1  # the click used the embedding of the opened task
    assert len(fake_ls.image_requests()) == downloads  # and did not even download the image again


def test_versions_lists_the_served_version(client: Any) -> None:
    body = client.get("/versions").json()
    assert body["versions"] == ["tiny-1"]
    assert body["current"] == "tiny-1"


def test_metrics_report_requests_latency_cache_and_model(client: Any, helpers: Any) -> None:
    client.get("/health")
    client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"))
    client.post("/predict", content=b"{not json")
    body = client.get("/metrics").json()
    predict = body["requests"]["POST /predict"]
    assert predict["count"] == 2 and predict["client_errors"] == 1
    assert predict["latency_ms"]["p50"] > 0 and predict["latency_ms"]["p95"] >= predict["latency_ms"]["p50"]
    assert body["requests"]["GET /health"]["count"] == 1
    assert body["model_version"] == "tiny-1"
    assert body["model"]["embedding_cache"]["misses"] == 1
    assert body["image_cache"]["bytes"] > 0
    assert body["process"]["peak_rss_mb"] > 0
    assert "running" in body["jobs"]


def test_basic_auth_is_enforced_on_every_endpoint(make_client: Any, helpers: Any) -> None:
    client = make_client(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    for method, path in [("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("get", "/versions"),
                         ("post", "/webhook"), ("get", "/metrics")]:
        r = getattr(client, method)(path)
        assert r.status_code == 401, path
        assert r.json()["errors"]
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/health", auth=("ls", "s3cret")).status_code == 200
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint"), auth=("ls", "s3cret"))
    assert r.status_code == 200


def test_without_a_model_it_serves_a_flagged_default(make_client: Any, caplog: Any) -> None:
    from labelstudio_backend.runtime import DEFAULT_MODEL_PATH

    with caplog.at_level(logging.INFO):
        client = make_client(OVSAM_CHECKPOINT="")
    model = client.get("/health").json()["model"]
    if DEFAULT_MODEL_PATH.is_file():
        assert model["kind"] == "default-demo"
        assert "DEMO model" in caplog.text and "circle, cross, ring" in caplog.text  # its labels, from its vocabulary
    else:
        assert model["kind"] == "untrained-tiny"
        assert model["version"] == "untrained-tiny"
        assert "UNTRAINED" in caplog.text


def test_automatic_mode_settings_come_from_the_environment(make_client: Any) -> None:
    from labelstudio_backend.config import Settings, SettingsError

    default = make_client().app.state.backend._automatic_config()
    assert default.stability_threshold == 0.7  # tuned with the demo model (bench/preannotate.py)
    assert default.min_support == 0.6
    cfg = make_client(AUTO_STABILITY_THRESHOLD="0.75", AUTO_POINTS_PER_SIDE="8", AUTO_MIN_SUPPORT="0").app.state.backend._automatic_config()
    assert (cfg.stability_threshold, cfg.points_per_side, cfg.min_support) == (0.75, 8, 0.0)
    with pytest.raises(SettingsError, match="AUTO_STABILITY_THRESHOLD"):
        Settings.from_env({"AUTO_STABILITY_THRESHOLD": "1.5"})
