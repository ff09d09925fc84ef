"""Training jobs over HTTP: immediate answers, per-project promotion, the queue, records, kills and cleanup.

Jobs really train: ``python -m training job`` runs as the backend's child process on a small synthetic export
(one step of the tiny model, see ``conftest.FAST_TRAINING``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

ACTIVE = ("queued", "running")


def start(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/webhook", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def finished_job(client: Any, helpers: Any, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] not in ACTIVE else None

    return helpers.wait_for(done, timeout=timeout, interval=0.2)


def setup_version(client: Any, helpers: Any, project: int) -> str:
    return client.post("/setup", json=helpers.for_project(helpers.fixture_body("setup"), project)).json()["model_version"]


def test_other_webhook_events_are_acknowledged_at_once(client: Any, helpers: Any) -> None:
    r = client.post("/webhook", json=helpers.fixture_body("webhook_annotation_created"))
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "action": "ANNOTATION_CREATED"}
    assert client.get("/jobs").json() == {"jobs": []}


def test_two_projects_train_one_at_a_time_and_each_serves_its_own_version(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    client = make_client(**training_env)
    hold = fake_ls.holds["/api/projects/"] = threading.Event()  # the first export waits: its job holds the slot
    first = start(client, helpers.train_body(1, synth_data["config"]))
    helpers.wait_for(lambda: client.get(f"/jobs/{first['job']}").json()["status"] == "running")
    second = start(client, helpers.train_body(2, synth_data["config"]))
    assert second["status"] == "ok" and second["state"] == "queued"  # MAX_TRAINING_JOBS=1

    again = start(client, helpers.train_body(1, synth_data["config"]))  # a busy project answers with its job
    assert again["status"] == "already_running" and again["job"] == first["job"] and again["state"] == "running"
    again = start(client, helpers.train_body(2, synth_data["config"]))
    assert again["status"] == "already_queued" and again["job"] == second["job"]
    summary = client.get("/health").json()["jobs"]
    assert summary["running"] == [first["job"]] and summary["queued"] == [second["job"]]
    del fake_ls.holds["/api/projects/"]
    hold.set()

    jobs = [finished_job(client, helpers, answer["job"]) for answer in (first, second)]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], [j["message"] for j in jobs]
    assert jobs[1]["started_at"] >= jobs[0]["finished_at"] - 1.0  # the second ran after the first (its slot)
    v1, v2 = (j["model_version"] for j in jobs)
    assert re.fullmatch(r"tiny-1-p1-\d{8}T\d{6}-[0-9a-f]{8}", v1) and re.fullmatch(r"tiny-1-p2-\d{8}T\d{6}-[0-9a-f]{8}", v2)
    assert jobs[0]["progress"]["stage"] == "deploy" and jobs[0]["progress"]["tasks"] == 3

    # Each project sees its own version in /setup and in predictions; a third project still serves the base.
    assert (setup_version(client, helpers, 1), setup_version(client, helpers, 2), setup_version(client, helpers, 3)) \
        == (v1, v2, "tiny-1")
    for project, version in ((1, v1), (2, v2), (3, "tiny-1")):
        body = helpers.for_project(helpers.fixture_body("predict_interactive_keypoint"), project)
        answer = client.post("/predict", json=body).json()
        assert answer["model_version"] == answer["results"][0]["model_version"] == version
    model_dir = Path(training_env["MODEL_DIR"])
    for project, version in ((1, v1), (2, v2)):
        versions = client.get("/versions", params={"project": project}).json()
        assert versions["versions"] == ["tiny-1", version] and versions["current"] == version
        stored = model_dir / "projects" / str(project) / "versions" / f"{version}.safetensors"
        assert stored.is_file() and (model_dir / "projects" / str(project) / "current").read_text().strip() == stored.name
    everything = client.get("/versions").json()  # what Label Studio asks (its GET names no project)
    assert set(everything["versions"]) == {"tiny-1", v1, v2} and everything["projects"] == {"1": v1, "2": v2}
    assert not (model_dir / "current").exists()
    # A promoted model is stored once: moved out of its job folder, not copied.
    assert not list((model_dir / "jobs").rglob("*.safetensors"))
    health = client.get("/health").json()
    assert health["model_status"] == "ok" and health["projects"] == {"1": v1, "2": v2}
    assert health["model_version"] == "tiny-1"  # the base


def test_job_records_survive_a_restart_and_an_interrupted_job_says_so(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    client = make_client(**training_env)
    fake_ls.export_status = 500
    failed = finished_job(client, helpers, start(client, helpers.train_body(1, synth_data["config"]))["job"])
    assert failed["status"] == "failed" and "HTTP 500" in failed["message"]
    fake_ls.holds["/api/projects/"] = threading.Event()  # the next job stays in its export
    running = start(client, helpers.train_body(1, synth_data["config"]))
    helpers.wait_for(lambda: client.get(f"/jobs/{running['job']}").json()["status"] == "running")
    client.__exit__(None, None, None)  # the server stops mid-job (the job's thread is left behind, held)

    restarted = make_client(**training_env)
    jobs = {j["id"]: j for j in restarted.get("/jobs").json()["jobs"]}
    assert jobs[failed["id"]]["status"] == "failed" and "HTTP 500" in jobs[failed["id"]]["message"]
    assert jobs[running["job"]]["status"] == "interrupted"
    assert "interrupted" in jobs[running["job"]]["message"]
    assert restarted.get("/health").json()["jobs"]["latest"]["1"]["status"] == "interrupted"
    fresh = start(restarted, helpers.train_body(1, synth_data["config"]))  # not blocked by the interrupted one
    assert fresh["status"] == "ok" and fresh["job"] not in jobs


def test_killing_the_training_process_fails_the_job_and_the_server_serves_on(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    fake_ls.export_tasks = [{**t, "data": {**t["data"], "image": "/data/upload/1/held-" + t["data"]["image"].split("/")[-1]}}
                            for t in synth_data["tasks"]]
    hold = fake_ls.holds["/data/upload/1/held-"] = threading.Event()  # the child waits for its first image
    client = make_client(**training_env)
    job_id = start(client, helpers.train_body(1, synth_data["config"]))["job"]
    pid = helpers.wait_for(lambda: client.get(f"/jobs/{job_id}").json()["pid"], timeout=120)
    helpers.wait_for(lambda: any(p.startswith("/data/upload/1/held-") for p, _ in fake_ls.requests), timeout=120)
    os.kill(pid, signal.SIGKILL)
    job = finished_job(client, helpers, job_id)
    hold.set()
    assert job["status"] == "failed" and "SIGKILL" in job["message"] and job["pid"] is None
    assert client.get("/health").json()["status"] == "UP"
    assert setup_version(client, helpers, 1) == "tiny-1"
    answer = client.post("/predict", json=helpers.fixture_body("predict_interactive_keypoint")).json()
    assert answer["results"][0]["model_version"] == "tiny-1"
    record = json.loads((Path(training_env["MODEL_DIR"]) / "jobs" / f"{job_id}.json").read_text())
    assert record["status"] == "failed"


def start_held_job(make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any],
                   fake_ls: Any) -> tuple[Any, str, int]:
    """A training job whose process is running and waits for an image Label Studio holds back: (client, job, pid)."""
    fake_ls.export_tasks = [{**t, "data": {**t["data"], "image": "/data/upload/1/held.png"}} for t in synth_data["tasks"]]
    fake_ls.holds["/data/upload/1/held"] = threading.Event()
    client = make_client(**training_env)
    job_id = start(client, helpers.train_body(1, synth_data["config"]))["job"]
    pid = helpers.wait_for(lambda: client.get(f"/jobs/{job_id}").json()["pid"], timeout=120)
    return client, job_id, pid


def test_a_training_job_can_be_cancelled(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    client, job_id, pid = start_held_job(make_client, helpers, training_env, synth_data, fake_ls)
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = finished_job(client, helpers, job_id)
    assert job["status"] == "cancelled" and "terminated" in job["message"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone (and reaped)
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_unpromoted_candidates_and_old_job_folders_are_cleaned(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any]
) -> None:
    options = {**json.loads(training_env["TRAINING_OPTIONS"]), "gate_tolerance": -1.0}  # the gate refuses all
    client = make_client(**{**training_env, "TRAINING_OPTIONS": json.dumps(options), "JOBS_KEEP": "1"})
    jobs = [finished_job(client, helpers, start(client, helpers.train_body(1, synth_data["config"]))["job"])
            for _ in range(2)]
    assert [(j["status"], j["promoted"]) for j in jobs] == [("succeeded", False), ("succeeded", False)]
    assert "did not promote" in jobs[1]["message"]
    folders = Path(training_env["MODEL_DIR"]) / "jobs"
    assert not (folders / jobs[0]["id"]).exists()  # beyond JOBS_KEEP: deleted with its candidate
    assert (folders / jobs[1]["id"] / "candidate.safetensors").is_file() and (folders / jobs[1]["id"] / "train.log").is_file()
    assert {j["id"] for j in client.get("/jobs").json()["jobs"]} == {j["id"] for j in jobs}  # records are kept
    assert setup_version(client, helpers, 1) == "tiny-1"
    assert not (Path(training_env["MODEL_DIR"]) / "projects" / "1" / "current").exists()
    # The child's inputs hold no credentials (they went through its environment).
    assert helpers.API_KEY not in "".join(p.read_text() for p in (folders / jobs[1]["id"]).glob("*.json"))


def test_a_failing_training_process_fails_the_job_with_its_reason(
    make_client: Any, helpers: Any, training_env: dict[str, str], fake_ls: Any
) -> None:
    fake_ls.export_tasks = [{"id": 7, "data": {"image": helpers.DISK_URL}, "annotations": [{"result": []}]}]
    client = make_client(**training_env)
    job = finished_job(client, helpers, start(client, helpers.train_body(1, helpers.fixture_body("train")["project"]["label_config"]))["job"])
    assert job["status"] == "failed" and "no usable annotations" in job["message"]
    assert setup_version(client, helpers, 1) == "tiny-1"


def test_legacy_train_is_off_unless_enabled(client: Any, helpers: Any) -> None:
    """Anyone reaching the backend could otherwise train (and promote) on annotations of their own."""
    r = client.post("/train", json=helpers.fixture_body("train_legacy"))
    assert r.status_code == 404 and "LEGACY_TRAIN" in r.json()["errors"][0]
    assert client.get("/jobs").json()["jobs"] == []


def test_legacy_train_trains_the_project_it_names_on_the_annotations_it_is_given(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    client = make_client(**training_env, LEGACY_TRAIN="true")
    body = helpers.fixture_body("train_legacy")
    body.update(annotations=synth_data["tasks"], label_config=synth_data["config"], project="5.1795380221")
    job = finished_job(client, helpers, client.post("/train", json=body).json()["job"])
    assert job["status"] == "succeeded" and job["project"] == "5", job["message"]
    assert not [p for p, _ in fake_ls.requests if "/export" in p]
    assert setup_version(client, helpers, 5) == job["model_version"]
    assert setup_version(client, helpers, 1) == "tiny-1"  # only the project it names
    r = client.post("/train", json={**body, "project": "../1"})
    assert r.status_code == 400


def test_export_failure_fails_the_job_with_the_reason(make_client: Any, helpers: Any) -> None:
    client = make_client(LABEL_STUDIO_API_KEY="wrong-token")
    job = finished_job(client, helpers, start(client, helpers.fixture_body("train"))["job"])
    assert job["status"] == "failed"
    assert "HTTP 401" in job["message"] and "LABEL_STUDIO_API_KEY" in job["message"]


def test_stopping_the_server_stops_its_training_process_and_the_job_shows_interrupted(
    make_client: Any, helpers: Any, training_env: dict[str, str], synth_data: dict[str, Any], fake_ls: Any
) -> None:
    client, job_id, pid = start_held_job(make_client, helpers, training_env, synth_data, fake_ls)
    client.__exit__(None, None, None)
    record = Path(training_env["MODEL_DIR"]) / "jobs" / f"{job_id}.json"
    helpers.wait_for(lambda: json.loads(record.read_text())["status"] == "interrupted", timeout=60)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert helpers.wait_for(gone, timeout=60)
    assert make_client(**training_env).get(f"/jobs/{job_id}").json()["status"] == "interrupted"
