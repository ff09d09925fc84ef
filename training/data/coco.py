"""Read COCO instance files (polygons or RLE) into `Sample`s.

Masks are decoded eagerly at the original size, which suits project-sized data sets; for
all of COCO train (about 860k instances) a lazy dataset over `pycocotools.COCO` is needed.

Skip reasons: 'no annotation' (image without usable instances), 'crowd', 'unknown label',
'empty mask', 'corrupt mask', 'empty box'.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from os import PathLike
from urllib.parse import urlsplit

import numpy as np
from pycocotools.coco import COCO

from ovsam.boxes import box_is_empty, mask_to_box

from .types import Instance, Sample, SkipReport


def load_coco(
    instances_json: str | PathLike,
    image_root: str | PathLike,
    labels: Sequence[str] | None = None,
    include_crowd: bool = False,
) -> tuple[list[Sample], SkipReport]:
    """Samples for every image of the file that keeps at least one instance.

    Labels are the category names; `labels`, when given, keeps only those categories (others
    count as 'unknown label'). Crowd regions are skipped and counted unless `include_crowd`.
    Task ids are the COCO image ids; `image_ref` is `image_root / file_name` (LVIS v1: see `image_file`).
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(instances_json))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    known = set(labels) if labels is not None else None
    samples: list[Sample] = []
    report = SkipReport()
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        instances = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
            reason, instance = _instance(coco, ann, names, known, include_crowd)
            if instance is None:
                report.add(reason, image_id)
            else:
                instances.append(instance)
        if not instances:
            report.add("no annotation", image_id)
            continue
        image_ref = os.path.join(os.fspath(image_root), image_file(info))
        samples.append(Sample(image_id, image_ref, instances, int(info["width"]), int(info["height"])))
    return samples, report


def image_file(info: dict) -> str:
    """An image entry's path under the image root: COCO's `file_name`; LVIS v1 entries have none, and (as
    mmdet's LVISV1Dataset) the path is their `coco_url` after the host, e.g. `val2017/000000397133.jpg`."""
    if info.get("file_name"):
        return str(info["file_name"])
    url = info.get("coco_url")
    if url:
        return urlsplit(str(url)).path.lstrip("/")
    raise ValueError(f"image {info.get('id')!r} has neither file_name nor coco_url")


def read_categories(instances_json: str | PathLike) -> list[dict]:
    """The file's `categories` (id, name and, for LVIS, frequency r/c/f)."""
    with open(instances_json, encoding="utf-8") as f:
        return list(json.load(f)["categories"])


def _instance(
    coco: COCO, ann: dict, names: dict[int, str], known: set[str] | None, include_crowd: bool
) -> tuple[str, Instance | None]:
    if ann.get("iscrowd") and not include_crowd:
        return "crowd", None
    label = names.get(ann.get("category_id"))
    if label is None or (known is not None and label not in known):
        return "unknown label", None
    if not ann.get("segmentation"):
        box = _xywh_to_xyxy(ann.get("bbox"))
        if box is None or box_is_empty(box):
            return "empty box", None
        return "", Instance(label, None, box, "box")
    try:
        mask = coco.annToMask(ann).astype(bool)
    except Exception:  # pycocotools raises assorted errors (TypeError, IndexError, ...) on bad input
        return "corrupt mask", None
    if not mask.any():
        return "empty mask", None
    kind = "polygon" if isinstance(ann["segmentation"], list) else "rle"
    return "", Instance(label, mask, mask_to_box(mask), kind)


def _xywh_to_xyxy(bbox: Sequence[float] | None) -> np.ndarray | None:
    if not bbox or len(bbox) != 4:
        return None
    x, y, w, h = map(float, bbox)
    return np.array([x, y, x + w, y + h], dtype=np.float32)
