"""End to end with a real Label Studio 1.23.2: the REST calls the editor makes, against our backend.

Project from label_configs/brush_interactive.xml (labels set to the synthetic shapes, structure
kept) -> import images -> connect the backend (interactive) -> open a task (Label Studio asks
/predict) -> Retrieve Predictions -> smart keypoint / positive+negative pair / smart box through
/api/ml/<id>/interactive-annotating -> submit annotations (webhooks, no training) -> Train (the
START_TRAINING webhook starts a background job that exports the annotations from Label Studio).

Each test checks what Label Studio itself stored or answered, not only what the backend said.
The tests run in file order and share one project (module fixture).
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

import ls_harness as h  # tests/e2e is put on sys.path by its conftest
from ls_harness import SynthImage, note

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = h.REPO / "label_configs" / "brush_interactive.xml"
OUTPUT, POINT, BOX = "tag", "tag2", "tag3"  # the control names in brush_interactive.xml
TRAIN_TIMEOUT_S = 240.0
ANNOTATION_MAX_S = 5.0  # the webhook has a 1 s read timeout; a submit must not wait for training


def project_config(labels: list[str]) -> str:
    """brush_interactive.xml with its labels replaced on every labels control (names and attributes kept)."""
    root = ET.fromstring(CONFIG.read_text(encoding="utf-8"))
    controls = [el for el in root.iter() if el.tag in ("BrushLabels", "KeyPointLabels", "RectangleLabels")]
    assert {c.get("name") for c in controls} == {OUTPUT, POINT, BOX}, "brush_interactive.xml changed its control names"
    palette = ["#E6194B", "#3CB44B", "#4363D8", "#F58231", "#911EB4", "#42D4F4"]
    for control in controls:
        for label in list(control):
            control.remove(label)
        for i, value in enumerate(labels):
            ET.SubElement(control, "Label", value=value, background=palette[i % len(palette)])
    return ET.tostring(root, encoding="unicode")


def decode_region(region: dict, image: SynthImage, labels: list[str], where: str) -> np.ndarray:
    """Check one stored brush region and return its mask (bool, H x W)."""
    assert region["type"] == "brushlabels", f"{where}: {h.dump(region)}"
    assert region["from_name"] == OUTPUT and region["to_name"] == "image", f"{where}: {h.dump(region)}"
    assert (region["original_width"], region["original_height"]) == (image.width, image.height), (
        f"{where}: region size {region['original_width']}x{region['original_height']} "
        f"!= image {image.width}x{image.height}")
    value = region["value"]
    assert value.get("format") == "rle" and isinstance(value.get("rle"), list) and value["rle"], f"{where}: no RLE"
    assert len(value["brushlabels"]) == 1 and value["brushlabels"][0] in labels, (
        f"{where}: label {value['brushlabels']} not in the config {labels}")
    flat = decode_rle(value["rle"])
    assert flat.size == image.width * image.height * 4, (
        f"{where}: RLE decodes to {flat.size} values, not {image.width}x{image.height}x4")
    mask = flat.reshape(image.height, image.width, 4)[..., 3] > 0
    assert mask.any(), f"{where}: empty mask"
    return mask


def deepest_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel farthest from the mask's border: an unambiguous click on the object."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def pick_object(image: SynthImage, exclude: int | None = None) -> int:
    """Index of the object with the largest inscribed circle (the easiest to click)."""
    depth = [
        -1.0 if i == exclude else float(cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5).max())
        for i, (_, m) in enumerate(image.objects)
    ]
    return int(np.argmax(depth))


def keypoint(image: SynthImage, x: int, y: int, label: str, positive: bool) -> dict:
    """A smart keypoint region as the editor sends it (percent coordinates of the pixel's centre)."""
    return {
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": (x + 0.5) * 100 / image.width, "y": (y + 0.5) * 100 / image.height, "width": 2.5,
                  "keypointlabels": [label], "labels": [label]},
        "is_positive": positive, "id": uuid.uuid4().hex[:10], "from_name": POINT, "to_name": "image",
        "type": "keypointlabels", "origin": "manual",
    }


