"""Retrieve Predictions on more tasks than fit in Label Studio's wait (issue 22 item 2), over real HTTP.

The batch answers what it computed within PREDICT_BATCH_BUDGET_S; the rest is answered with empty lists (Label
Studio stores nothing for them) and posted by a background job to the fake Label Studio's /api/predictions/.
The generator is slowed by the test so that the budget cuts the batch at a known point whatever the machine.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import httpx
import pytest

from ovsam.automatic import AutomaticMaskGenerator


class SlowGenerator:
    """Each task's automatic mode takes 0.4 s more until ``fast`` is set; while ``paused`` is set, it waits."""

    def __init__(self) -> None:
        self.fast = threading.Event()
        self.paused = threading.Event()
        self.resume = threading.Event()

    def set(self) -> None:
        self.fast.set()


@pytest.fixture
def slow_generator(monkeypatch: pytest.MonkeyPatch) -> SlowGenerator:
    original = AutomaticMaskGenerator.generate
    slow = SlowGenerator()

    def generate(self: AutomaticMaskGenerator, features: Any) -> Any:
        if slow.paused.is_set():
            slow.resume.wait(20)
        if not slow.fast.is_set():
            time.sleep(0.4)
        return original(self, features)

    monkeypatch.setattr(AutomaticMaskGenerator, "generate", generate)
    yield slow
    slow.resume.set()


def batch_body(helpers: Any, n: int) -> dict[str, Any]:
    body = helpers.fixture_body("predict_batch")
    body["tasks"] = [copy.deepcopy(body["tasks"][i % 2]) | {"id": 100 + i} for i in range(n)]
    return body


@pytest.mark.parametrize("batch_images", ["1", "3"])  # 3: groups of images encoded in one batch, as on a GPU
def test_a_batch_beyond_the_budget_is_finished_by_a_job_that_posts_to_label_studio(
    backend_env: dict[str, str], helpers: Any, fake_ls: Any, slow_generator: SlowGenerator, batch_images: str
) -> None:
    env = {**backend_env, "PREDICT_BATCH_BUDGET_S": "1.0", "PREDICT_BATCH_IMAGES": batch_images}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/predict", json=batch_body(helpers, 12))  # 12 x 0.4 s: far beyond the 1 s budget
        assert r.status_code == 200
        results = r.json()["results"]
        assert len(results) == 12  # one answer per task, or Label Studio matches none of them
        answered = [100 + i for i, res in enumerate(results) if isinstance(res, dict)]
        deferred = [100 + i for i, res in enumerate(results) if res == []]
        assert answered and deferred and len(answered) + len(deferred) == 12
        assert all(isinstance(res["result"], list) and res["model_version"] == "tiny-1"
                   for res in results if isinstance(res, dict))
        assert answered == list(range(100, 100 + len(answered)))  # in task order: the first ones

        jobs = [j for j in http.get("/jobs").json()["jobs"] if j["kind"] == "predict"]
        assert len(jobs) == 1 and jobs[0]["project"] == "1" and jobs[0]["progress"]["total"] == len(deferred)

        # Label Studio asks again while the job runs (paused here on a task, so nothing is posted meanwhile), for
        # the tasks that have no prediction yet: the job holds them all, so they are answered with empty lists,
        # not predicted a second time (a prediction here would wait for the paused generator and time out).
        slow_generator.paused.set()
        time.sleep(1.0)  # the job is now inside a task's automatic mode
        body = batch_body(helpers, 12)
        stored = {p["task"] for p in fake_ls.predictions}
        body["tasks"] = [t for t in body["tasks"] if t["id"] in deferred and t["id"] not in stored]
        assert body["tasks"]
        again = httpx.post(f"{url}/predict", json=body, timeout=10).json()["results"]
        assert again == [[] for _ in body["tasks"]]
        slow_generator.resume.set()

        slow_generator.set()
        job = helpers.wait_for(lambda: (j := http.get(f"/jobs/{jobs[0]['id']}").json())["status"] != "running" and j,
                               timeout=60, interval=0.2)
        assert job["status"] == "succeeded", job
        assert job["progress"]["failed"] == 0 and job["progress"]["rate_per_s"] > 0
        posted = [p["task"] for p in fake_ls.predictions]
        assert len(posted) == len(set(posted)) == job["progress"]["done"]
        # every task got exactly one prediction: answered in the request or posted by the job
        assert not set(posted) & set(answered)
        assert set(posted) | set(answered) == set(range(100, 112))
        assert all(p["model_version"] == "tiny-1" and isinstance(p["score"], float) for p in fake_ls.predictions)
        assert all(auth == f"Token {helpers.API_KEY}" for path, auth in fake_ls.requests if path == "/api/predictions/")


def test_a_prediction_job_can_be_cancelled(
    backend_env: dict[str, str], helpers: Any, fake_ls: Any, slow_generator: SlowGenerator
) -> None:
    env = {**backend_env, "PREDICT_BATCH_BUDGET_S": "0.5"}
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        results = http.post("/predict", json=batch_body(helpers, 20)).json()["results"]
        deferred = sum(res == [] for res in results)
        job_id = next(j["id"] for j in http.get("/jobs").json()["jobs"] if j["kind"] == "predict")
        r = http.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 200
        job = helpers.wait_for(lambda: (j := http.get(f"/jobs/{job_id}").json())["status"] != "running" and j,
                               timeout=30, interval=0.1)
        assert job["status"] == "cancelled" and "cancelled with" in job["message"]
        assert len(fake_ls.predictions) < deferred
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 409  # it has ended
        assert http.post("/jobs/nope/cancel").status_code == 404


def test_without_label_studio_credentials_the_batch_is_answered_whole(
    backend_env: dict[str, str], helpers: Any, fake_ls: Any, slow_generator: SlowGenerator
) -> None:
    env = {**backend_env, "PREDICT_BATCH_BUDGET_S": "0.5", "LABEL_STUDIO_API_KEY": ""}
    body = batch_body(helpers, 4)
    for task in body["tasks"]:  # images the backend can read without Label Studio
        task["data"]["image"] = "data:image/png;base64," + __import__("base64").b64encode(helpers.png_bytes()).decode()
    with helpers.live_server(helpers.build_app(env)) as url, httpx.Client(base_url=url, timeout=60) as http:
        results = http.post("/predict", json=body).json()["results"]
        assert all(isinstance(res, dict) for res in results)
        assert not [j for j in http.get("/jobs").json()["jobs"] if j["kind"] == "predict"]
