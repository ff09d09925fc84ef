"""Per-project models over HTTP: integrity at load, pointer repair, the older global registry, shared encoders."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from labelstudio_backend.registry import ModelRegistry


def flip_weight_bytes(path: Path, count: int = 1000) -> None:
    """Invert ``count`` bytes spread over the file's tensor data (the JSON header is left intact)."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    step = max(1, (len(data) - start) // count)
    for i in range(start, len(data), step):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def store_version(helpers: Any, model_dir: Path, project: str, version: str, seed: int = 0, age_s: float = 0) -> Path:
    """Put a trained version in a project's registry and point the project at it."""
    models = ModelRegistry(model_dir).project(project)
    candidate = helpers.save_tiny_artifact(model_dir.parent / "out" / f"{version}.safetensors", version, seed=seed)
    stored = models.store(candidate, version)
    if age_s:
        os.utime(stored, (stored.stat().st_mtime - age_s,) * 2)
    models.point_to(stored)
    return stored


def setup_version(client: Any, helpers: Any, project: int) -> str:
    return client.post("/setup", json=helpers.for_project(helpers.fixture_body("setup"), project)).json()["model_version"]


def test_a_damaged_version_falls_back_to_the_previous_good_one_and_training_starts_from_it(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], caplog: Any
) -> None:
    model_dir = Path(training_env["MODEL_DIR"])
    good = store_version(helpers, model_dir, "1", "p1-good", seed=3, age_s=60)
    bad = store_version(helpers, model_dir, "1", "p1-bad", seed=4)
    flip_weight_bytes(bad)
    client = make_client(**training_env)

    health = client.get("/health").json()
    assert health["status"] == "UP" and health["model_status"] == "degraded"
    [problem] = health["problems"]
    assert problem["project"] == "1" and "p1-bad" in problem["reason"] and "checksum" in problem["reason"]
    assert str(model_dir) not in json.dumps(health)  # no paths for callers without basic auth
    assert "previous version p1-good" in problem["reason"]
    assert (model_dir / "projects" / "1" / "current").read_text().strip() == good.name  # the pointer is repaired
    assert not bad.exists() and bad.with_name(bad.name + ".broken").exists()
    assert setup_version(client, helpers, 1) == "p1-good" and setup_version(client, helpers, 2) == "tiny-1"
    assert "do not match their checksum" in caplog.text

    r = client.post("/webhook", json=helpers.train_body(1, synth_data["config"]))
    job = helpers.wait_for(lambda: (j := client.get(f"/jobs/{r.json()['job']}").json())["status"] not in
                           ("queued", "running") and j, timeout=300, interval=0.2)
    assert job["status"] == "succeeded", job["message"]
    assert job["progress"]["base_version"] == "p1-good"
    request = json.loads((model_dir / "jobs" / job["id"] / "request.json").read_text())
    assert Path(request["base"]) == good
    assert job["model_version"].startswith("tiny-1-p1-")  # named after the shared base, not the project's last
    assert setup_version(client, helpers, 1) == job["model_version"]
    assert client.get("/health").json()["model_status"] == "ok"


def test_a_torn_only_version_falls_back_to_the_base_model(
    make_client: Any, helpers: Any, backend_env: dict[str, str]
) -> None:
    model_dir = Path(backend_env["MODEL_DIR"])
    torn = store_version(helpers, model_dir, "7", "p7-torn")
    torn.write_bytes(torn.read_bytes()[:1000])
    client = make_client()
    assert setup_version(client, helpers, 7) == "tiny-1"
    health = client.get("/health").json()
    assert health["model_status"] == "degraded" and "base model tiny-1" in health["problems"][0]["reason"]
    assert not (model_dir / "projects" / "7" / "current").exists()


def test_the_older_global_registry_becomes_every_projects_base(
    make_client: Any, helpers: Any, backend_env: dict[str, str], caplog: Any
) -> None:
    model_dir = Path(backend_env["MODEL_DIR"])
    legacy = helpers.save_tiny_artifact(model_dir.parent / "out" / "tiny-3.safetensors", "tiny-3")
    ModelRegistry(model_dir).promote(legacy)  # MODEL_DIR/versions + MODEL_DIR/current, as before projects
    client = make_client()
    health = client.get("/health").json()
    assert health["model_version"] == "tiny-3" and health["model"]["kind"] == "promoted"
    assert setup_version(client, helpers, 1) == setup_version(client, helpers, 2) == "tiny-3"
    assert "it is the base model of every project" in caplog.text


