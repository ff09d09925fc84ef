"""Pre-annotation encodes images in batches of PREDICT_BATCH_IMAGES (a GPU's throughput, issue 22 item 5).

Both pre-annotation paths (a Retrieve-Predictions request and the bulk jobs / command's ``iter_predictions``) group
the tasks, encode each group's images in one ``set_images`` call, and answer exactly as one by one: same tasks in the
same order, a task without an image failing alone, features equal up to rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from labelstudio_backend.config import Settings, SettingsError
from ovsam.model import OVSAM
from ovsam.predictor import OVSAMPredictor


def test_batch_size_defaults_to_the_device() -> None:
    assert Settings.from_env({"DEVICE": "cpu"}).batch_images == 1
    assert Settings.from_env({"DEVICE": "cuda:1"}).batch_images == 4
    assert Settings.from_env({"DEVICE": "cpu", "PREDICT_BATCH_IMAGES": "3"}).batch_images == 3
    with pytest.raises(SettingsError, match="PREDICT_BATCH_IMAGES"):
        Settings.from_env({"PREDICT_BATCH_IMAGES": "65"})


class RecordingGenerator:
    """One region per image (its upper-left quarter); records the features automatic mode was given."""

    seen: list[Any] = []

    def __init__(self, predictor: Any, config: Any = None) -> None:
        pass

    def generate(self, features: Any) -> list[Any]:
        RecordingGenerator.seen.append(features)
        h, w = features.frame.original_size
        mask = np.zeros((h, w), bool)
        mask[: h // 2, : w // 2] = True
        return [type("Instance", (), {"label": "dog", "probability": 0.9, "score": 0.8, "mask": mask, "top_k": []})()]


def _tasks(helpers: Any, fake_ls: Any) -> list[dict[str, Any]]:
    fake_ls.files["/data/upload/1/wide.png"] = (helpers.png_bytes(width=300, height=120, seed=5), "image/png")
    fake_ls.files["/data/upload/1/tall.png"] = (helpers.png_bytes(width=90, height=200, seed=6), "image/png")
    task = helpers.fixture_body("predict_batch")["tasks"][0]
    urls = [helpers.DISK_URL, helpers.RECT_URL, None, "/data/upload/1/wide.png", "/data/upload/1/tall.png"]
    return [{**task, "id": 20 + i, "data": {"image": u} if u else {}} for i, u in enumerate(urls)]


def _run(client: Any, helpers: Any, tasks: list[dict[str, Any]], path: str) -> list[Any]:
    backend = client.app.state.backend
    backend._generator_cls = RecordingGenerator
    body = helpers.fixture_body("predict_batch")
    if path == "request":
        body["tasks"] = tasks
        r = client.post("/predict", json=body)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    else:
        schema = backend.schema(body["label_config"])
        results = [outcome for _, outcome in backend.iter_predictions(tasks, schema)]
    return [[(reg["value"]["brushlabels"], reg["value"]["rle"]) for reg in r["result"]] if isinstance(r, dict)
            else type(r).__name__ for r in results]


@pytest.mark.parametrize("path", ["request", "bulk"])
def test_batched_pre_annotation_answers_as_one_by_one(make_client: Any, helpers: Any, fake_ls: Any,
                                                      monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    batches: list[int] = []  # images per set_images call
    encodes: list[int] = []  # images per encoder call
    set_images, encode_outputs = OVSAMPredictor.set_images, OVSAM.encode_outputs

    def recording_set_images(self: OVSAMPredictor, images: Any, keys: Any = None) -> Any:
        batches.append(len(images))
        return set_images(self, images, keys)

    def recording_encode_outputs(self: OVSAM, x: torch.Tensor) -> Any:
        encodes.append(x.shape[0])
        return encode_outputs(self, x)

    monkeypatch.setattr(OVSAMPredictor, "set_images", recording_set_images)
    monkeypatch.setattr(OVSAM, "encode_outputs", recording_encode_outputs)
    tasks = _tasks(helpers, fake_ls)

    RecordingGenerator.seen = []
    one_by_one = _run(make_client(PREANNOTATION_THRESHOLD="0.5"), helpers, tasks, path)
    single_features = RecordingGenerator.seen
    assert batches == [] and encodes == [1, 1, 1, 1]  # on the CPU, no batch by default

    RecordingGenerator.seen, encodes[:] = [], []
    batched = _run(make_client(PREANNOTATION_THRESHOLD="0.5", PREDICT_BATCH_IMAGES="2"), helpers, tasks, path)
    # groups of two tasks: (disk, rect) in one batch; (no image, wide): one image, encoded alone; (tall): alone;
    # and the predictions use the batch's features: no image is encoded a second time
    assert batches == [2, 1, 1] and encodes == [2, 1, 1]
    assert batched == one_by_one
    assert [len(r) if isinstance(r, list) else r for r in batched] == [1, 1, 0 if path == "request" else "ImageError", 1, 1]
    assert len(RecordingGenerator.seen) == len(single_features) == 4
    for got, want in zip(RecordingGenerator.seen, single_features):
        assert got.frame.original_size == want.frame.original_size
        assert torch.allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-4 * float(want.embedding.abs().max()))
