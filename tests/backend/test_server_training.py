"""Webhooks and training jobs: immediate answers, background jobs, promotion and hot swap."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable

import pytest


def install_pipeline(monkeypatch: pytest.MonkeyPatch, run: Callable[..., Any] | None) -> None:
    """Stand-in for ``training.pipeline`` (None: the module does not exist)."""
    if run is None:
        monkeypatch.setitem(sys.modules, "training.pipeline", None)
        return
    module = types.ModuleType("training.pipeline")
    module.run_training_job = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.pipeline", module)


def start_training(client: Any, helpers: Any) -> dict[str, Any]:
    start = time.perf_counter()
    r = client.post("/webhook", json=helpers.fixture_body("train"))
    assert time.perf_counter() - start < 1.0
    assert r.status_code == 200, r.text
    return r.json()


def finished_job(client: Any, helpers: Any, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    return helpers.wait_for(done)


def test_other_webhook_events_are_acknowledged_at_once(client: Any, helpers: Any) -> None:
    start = time.perf_counter()
    r = client.post("/webhook", json=helpers.fixture_body("webhook_annotation_created"))
    assert time.perf_counter() - start < 0.5
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "action": "ANNOTATION_CREATED"}
    assert client.get("/jobs").json() == {"jobs": []}


def test_training_without_the_training_package_fails_clearly(
    client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch, fake_ls: Any
) -> None:
    install_pipeline(monkeypatch, None)
    answer = start_training(client, helpers)
    assert answer["status"] == "ok" and answer["job"]
    job = finished_job(client, helpers, answer["job"])
    assert job["status"] == "failed"
    assert job["message"].startswith("training is unavailable")
    assert job["project"] == "1"
    health = client.get("/health").json()
    assert health["jobs"]["latest"]["1"]["message"].startswith("training is unavailable")
    assert health["model_version"] == "tiny-1"
    assert not [p for p, _ in fake_ls.requests if "/export" in p]  # failed before touching Label Studio


def test_trained_and_promoted_model_is_served_without_restart(
    client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch, fake_ls: Any, backend_env: dict[str, str]
) -> None:
    fake_ls.export_tasks = [{"id": 7, "data": {"image": helpers.DISK_URL}, "annotations": [{"result": []}]}]
    seen: dict[str, Any] = {}

    def run_training_job(export_tasks, label_config, base_artifact_path, model_dir, project_id, on_progress):
        seen.update(tasks=export_tasks, config=label_config, base=base_artifact_path, dir=model_dir, project=project_id)
        on_progress("train", 0.5, loss=1.25)
        path = Path(model_dir) / "versions" / "tiny-2.safetensors"
        helpers.save_tiny_artifact(path, "tiny-2", seed=1)
        return path, True

    install_pipeline(monkeypatch, run_training_job)
    answer = start_training(client, helpers)
    job = finished_job(client, helpers, answer["job"])
    assert job["status"] == "succeeded", job["message"]
    assert job["promoted"] is True and job["model_version"] == "tiny-2"
    assert job["progress"]["loss"] == 1.25

    assert seen["tasks"] == fake_ls.export_tasks
    assert seen["project"] == "1"
    assert "<BrushLabels" in seen["config"]
    assert Path(seen["base"]) == Path(backend_env["OVSAM_CHECKPOINT"])
    assert Path(seen["dir"]) == Path(backend_env["MODEL_DIR"])
    export_calls = [(p, a) for p, a in fake_ls.requests if "/export" in p]
    assert export_calls == [("/api/projects/1/export?exportType=JSON&download_all_tasks=false", f"Token {helpers.API_KEY}")]

    assert client.post("/setup", json=helpers.fixture_body("setup")).json()["model_version"] == "tiny-2"
    r = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint")).json()
    assert r["model_version"] == r["results"][0]["model_version"] == "tiny-2"
    versions = client.get("/versions").json()
    assert set(versions["versions"]) == {"tiny-1", "tiny-2"} and versions["current"] == "tiny-2"
    assert (Path(backend_env["MODEL_DIR"]) / "current").read_text().strip() == "tiny-2.safetensors"


def test_promoted_version_survives_a_restart(
    make_client: Any, helpers: Any, backend_env: dict[str, str]
) -> None:
    from labelstudio_backend.registry import ModelRegistry

    candidate = helpers.save_tiny_artifact(Path(backend_env["MODEL_DIR"]).parent / "out" / "tiny-3.safetensors", "tiny-3")
    ModelRegistry(backend_env["MODEL_DIR"]).promote(candidate)
    health = make_client().get("/health").json()
    assert health["model_version"] == "tiny-3"
    assert health["model"]["kind"] == "promoted"


@pytest.mark.parametrize("outcome", ["raises", "not promoted"])
def test_failed_or_rejected_training_changes_nothing_served(
    client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch, backend_env: dict[str, str], outcome: str
) -> None:
    def run_training_job(export_tasks, label_config, base_artifact_path, model_dir, project_id, on_progress):
        path = Path(model_dir) / "versions" / "tiny-9.safetensors"
        helpers.save_tiny_artifact(path, "tiny-9", seed=2)
        if outcome == "raises":
            raise RuntimeError("loss is NaN")
        return {"artifact_path": str(path), "promoted": False}

    install_pipeline(monkeypatch, run_training_job)
    job = finished_job(client, helpers, start_training(client, helpers)["job"])
    if outcome == "raises":
        assert job["status"] == "failed" and "loss is NaN" in job["message"]
    else:
        assert job["status"] == "succeeded" and job["promoted"] is False
        assert "not promoted" in job["message"]
    assert client.post("/setup", json=helpers.fixture_body("setup")).json()["model_version"] == "tiny-1"
    assert not (Path(backend_env["MODEL_DIR"]) / "current").exists()


def test_one_training_job_per_project(client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def run_training_job(*args: Any) -> Any:
        release.wait(30)
        raise RuntimeError("stopped by the test")

    install_pipeline(monkeypatch, run_training_job)
    first = start_training(client, helpers)
    second = start_training(client, helpers)
    assert second["status"] == "already_running" and second["job"] == first["job"]
    assert "already running" in second["message"]
    assert client.get("/health").json()["jobs"]["running"] == [first["job"]]
    start = time.perf_counter()
    assert client.get("/health").status_code == 200 and time.perf_counter() - start < 1.0
    release.set()
    assert finished_job(client, helpers, first["job"])["status"] == "failed"
    third = start_training(client, helpers)
    assert third["status"] == "ok" and third["job"] != first["job"]


def test_legacy_train_is_off_unless_enabled(client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone reaching the backend could otherwise train (and promote) on annotations of their own."""
    install_pipeline(monkeypatch, lambda *a, **k: pytest.fail("training must not run"))
    r = client.post("/train", json=helpers.fixture_body("train_legacy"))
    assert r.status_code == 404 and "LEGACY_TRAIN" in r.json()["errors"][0]
    assert client.get("/jobs").json()["jobs"] == []


