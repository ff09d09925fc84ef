"""``python -m labelstudio_backend preannotate --project ID``: pre-annotate a whole project from the command line.

For datasets too large for *Retrieve Predictions*: the command reads the
project's label config and tasks through Label Studio's API (the same
``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` and model settings as the
server, so it predicts with the same ``model_version``), predicts each task
with automatic mode while the next images download, and posts every
prediction to ``/api/predictions/`` as soon as it is made, with the model
version and the task score.

It is resumable: by default it skips tasks that already hold a prediction of
this model version, so a run stopped at any point is finished by running it
again. Under ``torchrun`` each process takes the tasks whose id falls to its
rank (``id % WORLD_SIZE == RANK``) on its own device (``cuda:LOCAL_RANK``);
every task is predicted by exactly one rank, and a rank that failed leaves its
tasks to the next run.

The task list is read first (ids, data and model versions only) and predicted
after, so predictions posted meanwhile cannot shift Label Studio's pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskSelection", "main", "read_tasks"]

log = logging.getLogger(__name__)

_PAGE_TIMEOUT_S = (10.0, 300.0)


@dataclass(frozen=True)
class TaskSelection:
    """Which of the project's tasks to predict."""

    mode: str = "missing"  # "missing": no prediction of the model version yet; "all"
    ids: frozenset[int] | None = None  # only these task ids
    rank: int = 0
    world_size: int = 1

    def wants(self, task: Mapping[str, Any], model_version: str) -> bool:
        task_id = task.get("id")
        if not isinstance(task_id, int) or task_id % self.world_size != self.rank:
            return False
        if self.ids is not None and task_id not in self.ids:
            return False
        return self.mode == "all" or model_version not in model_versions(task)


def model_versions(task: Mapping[str, Any]) -> set[str]:
    """Model versions of a task's predictions, from Label Studio's task list (either of its two forms)."""
    out = {str(p.get("model_version")) for p in task.get("predictions") or [] if isinstance(p, Mapping)}
    listed = task.get("predictions_model_versions")
    if isinstance(listed, str):
        out.update(v.strip() for v in listed.split(",") if v.strip())
    elif isinstance(listed, list):
        out.update(str(v) for v in listed)
    return out


def read_tasks(images: Any, project: int, page_size: int = 100, view: int | None = None) -> Iterator[dict[str, Any]]:
    """The project's tasks (or a Data Manager tab's, ``view``), page by page through ``/api/tasks/``."""
    page = 1
    while True:
        params = {"project": str(project), "page": str(page), "page_size": str(page_size), "fields": "all"}
        if view is not None:
            params["view"] = str(view)
        with images.client.get("/api/tasks/", params=params, timeout=_PAGE_TIMEOUT_S) as resp:
            if resp.status_code == 404 and page > 1:  # past the last page
                return
            if resp.status_code != 200:
                raise SystemExit(f"Label Studio answered HTTP {resp.status_code} for the tasks of project {project}: "
                                 f"{resp.text[:300]}")
            body = resp.json()
        tasks = body.get("tasks") if isinstance(body, Mapping) else body
        if not tasks:
            return
        for task in tasks:
            yield {"id": task.get("id"), "data": task.get("data"), "project": project,
                   "predictions_model_versions": sorted(model_versions(task))}
        if len(tasks) < page_size:
            return
        page += 1


def _project_config(images: Any, project: int) -> str:
    with images.client.get(f"/api/projects/{project}/", timeout=_PAGE_TIMEOUT_S) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"cannot read project {project} from Label Studio: HTTP {resp.status_code} "
                             f"{resp.text[:300]}")
        config = resp.json().get("label_config")
    if not isinstance(config, str):
        raise SystemExit(f"project {project} has no label config")
    return config


def _parse_ids(text: str | None) -> frozenset[int] | None:
    if not text:
        return None
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise SystemExit(f"--ids must be comma-separated task ids: {exc}") from None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labelstudio_backend preannotate",
        description="Pre-annotate a Label Studio project with the backend's model and post the predictions "
        "(resumable; shards by rank under torchrun). Label Studio and the model come from the same environment "
        "variables as the server (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, OVSAM_CHECKPOINT, MODEL_DIR, DEVICE ...).",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--tasks", choices=("missing", "all"), default="missing",
                        help="missing (default): tasks without a prediction of this model version; all: every task")
    parser.add_argument("--ids", help="only these task ids (comma-separated)")
    parser.add_argument("--view", type=int, help="a Data Manager tab id: only the tasks its filters select")
    parser.add_argument("--page-size", type=int, default=100, help="tasks per page read from Label Studio")
    parser.add_argument("--prefetch", type=int, default=4, help="images downloaded ahead of the model")
    args = parser.parse_args(argv)

    from .config import settings_or_report
    from .metrics_log import configure_logging

    settings = settings_or_report()
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world > 1 and settings.device.startswith("cuda") and ":" not in settings.device:
        settings = dataclasses.replace(settings, device=f"cuda:{local_rank}")
    selection = TaskSelection(args.tasks, _parse_ids(args.ids), rank, world)
    return _run(settings, args, selection)


def _run(settings: Any, args: argparse.Namespace, selection: TaskSelection) -> int:
    from tqdm import tqdm

    from .bulk import PostError, post_prediction
    from labelstudio_io.images import ImageLoader, ImageLoaderConfig
    from .jobs import JobManager
    from .metrics_log import Metrics
    from .model import OVSAMBackend, RequestError
    from .registry import ModelRegistry
    from .runtime import ModelRuntime

    images = ImageLoader(ImageLoaderConfig.from_env())
    if not images.client.label_studio_url or not images.client.api_key:
        print("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the command reads tasks from Label Studio and posts "
              "predictions to it", file=sys.stderr)
        return 2
    runtime = ModelRuntime(settings, ModelRegistry(settings.model_dir))
    runtime.start()
    backend = OVSAMBackend(settings, runtime, images, JobManager(), Metrics())
    version = runtime.for_project(str(args.project)).version
    try:
        schema = backend.schema(_project_config(images, args.project))
    except RequestError as exc:
        print(f"project {args.project}: {'; '.join(exc.messages)}", file=sys.stderr)
        return 2
    tasks = list(read_tasks(images, args.project, args.page_size, args.view))
    todo = [t for t in tasks if selection.wants(t, version)]
    shard = f" (rank {selection.rank} of {selection.world_size})" if selection.world_size > 1 else ""
    log.info("project %s: %d tasks, %d to predict with %s%s", args.project, len(tasks), len(todo), version, shard)
    posted = failed = 0
    with tqdm(total=len(todo), desc=f"preannotate {version}{shard}", unit="task", disable=None) as bar:
        for chunk in _chunks(todo, max(args.page_size, 1)):
            for task, outcome in backend.iter_predictions(chunk, schema, prefetch=args.prefetch, project=str(args.project)):
                try:
                    if isinstance(outcome, Exception):
                        raise outcome
                    post_prediction(images, task["id"], outcome)
                    posted += 1
                except (PostError, ValueError) as exc:  # ImageError and ClientError are ValueErrors
                    failed += 1
                    log.warning("task %s: %s", task["id"], exc)
                bar.update()
    backend.close()
    runtime.close()
    print(f"project {args.project}{shard}: posted {posted} predictions of {version}, {failed} failed, "
          f"{len(tasks) - len(todo)} tasks skipped")
    return 0 if failed == 0 else 1