def rectangle(image: SynthImage, box: tuple[int, int, int, int], label: str) -> dict:
    """A smart rectangle region (top-left corner and size in percent; no is_positive)."""
    x0, y0, x1, y1 = box
    return {
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": x0 * 100 / image.width, "y": y0 * 100 / image.height,
                  "width": (x1 - x0) * 100 / image.width, "height": (y1 - y0) * 100 / image.height,
                  "rotation": 0, "rectanglelabels": [label]},
        "id": uuid.uuid4().hex[:10], "from_name": BOX, "to_name": "image", "type": "rectanglelabels", "origin": "manual",
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ----------------------------------------------------------------------------- the shared project


@pytest.fixture(scope="module")
def project(ls_api: h.LabelStudioAPI, backend: h.BackendServer, synth_images: list[SynthImage], model_choice):
    labels = model_choice.labels
    config = project_config(labels)
    created = ls_api.create_project("OVSAM e2e", config)
    pid = created["id"]
    imported = ls_api.import_files(pid, [im.path for im in synth_images])
    assert imported["task_count"] == len(synth_images), f"import: {imported}"
    tasks = ls_api.tasks(pid)
    assert len(tasks) == len(synth_images)
    by_task: dict[int, SynthImage] = {}
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith(f"/data/upload/{pid}/"), f"unexpected image url {url}"
        match = [im for im in synth_images if url.endswith("-" + im.path.name)]
        assert len(match) == 1, f"cannot tell which image {url} is"
        by_task[task["id"]] = match[0]
    t0 = time.monotonic()
    r = ls_api.connect_backend(pid, backend.url)
    connect_s = time.monotonic() - t0
    assert r.status_code == 201, f"POST /api/ml -> {r.status_code}: {r.text[:1500]}\nbackend log:\n{backend.process.log()}"
    ml = r.json()
    note(f"project {pid}: {len(tasks)} tasks imported ({', '.join(f'{im.width}x{im.height}' for im in synth_images)}); "
         f"backend connected as ml {ml['id']} in {connect_s:.2f} s, state {ml.get('state')!r}, "
         f"is_interactive {ml.get('is_interactive')}")
    return {"id": pid, "ml": ml, "tasks": by_task, "labels": labels, "config": config}


def backend_version(backend: h.BackendServer, project_id: int) -> str:
    """The model_version a project sees: its own trained version, or the shared base's."""
    health = backend.get("/health").json()
    return health.get("projects", {}).get(str(project_id), health["model_version"])


# ----------------------------------------------------------------------------- tests


def test_backend_connected(ls_api, project, backend):
    ml = ls_api.get(f"/api/ml/{project['ml']['id']}")
    assert ml["state"] == "CO", f"ML backend state {ml['state']!r}: {h.dump(ml)}"
    assert ml["is_interactive"] is True
    assert ml["url"].rstrip("/") == backend.url
    # Label Studio registered <url>/webhook for the project (needs SSRF_PROTECTION_ENABLED=false).
    hooks = ls_api.get(f"/api/webhooks?project={project['id']}")
    urls = [w["url"].rstrip("/") for w in hooks]
    assert f"{backend.url}/webhook" in urls, f"webhooks: {urls}"
    # Connecting validated the backend with /health and /setup (twice: before and after saving it).
    calls = _calls(backend)
    assert calls.get("GET /health", 0) >= 1 and calls.get("POST /setup", 0) >= 1, calls
    note(f"connect: state CO, webhook {backend.url}/webhook registered; calls so far {calls}")


def test_open_task_predicts(ls_api, project, backend, model_choice):
    """GET /api/tasks/<id> on a task without predictions makes Label Studio call /predict for it."""
    task_id = min(project["tasks"])
    image = project["tasks"][task_id]
    assert ls_api.predictions(task_id) == []
    t0 = time.monotonic()
    task = ls_api.get(f"/api/tasks/{task_id}")
    seconds = time.monotonic() - t0
    stored = ls_api.predictions(task_id)
    assert len(stored) == 1, f"task open stored {len(stored)} predictions: {h.dump(stored)}\n{backend.process.log()}"
    version = backend_version(backend, project["id"])
    assert stored[0]["model_version"] == version
    masks = [decode_region(r, image, project["labels"], f"task {task_id} region {i}") for i, r in enumerate(stored[0]["result"])]
    if model_choice.trained:
        assert masks, "the trained model found nothing on a synthetic image"
    assert task["data"]["image"].startswith("/data/upload/")
    note(f"task open: GET /api/tasks/{task_id} took {seconds:.2f} s and stored 1 prediction "
         f"({len(masks)} regions, model_version {version!r}, score {stored[0].get('score')})")


