"""``python -m labelstudio_backend preannotate`` against the fake Label Studio (issue 22 items 3 and 4).

Pagination, posting, resuming after the process is killed, and sharding under torchrun: every selected task ends
with exactly one prediction of the served model version.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def project_tasks(helpers: Any, n: int) -> list[dict[str, Any]]:
    urls = [helpers.DISK_URL, helpers.RECT_URL]
    return [{"id": 10 + i, "data": {"image": urls[i % 2]}, "predictions": []} for i in range(n)]


def command_env(backend_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "OVSAM_", "RANK", "WORLD_SIZE"))}
    return {**env, **backend_env, "PYTHONUNBUFFERED": "1"}


def run_command(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "labelstudio_backend", "preannotate", "--project", "1", "--page-size", "3", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_the_bulk_command_pages_posts_and_resumes_after_a_kill(
    backend_env: dict[str, str], helpers: Any, fake_ls: Any
) -> None:
    fake_ls.label_config = helpers.fixture_body("predict_batch")["label_config"]
    fake_ls.tasks = project_tasks(helpers, 8)
    fake_ls.tasks[1]["predictions"] = [{"model_version": "tiny-1", "result": []}]  # done in an earlier run
    fake_ls.tasks[2]["predictions"] = [{"model_version": "older-0", "result": []}]  # another version: predicted
    env = command_env(backend_env)

    # First run: killed while Label Studio receives its third prediction.
    third, release = threading.Event(), threading.Event()

    def hold_third(prediction: dict[str, Any]) -> None:
        if len(fake_ls.predictions) == 2:
            third.set()
            release.wait(60)

    fake_ls.before_post = hold_third
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelstudio_backend", "preannotate", "--project", "1", "--page-size", "3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert third.wait(120), "the command did not reach its third prediction"
        proc.kill()
        proc.wait(30)
    finally:
        release.set()
        fake_ls.before_post = None
    # Label Studio stores the third prediction it had received whole; the command is gone before its answer.
    helpers.wait_for(lambda: len(fake_ls.predictions) == 3, timeout=10)
    stored_before = 3

    # Second run: finishes the rest, skipping what is there.
    done = run_command(env)
    assert done.returncode == 0, done.stdout + done.stderr
    per_task = Counter(p["task"] for p in fake_ls.predictions)
    wanted = {t["id"] for t in fake_ls.tasks} - {11}
    assert set(per_task) == wanted and set(per_task.values()) == {1}  # each once, task 11 untouched
    assert all(p["model_version"] == "tiny-1" and isinstance(p["result"], list) for p in fake_ls.predictions)
    assert f"posted {len(wanted) - stored_before} predictions of tiny-1" in done.stdout

    # Third run: nothing left to do.
    again = run_command(env)
    assert again.returncode == 0 and "posted 0 predictions" in again.stdout, again.stdout + again.stderr
    assert len(fake_ls.predictions) == len(wanted)

    # --tasks all --ids: exactly the named tasks again.
    chosen = run_command(env, "--tasks", "all", "--ids", "10,13")
    assert chosen.returncode == 0 and "posted 2 predictions" in chosen.stdout
    assert Counter(p["task"] for p in fake_ls.predictions)[13] == 2


@pytest.mark.slow
def test_torchrun_shards_the_tasks_so_each_is_predicted_once(
    backend_env: dict[str, str], helpers: Any, fake_ls: Any
) -> None:
    fake_ls.label_config = helpers.fixture_body("predict_batch")["label_config"]
    fake_ls.tasks = project_tasks(helpers, 7)
    env = {**command_env(backend_env), "DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "labelstudio_backend", "preannotate", "--project", "1", "--page-size", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_task = Counter(p["task"] for p in fake_ls.predictions)
    assert set(per_task) == {t["id"] for t in fake_ls.tasks} and set(per_task.values()) == {1}
    out = proc.stdout + proc.stderr
    assert "(rank 0 of 2)" in out and "(rank 1 of 2)" in out


def test_the_command_refuses_to_run_without_label_studio(backend_env: dict[str, str]) -> None:
    env = {**command_env(backend_env), "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}
    proc = run_command(env, timeout=60)
    assert proc.returncode == 2 and "LABEL_STUDIO_URL" in proc.stderr
