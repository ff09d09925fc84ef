"""Training jobs: started by Label Studio's ``START_TRAINING`` webhook, run in the background.

Label Studio waits at most 100 s for the webhook answer and sends no
annotations with it, so the handler only records a job and returns; a thread
then exports the project's annotations through Label Studio's API, calls the
training package, and, if the new model is promoted, loads it and swaps it in
(see ``runtime.ModelRuntime.swap_to``). One job runs per project at a time.

The training entry point is looked up when a job runs, so the backend works
(and says clearly that training is unavailable) before the training package
provides it. Its contract::

    training.pipeline.run_training_job(
        export_tasks,        # list of tasks in Label Studio's JSON export format
        label_config,        # the project's label config XML
        base_artifact_path,  # Path of the served model: an artifact, or the official weights
                             # it was loaded from (what ovsam.checkpoint.load_model accepts)
        model_dir,           # MODEL_DIR (write new artifacts under model_dir / "versions")
        project_id,          # str
        on_progress,         # call on_progress(stage: str, fraction: float | None = None, **info)
    ) -> (artifact_path, promoted)   # or {"artifact_path": ..., "promoted": ...}, or an object with them

``promoted`` says the new model passed the evaluation gate; the backend then
makes it ``MODEL_DIR/current`` and serves it. A job that fails, or whose model
is not promoted, changes nothing that is served.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelstudio_io.images import ImageLoader

from .registry import ModelRegistry
from .runtime import ModelRuntime

__all__ = ["Job", "JobManager", "TrainingUnavailable", "TrainingRunner", "resolve_training_function"]

log = logging.getLogger(__name__)

# Finished jobs remembered for /jobs (the oldest are forgotten first).
_MAX_FINISHED_JOBS = 100


class TrainingUnavailable(RuntimeError):
    """The training package does not provide ``run_training_job`` (yet)."""


class JobFailed(RuntimeError):
    """A job step failed for a reason worth showing as-is (no traceback needed)."""


@dataclass
class Job:
    """One training run and what became of it (read by /health and /jobs)."""

    id: str
    project_id: str
    kind: str = "train"  # "train" (START_TRAINING) or "predict" (pre-annotations posted to Label Studio)
    status: str = "queued"  # queued -> running -> succeeded | failed | cancelled
    message: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    artifact: str | None = None
    promoted: bool | None = None
    model_version: str | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def cancellable(self) -> bool:
        """Prediction jobs stop between tasks; a training run is one step the job cannot interrupt."""
        return self.kind == "predict" and self.active

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
        }


class JobManager:
    """Runs job functions in background threads, one active job per project."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self, project_id: str, target: Callable[[Job], None], kind: str = "train") -> tuple[Job, bool]:
        """Start ``target(job)``; if a job of this kind runs for the project already, return it and False."""
        with self._lock:
            for job in self._jobs.values():
                if job.project_id == project_id and job.kind == kind and job.active:
                    return job, False
            job = Job(id=f"{kind}-{project_id}-{next(self._ids)}", project_id=project_id, kind=kind)
            self._jobs[job.id] = job
            self._forget_old_locked()
        thread = threading.Thread(target=self._run, args=(job, target), name=job.id, daemon=True)
        thread.start()
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a prediction job to stop after its current task (None: no such job)."""
        job = self.get(job_id)
        if job is not None and job.cancellable:
            job.cancel_requested.set()
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def summary(self) -> dict[str, Any]:
        jobs = self.list()
        latest: dict[str, Job] = {}
        for job in jobs:
            if job.kind == "train":
                latest[job.project_id] = job
        return {
            "running": [j.id for j in jobs if j.active],
            "latest": {project: job.to_json() for project, job in latest.items()},
        }

    def _forget_old_locked(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in finished[: max(0, len(finished) - _MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]

    def _run(self, job: Job, target: Callable[[Job], None]) -> None:
        job.status, job.started_at = "running", time.time()
        log.info("job %s started (project %s)", job.id, job.project_id)
        try:
            target(job)
        except (TrainingUnavailable, JobFailed) as exc:
            job.status, job.message = "failed", str(exc)
            log.error("job %s failed: %s", job.id, exc)
        except Exception as exc:  # the job thread must record every failure
            job.status, job.message = "failed", f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s\n%s", job.id, job.message, traceback.format_exc())
        else:
            job.status = "cancelled" if job.cancel_requested.is_set() else "succeeded"
            log.info("job %s %s: %s", job.id, job.status, job.message)
        finally:
            job.finished_at = time.time()


def resolve_training_function() -> Callable[..., Any]:
    """``training.pipeline.run_training_job``, or :class:`TrainingUnavailable` saying why not."""
    try:
        module = importlib.import_module("training.pipeline")
    except ImportError as exc:
        raise TrainingUnavailable(f"training is unavailable: cannot import training.pipeline ({exc})") from exc
    function = getattr(module, "run_training_job", None)
    if not callable(function):
        raise TrainingUnavailable("training is unavailable: training.pipeline has no run_training_job()")
    return function


def _training_outcome(result: Any) -> tuple[Path, bool]:
    """Accept ``(path, promoted)``, a mapping, or an object with ``artifact_path``/``path`` and ``promoted``."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        path, promoted = result
    elif isinstance(result, Mapping):
        path = result.get("artifact_path", result.get("artifact", result.get("path")))
        promoted = result.get("promoted")
    else:
        path = getattr(result, "artifact_path", getattr(result, "path", None))
        promoted = getattr(result, "promoted", None)
    if path is None or not isinstance(promoted, bool):
        raise JobFailed(f"run_training_job returned {result!r}; expected (artifact_path, promoted)")
    return Path(path), promoted