def test_retrieve_predictions(ls_api, project, backend, model_choice):
    """Data Manager 'Retrieve Predictions' on all tasks; then check what Label Studio stored."""
    t0 = time.monotonic()
    answer = ls_api.retrieve_predictions(project["id"])
    seconds = time.monotonic() - t0
    version = backend_version(backend, project["id"])
    lines, total, labels_seen = [], 0, set()
    for task_id, image in sorted(project["tasks"].items()):
        stored = ls_api.predictions(task_id)
        # one each: the task opened before already had a prediction of this model_version, so it was skipped
        assert len(stored) == 1, f"task {task_id}: {len(stored)} predictions: {h.dump(stored, 3000)}"
        pred = stored[0]
        assert pred["model_version"] == version, f"task {task_id}: model_version {pred['model_version']!r} != {version!r}"
        assert pred["task"] == task_id
        masks = []
        for i, region in enumerate(pred["result"]):
            masks.append(decode_region(region, image, project["labels"], f"task {task_id} region {i}"))
            labels_seen.add(region["value"]["brushlabels"][0])
            assert 0.0 <= float(region.get("score", 0.0)) <= 1.0
        if model_choice.trained:
            assert masks, f"task {task_id}: the trained model found nothing"
            best = [max((iou(m, gt) for m in masks), default=0.0) for _, gt in image.objects]
            lines.append(f"{image.width}x{image.height}: {len(masks)} regions, best IoU per object "
                         + "/".join(f"{b:.2f}" for b in best))
        else:
            lines.append(f"{image.width}x{image.height}: {len(masks)} regions")
        total += len(masks)
    if model_choice.trained:
        assert total > 0, "no regions in any prediction"
    # (a random model's masks fail automatic mode's stability filter: zero regions is a valid answer)
    note(f"retrieve predictions: {answer} in {seconds:.2f} s; stored 1 prediction per task, "
         f"model_version {version!r}, {total} brush regions, labels {sorted(labels_seen)}; " + "; ".join(lines))


BULK_TASKS = 150
BULK_WAIT_S = 600.0  # generous: about 0.3 s a task on 2 CPU cores with the demo model


