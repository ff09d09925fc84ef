"""Read Label Studio JSON exports (the task list from "Export > JSON" or the export API) as training samples.

Each task becomes one `Sample` per chosen annotation; predictions are model output, not
training targets, and are ignored. Regions are decoded by `labelstudio_io.regions`; everything
that cannot be used is counted in the `SkipReport` under one of:

  task level:        'no annotation', 'missing image', 'low agreement', 'no ground truth',
                     'malformed task'
  annotation level:  'cancelled', 'no instances' (chosen, but none of its regions is usable)
  region level:      the reasons of `labelstudio_io.regions` ('unknown label', 'corrupt mask', ...),
                     and 'size mismatch' (regions of one annotation disagree on the image size)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from labelstudio_io.regions import RegionSkip, decode_region, task_image_ref

from .agreement import task_agreement
from .types import Instance, Sample, SkipReport

_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class AnnotationPolicy:
    """Which annotations of a task become training samples.

    which:
      'latest'       the non-cancelled annotation with the newest updated_at (else created_at),
                     ties broken by the larger annotation id;
      'all'          every non-cancelled annotation, one sample each (same task id, so a
                     task-level split keeps them together);
      'ground_truth' the latest non-cancelled annotation marked ground truth; tasks without
                     one are skipped ('no ground truth').
    min_agreement: when set, a task with >= 2 non-cancelled annotations is kept only if their
      mean pairwise agreement (see `training.data.agreement`) is >= this value; otherwise the
      whole task is skipped ('low agreement'). Tasks with one annotation are not affected.
    """

    which: Literal["latest", "all", "ground_truth"] = "latest"
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if self.which not in ("latest", "all", "ground_truth"):
            raise ValueError(f"unknown annotation policy {self.which!r}")


@dataclass
class _Parsed:
    """One annotation's usable instances, with the problems found in it (merged only if chosen)."""

    annotation: dict
    instances: list[Instance] = field(default_factory=list)
    report: SkipReport = field(default_factory=SkipReport)
    size: tuple[int, int] | None = None  # (width, height)


def load_labelstudio_export(
    path_or_list: str | PathLike | Sequence[dict],
    labels: Sequence[str] | None = None,
    image_key: str | None = None,
    policy: AnnotationPolicy = AnnotationPolicy(),
) -> tuple[list[Sample], SkipReport]:
    """Samples from an export (a file path or the already-loaded task list).

    `labels`: when given, regions with any other label are skipped ('unknown label').
    `image_key`: the task `data` key holding the image; by default 'image', or the only
    string value in `data`. Task ids are the tasks' `id`, or their list index when absent
    (import files have no ids).
    """
    tasks = _read_tasks(path_or_list)
    known = set(labels) if labels is not None else None
    samples: list[Sample] = []
    report = SkipReport()
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            report.add("malformed task", index)
            continue
        task_id = task.get("id", index)
        live = _live_annotations(task, task_id, report)
        if not live:
            continue
        image_ref = task_image_ref(task.get("data"), image_key)
        if image_ref is None:
            report.add("missing image", task_id)
            continue
        parsed = [_parse_annotation(a, known, task_id) for a in live]
        if policy.min_agreement is not None and len(parsed) >= 2:
            if task_agreement([p.instances for p in parsed]) < policy.min_agreement:
                report.add("low agreement", task_id)
                continue
        chosen = _choose(parsed, policy.which)
        if not chosen:
            report.add("no ground truth", task_id)
            continue
        for p in chosen:
            report.merge(p.report)
            if not p.instances:
                report.add("no instances", task_id)
                continue
            width, height = p.size
            samples.append(Sample(task_id, image_ref, p.instances, width, height))
    return samples, report


def load_labelstudio_export_file(path: str | PathLike, **kwargs: Any) -> tuple[list[Sample], SkipReport]:
    """`load_labelstudio_export` for a JSON file; keyword arguments as there."""
    return load_labelstudio_export(Path(path), **kwargs)


def _read_tasks(path_or_list: str | PathLike | Sequence[dict]) -> Sequence[Any]:
    if isinstance(path_or_list, (str, PathLike)):
        with open(path_or_list, encoding="utf-8") as f:
            tasks = json.load(f)
    else:
        tasks = path_or_list
    if isinstance(tasks, dict):  # a single task
        tasks = [tasks]
    if not isinstance(tasks, Sequence):
        raise ValueError("a Label Studio export is a JSON list of tasks")
    return tasks


def _live_annotations(task: dict, task_id: int | str, report: SkipReport) -> list[dict]:
    annotations = task.get("annotations") or []
    if not annotations:
        report.add("no annotation", task_id)
        return []
    live = []
    for ann in annotations:
        if not isinstance(ann, dict):
            report.add("malformed task", task_id)
        elif ann.get("was_cancelled"):
            report.add("cancelled", task_id)
        else:
            live.append(ann)
    return live


def _timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        return _OLDEST
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return _OLDEST
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _recency(p: _Parsed) -> tuple[datetime, int]:
    ann = p.annotation
    ann_id = ann.get("id")
    return (_timestamp(ann.get("updated_at") or ann.get("created_at")), ann_id if isinstance(ann_id, int) else -1)


def _choose(parsed: list[_Parsed], which: str) -> list[_Parsed]:
    if which == "all":
        return parsed
    if which == "ground_truth":
        parsed = [p for p in parsed if p.annotation.get("ground_truth")]
    return [max(parsed, key=_recency)] if parsed else []


def _parse_annotation(annotation: dict, labels: set[str] | None, task_id: int | str) -> _Parsed:
    out = _Parsed(annotation)
    result = annotation.get("result") or []
    for region in result if isinstance(result, list) else []:
        try:
            decoded = decode_region(region, labels)
            size = (decoded.width, decoded.height)
            if out.size is None:
                out.size = size
            elif size != out.size:
                raise RegionSkip("size mismatch")
        except RegionSkip as skip:
            out.report.add(skip.reason, task_id)
            continue
        out.instances.append(Instance(decoded.label, decoded.mask, decoded.box, decoded.kind))
    return out