def test_a_broken_global_model_falls_back_to_the_checkpoint_and_says_so(
    make_client: Any, helpers: Any, backend_env: dict[str, str], caplog: Any
) -> None:
    registry = ModelRegistry(backend_env["MODEL_DIR"])
    stored = registry.promote(helpers.save_tiny_artifact(Path(backend_env["MODEL_DIR"]).parent / "t4.safetensors", "tiny-4"))
    stored.write_bytes(stored.read_bytes()[:1000])  # a torn file
    health = make_client().get("/health").json()
    assert health["model_version"] == "tiny-1" and health["model"]["kind"] == "checkpoint"
    assert health["model_status"] == "degraded" and "tiny-4.safetensors" in health["problems"][0]["reason"]
    assert backend_env["MODEL_DIR"] not in json.dumps(health)
    assert "promoted model cannot be loaded" in caplog.text


def test_project_models_share_the_base_image_encoder_and_only_so_many_stay_loaded(
    make_client: Any, helpers: Any, backend_env: dict[str, str]
) -> None:
    model_dir = Path(backend_env["MODEL_DIR"])
    # seed 0 is the base's seed (the same image encoder as the base); seed 5 gives another encoder.
    store_version(helpers, model_dir, "1", "p1-v1", seed=0)
    store_version(helpers, model_dir, "2", "p2-v1", seed=0)
    store_version(helpers, model_dir, "3", "p3-v1", seed=5)
    client = make_client(MAX_LOADED_PROJECT_MODELS="2")
    body = helpers.fixture_body("predict_interactive_keypoint")
    for project in (1, 2):
        answer = client.post("/predict", json=helpers.for_project(body, project)).json()
        assert answer["results"][0]["model_version"] == f"p{project}-v1"
    health = client.get("/health").json()
    assert {p: m["shares_base_image_encoder"] for p, m in health["loaded_projects"].items()} == {"1": True, "2": True}
    cache = health["model"]["embedding_cache"]  # the base's cache (one byte budget), entries keyed per model
    assert cache["entries"] == 2 and cache["misses"] == 2

    answer = client.post("/predict", json=helpers.for_project(body, 3)).json()
    assert answer["results"][0]["model_version"] == "p3-v1"
    loaded = client.get("/health").json()["loaded_projects"]
    assert set(loaded) == {"2", "3"} and loaded["3"]["shares_base_image_encoder"] is False  # 1 was least recent
    answer = client.post("/predict", json=helpers.for_project(body, 1)).json()  # loaded again when asked
    assert answer["results"][0]["model_version"] == "p1-v1"


def test_a_project_model_sharing_the_trunk_gets_its_own_fpn_maps_not_the_bases(
    make_client: Any, helpers: Any, backend_env: dict[str, str]
) -> None:
    """Fine-tuning trains the recognition head's FPN: features cached for the base must not serve the project."""
    import numpy as np
    import torch

    from ovsam.artifact import load_artifact, save_artifact

    model_dir = Path(backend_env["MODEL_DIR"])
    stored = store_version(helpers, model_dir, "1", "p1-v1", seed=0)  # the base's weights ...
    art = load_artifact(stored, device="cpu")
    with torch.no_grad():
        for p in art.model.head.fpn.parameters():  # ... with a fine-tuned FPN
            p.add_(0.5)
    tuned = save_artifact(model_dir.parent / "out" / "p1-v2.safetensors", art.model, art.vocabulary, "p1-v2",
                          text_encoder=art.text_encoder)
    models = ModelRegistry(model_dir).project("1")
    models.point_to(models.store(tuned, "p1-v2"))

    client = make_client()
    runtime = client.app.state.backend.runtime
    project = runtime.for_project("1")
    assert project.version == "p1-v2" and project.owns_cache is False  # the trunk and the byte budget are shared
    image = np.random.RandomState(0).randint(0, 256, (96, 128, 3), dtype=np.uint8)
    base_features = runtime.current.predictor.set_image(image)  # the base encodes the image first
    project_features = project.predictor.set_image(image)
    with torch.inference_mode():
        own = project.predictor.image_encoder.encode_image(image)
    assert torch.equal(project_features.embedding, base_features.embedding)  # the same trunk and neck
    for got, expected, base in zip(project_features.pyramid, own.pyramid, base_features.pyramid):
        assert torch.allclose(got, expected) and not torch.allclose(got, base)