class TrainingRunner:
    """The body of a training job: export -> train -> (promote -> hot swap)."""

    def __init__(self, runtime: ModelRuntime, registry: ModelRegistry, images: ImageLoader) -> None:
        self.runtime = runtime
        self.registry = registry
        self.images = images

    def job(self, project_id: str, label_config: str, tasks: list[Any] | None = None) -> Callable[[Job], None]:
        """A job target; ``tasks`` given (legacy ``/train``) skips the export."""
        return lambda job: self.run(job, project_id, label_config, tasks)

    def run(self, job: Job, project_id: str, label_config: str, tasks: list[Any] | None) -> None:
        train = resolve_training_function()  # fail fast, before touching Label Studio
        if tasks is None:
            job.progress["stage"] = "export"
            tasks = self.export_tasks(project_id)
        job.progress.update(stage="train", tasks=len(tasks))
        serving = self.runtime.current
        base = serving.ensure_artifact_file(self.registry.root / "base")

        def on_progress(*args: Any, **info: Any) -> None:
            if args and isinstance(args[0], Mapping):
                info = {**args[0], **info}
            elif args:
                info = {"stage": str(args[0]), **({"fraction": args[1]} if len(args) > 1 else {}), **info}
            job.progress.update({k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                                 for k, v in info.items()})

        kwargs: dict[str, Any] = {}
        params = inspect.signature(train).parameters
        if "image_loader" in params:
            kwargs["image_loader"] = self.images  # carries the /setup URL and token the environment may lack
        if "options" in params and training_options():
            kwargs["options"] = training_options()
        result = train(tasks, label_config, base, self.registry.root, project_id, on_progress, **kwargs)
        path, promoted = _training_outcome(result)
        job.artifact, job.promoted = str(path), promoted
        if not promoted:
            job.message = f"trained {path.name} but it was not promoted; still serving {serving.version}"
            return
        job.progress["stage"] = "deploy"
        stored = self.registry.add(path)
        new = self.runtime.load_for_swap(stored)  # load before pointing `current` at it
        self.registry.promote(stored)
        self.runtime.install(new)
        job.model_version = new.version
        job.message = f"promoted and now serving {new.version}"

    def export_tasks(self, project_id: str) -> list[Any]:
        return self.images.client.export_tasks(project_id)


def training_options() -> dict[str, Any]:
    """FinetuneConfig overrides for backend jobs from TRAINING_OPTIONS (JSON), e.g. '{"epochs": 4}'."""
    raw = os.environ.get("TRAINING_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise JobFailed(f"TRAINING_OPTIONS is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise JobFailed("TRAINING_OPTIONS must be a JSON object")
    return value