def test_legacy_train_endpoint_uses_the_annotations_it_is_given(
    make_client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch, fake_ls: Any
) -> None:
    client = make_client(LEGACY_TRAIN="true")
    seen: dict[str, Any] = {}

    def run_training_job(export_tasks, label_config, base_artifact_path, model_dir, project_id, on_progress):
        seen.update(tasks=export_tasks, project=project_id)
        raise RuntimeError("not this time")

    install_pipeline(monkeypatch, run_training_job)
    body = helpers.fixture_body("train_legacy")
    answer = client.post("/train", json=body).json()
    finished_job(client, helpers, answer["job"])
    assert seen["tasks"] == body["annotations"] and seen["project"] == "1"
    assert not [p for p, _ in fake_ls.requests if "/export" in p]


def test_export_failure_fails_the_job_with_the_reason(
    make_client: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_pipeline(monkeypatch, lambda *a: pytest.fail("training must not run without annotations"))
    client = make_client(LABEL_STUDIO_API_KEY="wrong-token")
    job = finished_job(client, helpers, start_training(client, helpers)["job"])
    assert job["status"] == "failed"
    assert "HTTP 401" in job["message"] and "LABEL_STUDIO_API_KEY" in job["message"]


def test_a_broken_promoted_model_falls_back_to_the_base_model(
    make_client: Any, helpers: Any, backend_env: dict[str, str], caplog: Any
) -> None:
    from labelstudio_backend.registry import ModelRegistry

    registry = ModelRegistry(backend_env["MODEL_DIR"])
    stored = registry.promote(helpers.save_tiny_artifact(Path(backend_env["MODEL_DIR"]).parent / "t4.safetensors", "tiny-4"))
    stored.write_bytes(stored.read_bytes()[:1000])  # a torn file
    health = make_client().get("/health").json()
    assert health["model_version"] == "tiny-1" and health["model"]["kind"] == "checkpoint"
    assert "promoted model cannot be loaded" in caplog.text
