"""Pre-annotations that do not fit in Label Studio's wait, predicted in the background and posted to it.

Label Studio's *Retrieve Predictions* sends every selected task in one
``/predict`` request and gives up after 100 s (``ML_TIMEOUT_PREDICT``); what a
backend computes after that is lost, and tasks it answers with an empty result
count as predicted. So a batch answers what it computed within
``PREDICT_BATCH_BUDGET_S`` and hands the rest to a per-project job here: the
answer holds an empty list for those tasks, which Label Studio skips (no
prediction is saved, no placeholder left behind), and the job posts each
task's prediction through ``POST /api/predictions/`` as soon as it is made,
with the model version and task score Label Studio would have stored.

One job per project; tasks deferred while it runs join its queue (once each).
The job works in the background lane, so annotators' clicks go first; it is
visible in ``/jobs`` with done / total, rate and ETA, and can be cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labelstudio_io.client import ClientError
from labelstudio_io.images import ImageLoader
from labelstudio_io.label_config import ProjectSchema

from .jobs import Job, JobManager
from .lanes import background_lane
from .metrics_log import Metrics

__all__ = ["BulkPredictions", "PostError", "post_prediction"]

log = logging.getLogger(__name__)

_POST_TIMEOUT_S = (10.0, 60.0)

# backend.iter_predictions: each task's prediction (or the exception why not), images loading ahead of the model.
PredictMany = Callable[[Sequence[Mapping[str, Any]], ProjectSchema], Iterator[tuple[Mapping[str, Any], Any]]]
# Tasks taken from the queue at a time (their images download while the model works on the previous ones).
_CHUNK = 8


class PostError(RuntimeError):
    """Label Studio did not store a prediction (message says why)."""


def post_prediction(images: ImageLoader, task_id: Any, prediction: Mapping[str, Any]) -> None:
    """Store one task's prediction in Label Studio, as its own ML connector would."""
    body = {
        "task": task_id,
        "result": prediction.get("result", []),
        "score": prediction.get("score"),
        "model_version": prediction.get("model_version"),
    }
    try:
        resp = images.client.request("POST", "/api/predictions/", json_body=body, timeout=_POST_TIMEOUT_S)
    except ClientError as exc:
        raise PostError(f"cannot post the prediction of task {task_id}: {exc}") from exc
    with resp:
        if resp.status_code not in (200, 201):
            raise PostError(
                f"Label Studio refused the prediction of task {task_id}: HTTP {resp.status_code} {resp.text[:300]}"
            )


@dataclass
class _Queue:
    """A project's deferred tasks, each with the label config it was asked with."""

    pending: deque[tuple[Mapping[str, Any], ProjectSchema]] = field(default_factory=deque)
    ids: set[Any] = field(default_factory=set)
    total: int = 0
    job: Job | None = None


class BulkPredictions:
    """Per-project background jobs that predict deferred tasks and post the predictions to Label Studio."""

    def __init__(
        self,
        jobs: JobManager,
        predict_many: PredictMany,
        post: Callable[[Any, Mapping[str, Any]], None],
        metrics: Metrics,
    ) -> None:
        self.jobs = jobs
        self.predict_many = predict_many
        self.post = post
        self.metrics = metrics
        self._queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()

    def queued(self, project_id: str) -> set[Any]:
        """Ids of the project's tasks a job will still post (a repeated Retrieve Predictions skips them)."""
        with self._lock:
            queue = self._queues.get(project_id)
            return set(queue.ids) if queue is not None else set()

    def defer(self, project_id: str, schema: ProjectSchema, tasks: Sequence[Mapping[str, Any]]) -> Job:
        """Queue tasks for the project's job (started if none runs); tasks already queued are not added twice."""
        with self._lock:
            queue = self._queues.get(project_id)
            start = queue is None
            if queue is None:
                queue = self._queues[project_id] = _Queue()
            for task in tasks:
                task_id = task.get("id")
                if task_id is None or task_id in queue.ids:
                    continue
                queue.ids.add(task_id)
                queue.pending.append((task, schema))
                queue.total += 1
            if queue.job is not None:
                queue.job.progress["total"] = queue.total
            if start:
                queue.job, _ = self.jobs.start(project_id, lambda job: self._run(job, project_id, queue), kind="predict")
                for name, value in (("done", 0), ("failed", 0), ("total", queue.total)):
                    queue.job.progress.setdefault(name, value)
            assert queue.job is not None
            return queue.job

    def _run(self, job: Job, project_id: str, queue: _Queue) -> None:
        done = failed = 0
        started = time.monotonic()
        job.progress["stage"] = "predicting"
        with background_lane():
            while True:
                with self._lock:
                    if job.cancel_requested.is_set() or not queue.pending:
                        dropped = len(queue.pending)
                        if self._queues.get(project_id) is queue:
                            del self._queues[project_id]  # later deferrals start a new job
                        break
                    schema = queue.pending[0][1]
                    chunk = []
                    while queue.pending and len(chunk) < _CHUNK and queue.pending[0][1] is schema:
                        chunk.append(queue.pending.popleft()[0])
                outcomes = self.predict_many(chunk, schema)
                for task, outcome in outcomes:
                    try:
                        if isinstance(outcome, Exception):
                            raise outcome
                        self.post(task.get("id"), outcome)
                        done += 1
                    except Exception as exc:  # one task's failure is recorded; the others go on
                        failed += 1
                        log.warning("job %s: task %s: %s", job.id, task.get("id"), exc)
                        self.metrics.record_error(f"background prediction: {exc}", task=task.get("id"),
                                                  project=project_id)
                    with self._lock:
                        queue.ids.discard(task.get("id"))
                    _report(job, done, failed, queue.total, started)
                    if job.cancel_requested.is_set():
                        break
                getattr(outcomes, "close", lambda: None)()  # stops image loads nobody will use
                with self._lock:  # the chunk's tasks a cancel left: back in the queue, counted as dropped
                    for task in reversed([t for t in chunk if t.get("id") in queue.ids]):
                        queue.pending.appendleft((task, schema))
        job.message = f"posted {done} predictions to Label Studio, {failed} failed"
        if dropped:
            job.message += f"; cancelled with {dropped} tasks left"
        job.progress["stage"] = "done"


def _report(job: Job, done: int, failed: int, total: int, started: float) -> None:
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = (done + failed) / elapsed
    left = total - done - failed
    job.progress.update(
        done=done, failed=failed, total=total, rate_per_s=round(rate, 3),
        eta_s=round(left / rate, 1) if rate > 0 else None,
    )