def test_retrieve_predictions_on_a_large_dataset(ls_api, backend, model_choice, tmp_path_factory):
    """Retrieve Predictions once on 150 tasks: no error in Label Studio, every task ends with one valid prediction.

    The backend answers what it computes within PREDICT_BATCH_BUDGET_S (set low for the e2e backend) and posts the
    rest through Label Studio's API from a background job; no task may hold an empty placeholder or two regions of
    one object (mask IoU >= 0.8).
    """
    import json
    import subprocess
    import sys

    from label_studio_sdk.converter.brush import decode_rle as _decode

    root = tmp_path_factory.mktemp("bulk")
    proc = subprocess.run(
        [sys.executable, "-m", "training", "synth", "--out", str(root / "ds"), "--num-images", str(BULK_TASKS),
         "--size", "160x120", "--seed", "4242", "--min-objects", "2", "--max-objects", "4", "--no-progress"],
        cwd=h.REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    truth = json.loads((root / "ds" / "tasks.json").read_text())
    paths = sorted((root / "ds" / "images").glob("*.png"))
    assert len(paths) == BULK_TASKS
    labels = model_choice.labels
    created = ls_api.create_project("OVSAM e2e bulk", project_config(labels))
    pid = created["id"]
    for start in range(0, BULK_TASKS, 50):  # Django takes at most 100 files per request
        imported = ls_api.import_files(pid, paths[start:start + 50])
        assert imported["task_count"] == len(paths[start:start + 50]), f"import: {imported}"
    r = ls_api.connect_backend(pid, backend.url, title="OVSAM e2e bulk")
    assert r.status_code == 201, r.text[:1500]
    t0 = time.monotonic()
    answer = ls_api.retrieve_predictions(pid)
    answer_s = time.monotonic() - t0
    assert "errors" not in answer and "Retrieved" in str(answer.get("detail", "")), answer
    version = backend_version(backend, pid)
    tasks = ls_api.tasks(pid)
    assert len(tasks) == BULK_TASKS
    deadline = time.monotonic() + BULK_WAIT_S
    while True:
        counts = [len(ls_api.predictions(t["id"])) for t in tasks]
        if all(c >= 1 for c in counts) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    done_s = time.monotonic() - t0
    missing = [t["id"] for t, c in zip(tasks, counts) if c == 0]
    assert not missing, f"{len(missing)} tasks without a prediction after {BULK_WAIT_S:.0f} s; jobs {_jobs(backend)}"
    jobs = [j for j in _jobs(backend) if j.get("kind") == "predict" and j["project"] == str(pid)]
    regions = duplicates = 0
    for task in tasks:
        stored = ls_api.predictions(task["id"])
        assert len(stored) == 1, f"task {task['id']}: {len(stored)} predictions: {h.dump(stored, 2000)}"
        pred = stored[0]
        assert pred["model_version"] == version
        masks = []
        for region in pred["result"]:
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"][0] in labels
            w, h_ = region["original_width"], region["original_height"]
            masks.append(_decode(region["value"]["rle"]).reshape(h_, w, 4)[..., 3] > 0)
        regions += len(masks)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                duplicates += iou(masks[i], masks[j]) >= 0.8
    if model_choice.trained:
        assert regions > 0
        assert duplicates == 0, f"{duplicates} pairs of regions with mask IoU >= 0.8 in one task"
    note(f"bulk retrieve: {BULK_TASKS} tasks, Label Studio answered {answer} in {answer_s:.1f} s; every task had one "
         f"prediction of {version!r} after {done_s:.1f} s ({len(jobs)} background job(s): "
         f"{[(j['status'], j['progress'].get('done'), j['progress'].get('total')) for j in jobs]}); "
         f"{regions} regions, {duplicates} duplicate pairs; {len(truth)} ground-truth tasks")


def _interactive(ls_api, project, task_id, result, what):
    t0 = time.monotonic()
    answer = ls_api.interactive(project["ml"]["id"], task_id, result)
    seconds = time.monotonic() - t0
    assert "errors" not in answer, f"{what}: Label Studio answered errors: {answer['errors']}"
    data = answer.get("data")
    assert isinstance(data, dict) and isinstance(data.get("result"), list), f"{what}: {h.dump(answer)}"
    regions = data["result"]
    assert len(regions) == 1, f"{what}: {len(regions)} regions: {h.dump(regions)}"
    return regions[0], data, seconds


def test_interactive_keypoint(ls_api, project, model_choice):
    task_id = max(project["tasks"], key=lambda t: project["tasks"][t].width)  # the 320x240 image
    image = project["tasks"][task_id]
    k = pick_object(image)
    label, gt = image.objects[k]
    x, y = deepest_point(gt)
    region, data, seconds = _interactive(ls_api, project, task_id, [keypoint(image, x, y, label, True)], "keypoint")
    mask = decode_region(region, image, project["labels"], "keypoint answer")
    covered = bool(mask[y, x])
    if model_choice.trained:
        assert covered, f"the mask does not cover the click at ({x}, {y}) (label {region['value']['brushlabels']})"
    note(f"keypoint on a {label} at ({x},{y}) of {image.width}x{image.height}: {seconds:.2f} s, "
         f"label {region['value']['brushlabels'][0]!r} (truth {label!r}), score {region.get('score', data.get('score'))}, "
         f"covers click {covered}, IoU with truth {iou(mask, gt):.2f}")


def test_interactive_positive_negative(ls_api, project, model_choice):
    task_id = max(project["tasks"], key=lambda t: project["tasks"][t].width)
    image = project["tasks"][task_id]
    k = pick_object(image)
    j = pick_object(image, exclude=k)
    label, gt = image.objects[k]
    (x, y), (nx, ny) = deepest_point(gt), deepest_point(image.objects[j][1])
    assert not gt[ny, nx]
    result = [keypoint(image, x, y, label, True), keypoint(image, nx, ny, label, False)]
    region, data, seconds = _interactive(ls_api, project, task_id, result, "positive+negative")
    mask = decode_region(region, image, project["labels"], "positive+negative answer")
    covered, negative_in = bool(mask[y, x]), bool(mask[ny, nx])
    if model_choice.trained:
        assert covered, f"the mask does not cover the positive click at ({x}, {y})"
        assert not negative_in, f"the mask covers the negative click at ({nx}, {ny})"
    note(f"positive+negative: {seconds:.2f} s, label {region['value']['brushlabels'][0]!r}, covers positive {covered}, "
         f"covers negative {negative_in}, IoU with truth {iou(mask, gt):.2f}")


def test_interactive_box(ls_api, project, model_choice):
    task_id = min(project["tasks"], key=lambda t: project["tasks"][t].width)  # the 160x120 image
    image = project["tasks"][task_id]
    k = pick_object(image)
    label, gt = image.objects[k]
    ys, xs = np.nonzero(gt)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    x, y = deepest_point(gt)
    region, data, seconds = _interactive(ls_api, project, task_id, [rectangle(image, box, label)], "box")
    mask = decode_region(region, image, project["labels"], "box answer")
    covered = bool(mask[y, x])
    if model_choice.trained:
        assert covered, f"the mask does not cover the object's centre ({x}, {y}) inside the box {box}"
    note(f"smart box {box} around a {label} on {image.width}x{image.height}: {seconds:.2f} s, label "
         f"{region['value']['brushlabels'][0]!r}, covers the object's centre {covered}, IoU with truth {iou(mask, gt):.2f}")


def _calls(backend) -> dict[str, int]:
    """Requests the backend has served so far, per endpoint (its /metrics, which is not counted here)."""
    requests_ = backend.get("/metrics").json()["requests"]
    return {k: v["count"] for k, v in requests_.items() if k not in ("GET /metrics", "GET /jobs", "GET /jobs/{job_id}")}


def _jobs(backend) -> list[dict]:
    return backend.get("/jobs").json()["jobs"]


def _counter(backend, name: str) -> int:
    return int(backend.get("/metrics").json().get("counters", {}).get(name, 0))


def test_annotations_do_not_train(ls_api, project, backend):
    """Submitting annotations sends ANNOTATION_CREATED webhooks synchronously; they must be quick and start nothing."""
    before_jobs = _jobs(backend)
    before_hooks = _counter(backend, "webhook_annotation_created")
    times = []
    for task_id, image in sorted(project["tasks"].items()):
        result = []
        for i, (label, mask) in enumerate(image.objects):
            result.append({
                "id": f"gt{task_id}_{i}", "from_name": OUTPUT, "to_name": "image", "type": "brushlabels",
                "original_width": image.width, "original_height": image.height, "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
            })
        t0 = time.monotonic()
        r = ls_api.post(f"/api/tasks/{task_id}/annotations", {"result": result, "was_cancelled": False,
                                                             "ground_truth": False, "lead_time": 3.0}, expect=201)
        times.append(time.monotonic() - t0)
        stored = r.json()
        assert len(stored["result"]) == len(result)
    assert max(times) < ANNOTATION_MAX_S, f"annotation submits took {times}"
    after_hooks = _counter(backend, "webhook_annotation_created")
    assert after_hooks - before_hooks == len(project["tasks"]), (
        f"the backend got {after_hooks - before_hooks} ANNOTATION_CREATED webhooks for {len(project['tasks'])} submits")
    after_jobs = _jobs(backend)
    assert len(after_jobs) == len(before_jobs), f"an annotation started a job: {after_jobs}"
    note(f"annotations: {len(times)} submitted, {', '.join(f'{t:.2f}' for t in times)} s each; the backend got "
         f"{after_hooks - before_hooks} ANNOTATION_CREATED webhooks and started no job")


def test_train(ls_api, project, backend):
    """Train button -> START_TRAINING webhook -> background job (export, fine-tune, evaluate, promote)."""
    ml_id = project["ml"]["id"]
    version_before = backend_version(backend, project["id"])
    jobs_before = {j["id"] for j in _jobs(backend)}
    t0 = time.monotonic()
    r = ls_api.post(f"/api/ml/{ml_id}/train", {}, expect=200)
    answer_s = time.monotonic() - t0
    new = [j for j in _jobs(backend) if j["id"] not in jobs_before]
    assert len(new) == 1, f"Train started {len(new)} jobs; answer {r.text[:500]}"
    job = new[0]
    assert job["project"] == str(project["id"])
    states = []
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        ml = ls_api.get(f"/api/ml/{ml_id}")  # Label Studio's view (also calls /health)
        if not states or states[-1] != ml["state"]:
            states.append(ml["state"])
        job = backend.get(f"/jobs/{job['id']}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    train_s = time.monotonic() - t0
    assert job["status"] in ("succeeded", "failed"), f"job still {job['status']} after {TRAIN_TIMEOUT_S:.0f} s: {job}"
    health = backend.get("/health").json()
    assert health["jobs"]["latest"][str(project["id"])]["status"] == job["status"]
    pipeline = h.REPO / "training" / "pipeline.py"
    ls_versions = ls_api.get(f"/api/ml/{ml_id}/versions")  # Label Studio relays the backend's GET /versions
    assert backend_version(backend, project["id"]) in ls_versions["versions"], ls_versions
    if not pipeline.is_file():
        assert job["status"] == "failed" and "training is unavailable" in job["message"], job
        assert backend_version(backend, project["id"]) == version_before
        note(f"train: POST /api/ml/{ml_id}/train answered 200 in {answer_s:.2f} s; job {job['id']} failed as expected "
             f"(no training/pipeline.py): {job['message']!r}; Label Studio states {states}; "
             f"/api/ml/{ml_id}/versions {ls_versions}")
        return
    assert job["status"] == "succeeded", f"training job failed: {job}\nbackend log:\n{backend.process.log(6000)}"
    versions = backend.get(f"/versions?project={project['id']}").json()  # Label Studio's GET names no project
    stored = [d["version"] for d in versions.get("details", [])]
    new_versions = [v for v in stored if v != version_before]
    assert new_versions, f"no new model version after training: {versions}"
    assert set(new_versions) <= set(ls_versions["versions"]), f"Label Studio shows {ls_versions}, backend {versions}"
    line = (f"train: answered 200 in {answer_s:.2f} s; job {job['id']} succeeded in {train_s:.1f} s ({job['message']}); "
            f"promoted {job['promoted']}; backend /versions {versions['versions']}; Label Studio "
            f"/api/ml/{ml_id}/versions {ls_versions['versions']}; states {states}")
    if not job["promoted"]:
        assert backend_version(backend, project["id"]) == version_before
        note(line)
        return
    new_version = job["model_version"]
    assert new_version and new_version != version_before
    assert backend_version(backend, project["id"]) == new_version and versions["current"] == new_version
    # /setup now reports the new version: Label Studio records it, and Retrieve Predictions
    # predicts again (it skips only tasks that have a prediction of the /setup version).
    ml = ls_api.get(f"/api/ml/{ml_id}")
    assert ml["model_version"] == new_version, f"Label Studio's backend model_version {ml['model_version']!r}"
    ls_api.retrieve_predictions(project["id"])
    for task_id in project["tasks"]:
        got = sorted(p["model_version"] for p in ls_api.predictions(task_id))
        assert new_version in got and version_before in got, f"task {task_id}: predictions of {got}"
    note(line + f"; after promotion Label Studio shows model_version {new_version!r} and Retrieve Predictions "
                f"added a prediction of it to every task")


def test_backend_saw_no_errors(backend):
    """Over the whole flow, every request Label Studio (and this test) made was answered without an error."""
    requests_ = backend.get("/metrics").json()["requests"]
    bad = {k: (v["client_errors"], v["server_errors"]) for k, v in requests_.items()
           if v["client_errors"] or v["server_errors"]}
    assert not bad, f"backend answered errors (4xx, 5xx) on {bad}\n{backend.process.log(6000)}"
    note("backend requests: " + ", ".join(f"{k} x{v['count']} (p95 {v['latency_ms']['p95']:.0f} ms)"
                                         for k, v in requests_.items()))
