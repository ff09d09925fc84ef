"""Background jobs: training (START_TRAINING) and pre-annotations posted to Label Studio.

Label Studio waits at most 100 s for the webhook answer and sends no
annotations with it, so the handler only records a job and returns. A training
job waits in a queue for one of ``MAX_TRAINING_JOBS`` slots, exports the
project's annotations through Label Studio's API into its job folder, and runs
``python -m training job`` as a child process (``training_process.py``): the
server never imports training code, and a crash or kill of training never
touches it. When the child's outcome says the gate promoted its candidate,
the backend loads the candidate (checksum verified), moves it into the
project's versions, points the project at it and swaps it in: training for a
project changes only that project. One job of a kind runs per project; a
second START_TRAINING answers at once with the running or queued job.

Training job records live in ``MODEL_DIR/jobs`` (``job_store.py``) and survive
a restart; a job cut short by one shows as ``interrupted``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovsam.artifact import root_version

from labelstudio_io.client import ClientError
from labelstudio_io.images import ImageLoader

from .config import Settings
from .job_store import JobStore
from .registry import ModelRegistry
from .runtime import ModelLoadError, ModelRuntime
from .training_process import TrainingProcessError, child_environment, run_training_process, write_request

__all__ = ["Job", "JobFailed", "JobManager", "TrainingRunner"]

log = logging.getLogger(__name__)

# Finished jobs remembered for /jobs (the oldest are forgotten first).
_MAX_FINISHED_JOBS = 100
# A running job's progress is written to its record at most this often.
_SAVE_PROGRESS_EVERY_S = 2.0
_ACTIVE = ("queued", "running")


class JobFailed(RuntimeError):
    """A job step failed for a reason worth showing as-is (no traceback needed)."""


@dataclass
class Job:
    """One training run and what became of it (read by /health and /jobs)."""

    id: str
    project_id: str
    kind: str = "train"  # "train" (START_TRAINING) or "predict" (pre-annotations posted to Label Studio)
    status: str = "queued"  # queued -> running -> succeeded | failed | cancelled; interrupted (by a restart)
    message: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    artifact: str | None = None
    promoted: bool | None = None
    model_version: str | None = None
    pid: int | None = None  # the training process, while it runs
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in _ACTIVE

    @property
    def cancellable(self) -> bool:
        """Prediction jobs stop between tasks; a training job leaves the queue, or its process is terminated."""
        return self.active

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Job":
        """A job read back from its record (``JobStore``)."""
        job = cls(id=record["id"], project_id=str(record.get("project")), kind=record.get("kind", "train"))
        for name in ("status", "message", "created_at", "started_at", "finished_at", "artifact", "promoted",
                     "model_version"):
            if name in record:
                setattr(job, name, record[name])
        job.progress = dict(record.get("progress") or {})
        return job

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project_id,
            "kind": self.kind,
            "status": self.status,
            "message": self.message,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": dict(self.progress),
            "artifact": self.artifact,
            "promoted": self.promoted,
            "model_version": self.model_version,
            "pid": self.pid,
        }


class JobManager:
    """Runs job functions in background threads, one active job per project and kind.

    Training jobs are recorded in ``store`` (when given) at every change of state; a job started with ``slots``
    stays ``queued`` until it gets one of them.
    """

    def __init__(self, store: JobStore | None = None) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self.store = store
        first = 1
        for record in store.load() if store is not None else []:
            job = Job.from_record(record)
            self._jobs[job.id] = job
            number = re.search(r"-(\d+)$", job.id)
            first = max(first, int(number.group(1)) + 1 if number else first)
        self._ids = itertools.count(first)  # ids are never reused, across restarts too

    def start(self, project_id: str, target: Callable[[Job], None], kind: str = "train",
              slots: threading.Semaphore | None = None) -> tuple[Job, bool]:
        """Start ``target(job)``; if a job of this kind is active for the project already, return it and False."""
        with self._lock:
            for job in self._jobs.values():
                if job.project_id == project_id and job.kind == kind and job.active:
                    return job, False
            job = Job(id=f"{kind}-{project_id}-{next(self._ids)}", project_id=project_id, kind=kind)
            self._jobs[job.id] = job
            self._forget_old_locked()
        self.save(job)
        thread = threading.Thread(target=self._run, args=(job, target, slots), name=job.id, daemon=True)
        thread.start()
        return job, True

    def save(self, job: Job) -> None:
        """Write a training job's record (prediction jobs are not kept across restarts)."""
        if self.store is not None and job.kind == "train":
            self.store.save(job.to_json())

    def records(self) -> list[dict[str, Any]]:
        return [j.to_json() for j in self.list()]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop: a prediction job after its current task, a training job now (None: no such job)."""
        job = self.get(job_id)
        if job is not None and job.cancellable:
            job.cancel_requested.set()
        return job

    def list(self, project: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if project is None or j.project_id == project]

    def summary(self) -> dict[str, Any]:
        jobs = self.list()
        latest: dict[str, Job] = {}
        for job in jobs:
            if job.kind == "train":
                latest[job.project_id] = job
        return {
            "running": [j.id for j in jobs if j.status == "running"],
            "queued": [j.id for j in jobs if j.status == "queued"],
            "latest": {project: job.to_json() for project, job in latest.items()},
        }

    def _forget_old_locked(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in finished[: max(0, len(finished) - _MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]

    def _run(self, job: Job, target: Callable[[Job], None], slots: threading.Semaphore | None) -> None:
        acquired = False
        try:
            while slots is not None and not acquired:
                if job.cancel_requested.is_set():
                    job.status, job.message = "cancelled", "cancelled while queued"
                    return
                acquired = slots.acquire(timeout=0.2)
            job.status, job.started_at = "running", time.time()
            self.save(job)
            log.info("job %s started (project %s)", job.id, job.project_id)
            target(job)
        except (JobFailed, ClientError) as exc:  # a reason worth showing as-is (e.g. the export was refused)
            job.status, job.message = "failed", str(exc)
            log.error("job %s failed: %s", job.id, exc)
        except Exception as exc:  # the job thread must record every failure
            job.status, job.message = "failed", f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s\n%s", job.id, job.message, traceback.format_exc())
        else:
            if job.status == "running":
                job.status = "cancelled" if job.cancel_requested.is_set() else "succeeded"
            log.info("job %s %s: %s", job.id, job.status, job.message)
        finally:
            if acquired and slots is not None:
                slots.release()
            job.finished_at, job.pid = time.time(), None
            self.save(job)


class TrainingRunner:
    """The body of a training job: queue -> export -> child process -> (load, store, point, swap) -> clean."""

    def __init__(self, settings: Settings, runtime: ModelRuntime, registry: ModelRegistry, images: ImageLoader,
                 jobs: JobManager) -> None:
        self.settings = settings
        self.runtime = runtime
        self.registry = registry
        self.images = images
        self.jobs = jobs
        self.store = jobs.store or JobStore(registry.root)
        self.slots = threading.Semaphore(settings.max_training_jobs)  # MAX_TRAINING_JOBS processes at a time
        self.closing = threading.Event()

    def close(self) -> None:
        """The server is stopping: training processes are terminated, their jobs end ``interrupted``."""
        self.closing.set()
        for job in self.jobs.list():
            if job.kind == "train" and job.active:
                job.cancel_requested.set()

    def start(self, project_id: str, label_config: str, tasks: list[Any] | None = None) -> tuple[Job, bool]:
        """Queue a job for the project; ``tasks`` given (legacy ``/train``) skips the export."""
        self.registry.project(project_id)  # ValueError for an id that cannot name a folder
        return self.jobs.start(project_id, lambda job: self.run(job, project_id, label_config, tasks),
                               slots=self.slots)

    def run(self, job: Job, project_id: str, label_config: str, tasks: list[Any] | None) -> None:
        try:
            self._run(job, project_id, label_config, tasks)
        finally:
            self.store.clean(project_id, self.jobs.records(), self.settings.jobs_keep)

    def _run(self, job: Job, project_id: str, label_config: str, tasks: list[Any] | None) -> None:
        if tasks is None:
            self._stage(job, "export")
            tasks = self.export_tasks(project_id)
        if not tasks:
            raise JobFailed(f"project {project_id}'s export holds no annotated tasks: nothing to train on")
        if job.cancel_requested.is_set():
            self._cancelled(job)
            return
        try:
            serving = self.runtime.for_project(project_id)  # a broken version is repaired here, before training
        except ModelLoadError as exc:
            raise JobFailed(f"cannot load project {project_id}'s model to train from: {exc}") from exc
        job_dir = self.store.folder(job.id)
        base = serving.ensure_artifact_file(self.registry.root / "base")
        options = dict(self.settings.training_options)
        tolerance = options.pop("gate_tolerance", None)
        write_request(job_dir, tasks, label_config, {
            "project": project_id, "base": str(base), "options": options, "tolerance": tolerance,
            "version_prefix": f"{root_version(self.runtime.current.version)}-p{project_id}",
        })
        job.progress.update(tasks=len(tasks), base_version=serving.version)
        self._stage(job, "train")
        last_save = [0.0]

        def on_progress(event: dict[str, Any]) -> None:
            job.progress.update({k: v for k, v in event.items() if isinstance(v, (int, float, str, bool, type(None)))})
            if time.monotonic() - last_save[0] > _SAVE_PROGRESS_EVERY_S:
                last_save[0] = time.monotonic()
                self.jobs.save(job)

        def on_start(pid: int) -> None:
            job.pid = pid
            self.jobs.save(job)

        try:
            outcome = run_training_process(job_dir, self._child_env(), self.settings.training_timeout_s,
                                           on_progress, on_start, job.cancel_requested.is_set)
        except TrainingProcessError as exc:
            raise JobFailed(str(exc)) from exc
        if outcome is None:
            self._cancelled(job)
            return
        job.artifact, job.promoted = str(outcome.candidate), outcome.promote
        job.progress.update(gate=(outcome.gate or {}).get("reason"))
        if not outcome.promote:
            job.message = (f"trained {outcome.version} but the gate did not promote it "
                           f"({(outcome.gate or {}).get('reason')}); project {project_id} still serves {serving.version}")
            return
        self._stage(job, "deploy")
        self._promote(job, project_id, outcome.candidate, outcome.version)

    def _promote(self, job: Job, project_id: str, candidate: Path, version: str) -> None:
        """Load the candidate (checksum verified), store it once, move the pointer, swap it in."""
        try:
            new = self.runtime.load_for_swap(candidate, project_id)
        except ModelLoadError as exc:
            raise JobFailed(f"the trained model cannot be loaded, so it is not served: {exc}") from exc
        if new.version != version:
            raise JobFailed(f"the trained model says it is {new.version!r}, its outcome {version!r}")
        models = self.registry.project(project_id)
        try:
            stored = models.store(candidate, version)
        except FileExistsError as exc:
            raise JobFailed(str(exc)) from exc
        new.path = new.artifact.path = stored
        models.point_to(stored)
        self.runtime.install_for_project(project_id, new)
        job.artifact, job.model_version = str(stored), new.version
        job.message = f"promoted: project {project_id} now serves {new.version}"

    def _cancelled(self, job: Job) -> None:
        if self.closing.is_set():
            job.status, job.message = "interrupted", "interrupted: the backend shut down; the training process was stopped"
        else:
            job.status, job.message = "cancelled", "cancelled: the training process was terminated"

    def _stage(self, job: Job, stage: str) -> None:
        job.progress["stage"] = stage
        self.jobs.save(job)

    def _child_env(self) -> dict[str, str]:
        """Label Studio's address and key (the /setup ones when the environment has none), and image limits."""
        cfg = self.images.config
        images = {
            "IMAGE_MAX_BYTES": str(cfg.max_bytes), "IMAGE_MAX_PIXELS": str(cfg.max_pixels),
            "IMAGE_TIMEOUT_S": str(cfg.timeout_s), "IMAGE_MAX_DOWNLOADS": str(cfg.max_downloads),
            "ALLOWED_IMAGE_HOSTS": ",".join(cfg.allowed_hosts),
            "LOCAL_FILES_DOCUMENT_ROOT": os.pathsep.join(cfg.local_roots),
        }
        label_studio = {"LABEL_STUDIO_URL": self.images.client.label_studio_url,
                        "LABEL_STUDIO_API_KEY": self.images.client.api_key}
        return child_environment(os.environ, label_studio, images)

    def export_tasks(self, project_id: str) -> list[Any]:
        return self.images.client.export_tasks(project_id)


