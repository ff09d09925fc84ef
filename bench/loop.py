"""The active-learning loop, end to end, measured.

A "new project" whose labels the served model has never been trained on: the synthetic shapes of
``python -m training synth`` under new names (``buoy`` is a circle, ``tile`` a square, ...), so the
demo model outlines objects well but names them at about chance. Each round:

1. the backend pre-annotates the not yet labelled tasks of the pool (``POST /predict``, automatic mode;
   each task gets the backend's task score);
2. the next tasks are picked, lowest task score first (``active``) or at random (``random``);
3. an annotator accepts them after correcting: the ground truth becomes their annotation, which a
   stand-in for Label Studio then exports (``/api/projects/<id>/export``) with the images (``/data/upload``);
4. ``START_TRAINING`` goes to the backend's ``/webhook``: the backend exports, fine-tunes CLIP2SAM with
   the training package, gates and promotes the new version and serves it (polled through ``/jobs``);
5. the served model is evaluated on held-out images through the same HTTP API: a click at each
   object's centre and its box (label accuracy, mask mIoU), and pre-annotation (precision and recall
   at IoU 0.5, the share of regions an annotator would accept unchanged: right label, IoU >= 0.85).

Both orders run on the same pool and held-out images, each with its own backend and model folder.
Prints a table per round, writes ``loop.json`` and ``loop.png`` (curves against annotations used).
With ``--seeds``, all of it runs on each data seed's own pool and held-out images, and the two orders are
compared over the seeds: on how many each needed fewer annotations to reach the target, and the mean curves
(one seed's held-out clicks move accuracy in steps of about 0.01, as much as the orders differ).

    .venv/bin/python bench/loop.py [--base labelstudio_backend/default_model/ovsam_demo.safetensors]
                                   [--rounds 4] [--per-round 12] [--pool 60] [--held-out 30]
                                   [--orders active,random] [--seed 7 | --seeds 7,8,9] [--out bench-loop]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import BackendProcess, QuietHandler, serve  # noqa: E402  (bench/ is the script's folder)

TOKEN = "loop-token"
PROJECT_ID = 1
DEFAULT_BASE = REPO / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
DEFAULT_CLASSES = "buoy=circle,tile=square,pennant=triangle,starfish=star,donut=ring,plus=cross"
# Fine-tuning settings of the backend's training jobs (TRAINING_OPTIONS): fit the project's label embeddings to
# the base head's view of the annotated objects and train nothing else (`max_steps` 0). The demo model already
# outlines and tells apart these objects under its own names; retraining its FPN and RoI projection on a few dozen
# tasks (300 steps at lr 1e-3, the earlier default) relearned the head from the project's tasks and lost what it
# knew, and training its mask decoder on a dozen images made masks worse. Features are cached (no augmentation).
DEFAULT_TRAINING = {"fit_label_embeddings": True, "max_steps": 0, "augment": False, "cache_features": True,
                    "train_mask_decoder": False, "batch_size": 4, "val_fraction": 0.2, "eval_prompts": ["center", "box"]}
TARGET_ACCURACY, TARGET_CLICK_MIOU = 0.95, 0.85


# ----------------------------------------------------------------------------- data


@dataclass
class Task:
    """A synthetic task: its Label Studio JSON and the ground truth an annotator ends up with."""

    id: int
    url: str
    width: int
    height: int
    result: list[dict[str, Any]]  # the ground-truth brush regions (Label Studio JSON)
    masks: list[np.ndarray]
    labels: list[str]


# The generator draws image i of a seed the same whatever the count, so a held-out seed of seed + 1 made one data
# seed's held-out images the first images of the next seed's pool (with --seeds 7,8,9, seed 7's test images were in
# seed 8's pool). The demo recipe's held-out set is drawn at its data seed + 1000 too.
HELD_OUT_SEED_OFFSET = 1000


def held_out_seed(seed: int) -> int:
    """The generator seed of a data seed's held-out images: far from any other data seed's pool."""
    return seed + HELD_OUT_SEED_OFFSET


def make_split(out: Path, n: int, seed: int, classes: str, upload_dir: int, first_id: int) -> list[Task]:
    """`python -m training synth` into `out`, with image URLs under Label Studio's /data/upload/<dir>/."""
    from labelstudio_io.brush import decode_brush
    from training.synth import SynthConfig, _parse_classes, write_dataset

    write_dataset(SynthConfig(out=out, num_images=n, seed=seed, classes=_parse_classes(classes),
                              image_url_prefix=f"/data/upload/{upload_dir}"), progress=False)
    tasks = []
    for i, raw in enumerate(json.loads((out / "tasks.json").read_text())):
        result = raw["annotations"][0]["result"]
        w, h = result[0]["original_width"], result[0]["original_height"]
        masks = [decode_brush(r["value"]["rle"], w, h) for r in result]
        labels = [r["value"]["brushlabels"][0] for r in result]
        tasks.append(Task(first_id + i, raw["data"]["image"], w, h, result, masks, labels))
    return tasks


class FakeLabelStudio:
    """Stands in for Label Studio: serves task images and exports the accepted annotations (token checked)."""

    def __init__(self, image_dirs: dict[str, Path]) -> None:
        self.image_dirs = image_dirs  # "/data/upload/1" -> folder
        self.accepted: list[dict[str, Any]] = []
        self.exports = 0
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self.send(401, b'{"detail": "Authentication credentials were not provided."}')
                path = urlsplit(self.path).path
                if path == f"/api/projects/{PROJECT_ID}/export":
                    owner.exports += 1
                    return self.send(200, json.dumps(owner.accepted).encode(), "application/json")
                prefix, _, name = path.rpartition("/")
                folder = owner.image_dirs.get(prefix)
                if folder is not None and (folder / name).is_file() and "/" not in name:
                    return self.send(200, (folder / name).read_bytes(), "image/png")
                self.send(404, b"not found")

        self.server, self.url = serve(Handler)

    def accept(self, task: Task) -> None:
        """The annotator submits the corrected annotation (here: exactly the ground truth)."""
        self.accepted.append({
            "id": task.id, "data": {"image": task.url}, "project": PROJECT_ID,
            "annotations": [{"id": task.id, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
                             "result": task.result}],
            "predictions": [],
        })

    def close(self) -> None:
        self.server.shutdown()


# ----------------------------------------------------------------------------- talking to the backend


class BackendClient:
    """Label Studio's side of the ML-backend protocol, as the web app sends it."""

    def __init__(self, url: str, label_config: str, labels: list[str]) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600)
        self.label_config = label_config
        self.some_label = labels[0]  # what the annotator picked on the smart tool; the recognised label wins

    def _predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None) -> dict[str, Any]:
        body = {"tasks": tasks, "label_config": self.label_config, "project": f"{PROJECT_ID}.0",
                "params": {"login": None, "password": None, "context": context}}
        resp = self.http.post("/predict", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"/predict answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def preannotate(self, tasks: list[Task], chunk: int = 16) -> list[dict[str, Any]]:
        """Retrieve Predictions for these tasks: one result (regions + task score) per task."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(tasks), chunk):
            part = tasks[i : i + chunk]
            out += self._predict([{"id": t.id, "data": {"image": t.url}} for t in part], None)["results"]
        return out

    def click(self, task: Task, x: float, y: float) -> dict[str, Any]:
        region = {"original_width": task.width, "original_height": task.height, "image_rotation": 0,
                  "value": {"x": 100 * x / task.width, "y": 100 * y / task.height, "width": 0.5,
                            "keypointlabels": [self.some_label]},
                  "is_positive": True, "id": "click", "from_name": "tag_point", "to_name": "image",
                  "type": "keypointlabels", "origin": "manual"}
        return self._predict([{"id": task.id, "data": {"image": task.url}}], {"result": [region]})["results"][0]

    def box(self, task: Task, box: np.ndarray) -> dict[str, Any]:
        x0, y0, x1, y1 = (float(v) for v in box)
        region = {"original_width": task.width, "original_height": task.height, "image_rotation": 0,
                  "value": {"x": 100 * x0 / task.width, "y": 100 * y0 / task.height,
                            "width": 100 * (x1 - x0) / task.width, "height": 100 * (y1 - y0) / task.height,
                            "rotation": 0, "rectanglelabels": [self.some_label]},
                  "id": "box", "from_name": "tag_box", "to_name": "image", "type": "rectanglelabels",
                  "origin": "manual"}
        return self._predict([{"id": task.id, "data": {"image": task.url}}], {"result": [region]})["results"][0]

    def train(self, poll_s: float = 0.5) -> dict[str, Any]:
        """START_TRAINING as Label Studio's Train button sends it; waits for the job's end."""
        resp = self.http.post("/webhook", json={"action": "START_TRAINING",
                                                "project": {"id": PROJECT_ID, "label_config": self.label_config}})
        if resp.status_code != 200 or "job" not in resp.json():
            raise RuntimeError(f"/webhook answered {resp.status_code}: {resp.text[:500]}")
        job_id = resp.json()["job"]
        while True:
            job = self.http.get(f"/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(poll_s)

    def served_version(self) -> str:
        """The project's model_version (its own trained one, or the shared base's)."""
        health = self.http.get("/health").json()
        return health.get("projects", {}).get(str(PROJECT_ID), health.get("model_version", "?"))


def regions(result: dict[str, Any]) -> tuple[list[np.ndarray], list[str], list[float]]:
    """Masks, labels and scores of a /predict result's brush regions."""
    from labelstudio_io.brush import decode_brush

    masks, labels, scores = [], [], []
    for r in result.get("result", []):
        if r.get("type") != "brushlabels":
            continue
        masks.append(decode_brush(r["value"]["rle"], r["original_width"], r["original_height"]))
        labels.append(r["value"]["brushlabels"][0])
        scores.append(float(r.get("score", 0.0)))
    return masks, labels, scores


# ----------------------------------------------------------------------------- evaluation


def detection_counts(tasks: list[Task], results: list[dict[str, Any]]) -> Any:
    """Pre-annotation regions matched to the ground truth (class-aware, IoU 0.5; accepted at IoU 0.85)."""
    from training.metrics import DetectionCounts, match_detections

    counts = DetectionCounts()
    for task, result in zip(tasks, results):
        pm, pl, ps = regions(result)
        predicted = np.stack(pm) if pm else np.zeros((0, task.height, task.width), bool)
        counts = counts + match_detections(np.stack(task.masks), task.labels, predicted, pl, ps)
    return counts


def evaluate_served(client: BackendClient, held_out: list[Task], workers: int = 4) -> dict[str, Any]:
    """Clicks, boxes and pre-annotation of the held-out tasks, all through the backend's HTTP API."""
    from training.data.prompts import center_point
    from training.metrics import mask_iou

    def one_object(args: tuple[Task, int]) -> tuple[float, bool, float, bool]:
        task, k = args
        gt, label = task.masks[k], task.labels[k]
        x, y = center_point(gt)
        cm, cl, _ = regions(client.click(task, x + 0.5, y + 0.5))
        ys, xs = np.nonzero(gt)
        bm, bl, _ = regions(client.box(task, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])))
        click_iou = mask_iou(gt, cm[0]) if cm else 0.0
        box_iou = mask_iou(gt, bm[0]) if bm else 0.0
        return click_iou, bool(cl and cl[0] == label), box_iou, bool(bl and bl[0] == label)

    objects = [(t, k) for t in held_out for k in range(len(t.masks))]
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(one_object, objects))
    counts = detection_counts(held_out, client.preannotate(held_out))
    arr = np.array(rows, dtype=np.float64)
    return {
        "objects": len(rows),
        "click_accuracy": float(arr[:, 1].mean()), "click_miou": float(arr[:, 0].mean()),
        "box_accuracy": float(arr[:, 3].mean()), "box_miou": float(arr[:, 2].mean()),
        "pre_precision": counts.precision, "pre_recall": counts.recall,
        "pre_accepted_share": counts.acceptance_rate, "pre_regions": counts.num_pred,
    }


# ----------------------------------------------------------------------------- the loop


@dataclass
class Round:
    order: str
    round: int
    tasks_annotated: int
    regions_annotated: int
    model_version: str
    promoted: bool | None
    seconds: float
    train_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def target_met(self) -> bool:
        return (self.metrics["click_accuracy"] >= TARGET_ACCURACY and self.metrics["click_miou"] >= TARGET_CLICK_MIOU)


def pick_next(order: str, remaining: list[Task], client: BackendClient, n: int,
              rng: random.Random) -> tuple[list[Task], list[dict[str, Any]]]:
    """The next `n` tasks and their pre-annotations: lowest task score first (active) or a random draw.

    Active ordering needs every remaining task pre-annotated (Retrieve Predictions on the whole pool);
    random ordering pre-annotates only the tasks drawn, as an annotator opening them would see them.
    """
    if order == "random":
        picked = rng.sample(remaining, min(n, len(remaining)))
        return picked, client.preannotate(picked)
    results = client.preannotate(remaining)
    ranked = sorted(range(len(remaining)), key=lambda i: (float(results[i].get("score", 0.0)), remaining[i].id))
    return [remaining[i] for i in ranked[:n]], [results[i] for i in ranked[:n]]


def batch_acceptance(tasks: list[Task], results: list[dict[str, Any]]) -> dict[str, float]:
    """How much of the pre-annotation of the tasks being labelled an annotator keeps as it is."""
    counts = detection_counts(tasks, results)
    return {"batch_regions": counts.num_pred, "batch_accepted": counts.accepted,
            "batch_objects_accepted_share": counts.accepted / max(1, counts.num_gt)}


def backend_env(args: argparse.Namespace, studio: FakeLabelStudio, model_dir: Path, cache_dir: Path) -> dict[str, str]:
    """A backend process serving `args.base` from its own `model_dir`, reading images from `studio`."""
    return {"MODEL_DIR": str(model_dir), "OVSAM_CHECKPOINT": str(args.base), "DEVICE": args.device,
            "LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": TOKEN, "RECOGNISED_LABEL_WINS": "true",
            "LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(args.threads), "OVSAM_CACHE_DIR": str(cache_dir)}


def run_order(order: str, seed: int, args: argparse.Namespace, pool: list[Task], held_out: list[Task], image_dirs: dict[str, Path],
              label_config: str, labels: list[str], work: Path, training: dict[str, Any]) -> list[Round]:
    """One complete loop with its own Label Studio stand-in, backend process and model folder."""
    studio = FakeLabelStudio(image_dirs)
    env = {**backend_env(args, studio, work / order / "models", work / "cache"), "TRAINING_OPTIONS": json.dumps(training)}
    shutil.rmtree(work / order, ignore_errors=True)  # a fresh MODEL_DIR: nothing promoted by an earlier run
    (work / order).mkdir(parents=True)
    backend = BackendProcess(env, work / order / "backend.log")
    rounds: list[Round] = []
    try:
        client = BackendClient(backend.url, label_config, labels)
        rng = random.Random(seed)
        remaining = list(pool)
        t0 = time.perf_counter()
        rounds.append(Round(order, 0, 0, 0, client.served_version(), None, 0.0, 0.0,
                            evaluate_served(client, held_out)))
        rounds[-1].seconds = time.perf_counter() - t0
        print_round(rounds[-1])
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            picked, pre = pick_next(order, remaining, client, args.per_round, rng)
            batch = batch_acceptance(picked, pre)
            for task in picked:
                studio.accept(task)
                remaining.remove(task)
            t_train = time.perf_counter()
            job = client.train()
            t_train = time.perf_counter() - t_train
            if job["status"] != "succeeded" or not job.get("promoted"):
                print(f"  [{order}] round {r}: training job {job['status']}: {job['message']} "
                      f"{json.dumps(job.get('progress', {}))[:400]}", flush=True)
            metrics = evaluate_served(client, held_out)
            annotated = studio.accepted
            rounds.append(Round(order, r, len(annotated), sum(len(t["annotations"][0]["result"]) for t in annotated),
                                client.served_version(), job.get("promoted"), time.perf_counter() - t0, t_train,
                                {**metrics, **batch}))
            print_round(rounds[-1])
    finally:
        backend.stop()
        studio.close()
    return rounds


def measure_ceiling(args: argparse.Namespace, held_out: list[Task], image_dirs: dict[str, Path], work: Path) -> dict[str, Any]:
    """The base model on the held-out tasks, told that the project's labels are its own shape classes (``buoy`` is
    its ``circle``, ...): a perfect renaming. Fine-tuning only the recognition side on the base model's frozen
    features and masks learns at best that, so no round can be expected to beat these figures by more than noise.
    Through a backend of its own, like the rounds."""
    from training.synth import _parse_classes, label_config

    shape_of = dict(_parse_classes(args.classes))
    shapes = list(dict.fromkeys(shape_of.values()))
    renamed = [replace(t, labels=[shape_of[label] for label in t.labels]) for t in held_out]
    studio = FakeLabelStudio(image_dirs)
    env = backend_env(args, studio, work / "ceiling" / "models", work / "cache")
    shutil.rmtree(work / "ceiling", ignore_errors=True)
    (work / "ceiling").mkdir(parents=True)
    backend = BackendProcess(env, work / "ceiling" / "backend.log")
    try:
        return evaluate_served(BackendClient(backend.url, label_config(shapes), shapes), renamed)
    finally:
        backend.stop()
        studio.close()


def print_round(r: Round) -> None:
    m = r.metrics
    print(f"  {r.order:>6} {r.round:>3} {r.tasks_annotated:>6} {r.regions_annotated:>7}  "
          f"{m['click_accuracy']:7.3f} {m['click_miou']:7.3f} {m['box_accuracy']:7.3f} {m['box_miou']:7.3f}  "
          f"{m['pre_precision']:6.3f} {m['pre_recall']:6.3f} {m['pre_accepted_share']:6.3f}  "
          f"{m['batch_objects_accepted_share'] if 'batch_objects_accepted_share' in m else float('nan'):6.3f}  "
          f"{'-' if r.promoted is None else ('yes' if r.promoted else 'NO'):>4} {r.train_seconds:6.1f} {r.seconds:6.1f}",
          flush=True)


HEADER = ("   order rnd  tasks regions  clk-acc clk-IoU box-acc box-IoU  pre-P  pre-R  accept   kept  prom train-s round-s\n"
          "  (clk/box: held-out click and box prompts; pre-P/R, accept: held-out pre-annotation precision, recall at\n"
          "   IoU 0.5 and share of regions kept unchanged; kept: share of the objects in the round's own batch whose\n"
          "   pre-annotated region the annotator kept unchanged; prom: the round's model was promoted)")


def annotations_to_target(rounds: list[Round]) -> int | None:
    """Tasks annotated when the target was first met (None: never)."""
    return next((r.tasks_annotated for r in rounds if r.target_met), None)


def tasks_to_accuracy(rounds: list[Round], levels: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> dict[str, int | None]:
    """Tasks annotated when click accuracy first reached each level: how two orderings compare below the target."""
    return {f"{level:.2f}": next((r.tasks_annotated for r in rounds if r.metrics["click_accuracy"] >= level), None)
            for level in levels}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Curves against tasks annotated: each data seed's, and their mean when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("click_accuracy", "click → label accuracy", TARGET_ACCURACY), ("click_miou", "click mask mIoU", TARGET_CLICK_MIOU),
              ("box_miou", "box mask mIoU", None), ("pre_recall", "pre-annotation recall @0.5", None),
              ("pre_precision", "pre-annotation precision @0.5", None),
              ("pre_accepted_share", "pre-annotated regions accepted unchanged", None)]
    orders = list(runs[0]["results"])
    ceiling = mean_ceiling(runs)
    colours = {order: f"C{i}" for i, order in enumerate(orders)}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, target) in zip(axes.flat, panels):
        for order in orders:
            curves = [[r.metrics[key] for r in run["results"][order]] for run in runs]
            x = [r.tasks_annotated for r in runs[0]["results"][order]]
            if len(runs) == 1:
                ax.plot(x, curves[0], marker="o", color=colours[order], label=order)
                continue
            for run, curve in zip(runs, curves):
                ax.plot(x, curve, color=colours[order], alpha=0.25, linewidth=1)
            ax.plot(x, np.mean(curves, axis=0), marker="o", color=colours[order],
                    label=f"{order} (mean of {len(runs)} seeds)")
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        if key in ceiling:
            ax.axhline(ceiling[key], color="black", linestyle=":", linewidth=1, label="base model renamed (ceiling)")
        ax.set_title(title)
        ax.set_xlabel("tasks annotated")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_orders(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Active against random over the data seeds: which needed fewer tasks to reach the target, and mean curves.

    A seed where an ordering never met the target counts as needing more tasks than any that did.
    """
    never = float("inf")
    active_fewer = random_fewer = ties = 0
    for run in runs:
        a = run["summary"]["active"]["tasks_to_target"]
        b = run["summary"]["random"]["tasks_to_target"]
        a, b = never if a is None else a, never if b is None else b
        if a == b:
            ties += 1
        elif a < b:
            active_fewer += 1
        else:
            random_fewer += 1
    mean_curves = {
        order: {
            "tasks_annotated": [r.tasks_annotated for r in runs[0]["results"][order]],
            **{key: [round(float(np.mean([run["results"][order][i].metrics[key] for run in runs])), 4)
                     for i in range(len(runs[0]["results"][order]))]
               for key in ("click_accuracy", "click_miou", "box_accuracy")},
            "target_met_after_last_round": sum(run["summary"][order]["target_met_after_last_round"] for run in runs),
        }
        for order in ("active", "random")
    }
    return {"seeds": len(runs), "active_fewer_tasks_to_target": active_fewer,
            "random_fewer_tasks_to_target": random_fewer, "same_tasks_to_target": ties, "mean": mean_curves,
            "mean_ceiling": mean_ceiling(runs)}


def mean_ceiling(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The base model's renamed figures (`measure_ceiling`) averaged over the data seeds."""
    return {key: round(float(np.mean([run["ceiling"][key] for run in runs])), 4)
            for key in ("click_accuracy", "click_miou", "box_accuracy", "box_miou")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the model served at the start (artifact)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=12, help="tasks annotated per round")
    p.add_argument("--pool", type=int, default=60, help="unlabelled tasks to choose from")
    p.add_argument("--held-out", type=int, default=30, help="evaluation tasks (never annotated)")
    p.add_argument("--orders", default="active,random", help="comma list of: active, random")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help="the project's labels as label=shape pairs")
    p.add_argument("--training-options", default=None, help="JSON overrides of the training jobs' settings")
    p.add_argument("--seed", type=int, default=7, help=f"data seed (the held-out split uses seed+{HELD_OUT_SEED_OFFSET})")
    p.add_argument("--seeds", default=None,
                   help="comma list of data seeds: the whole loop on each (fresh data, backends and models), "
                        "then both orderings compared over all of them (overrides --seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the backend process")
    p.add_argument("--out", type=Path, default=None, help="folder for loop.json, loop.png and the run (default: a temp dir)")
    return p


def run_seed(seed: int, args: argparse.Namespace, orders: list[str], training: dict[str, Any], work: Path) -> dict[str, Any]:
    """Every ordering on one data seed's pool and held-out tasks; its per-round results and summary."""
    pool = make_split(work / "pool", args.pool, seed, args.classes, 1, 1)
    held_out = make_split(work / "held_out", args.held_out, held_out_seed(seed), args.classes, 2, 100_001)
    image_dirs = {"/data/upload/1": work / "pool" / "images", "/data/upload/2": work / "held_out" / "images"}
    label_config = (work / "pool" / "label_config.xml").read_text()
    labels = sorted({label for t in pool for label in t.labels})
    print(f"\ndata seed {seed}: base model {args.base.name}; labels {labels}; pool {len(pool)} tasks, held-out "
          f"{len(held_out)} tasks ({sum(len(t.masks) for t in held_out)} objects); training {json.dumps(training)}",
          flush=True)
    ceiling = measure_ceiling(args, held_out, image_dirs, work)
    print(f"ceiling: the base model told the labels are its shape classes ({args.classes}): click accuracy "
          f"{ceiling['click_accuracy']:.3f}, click mIoU {ceiling['click_miou']:.3f}, box accuracy "
          f"{ceiling['box_accuracy']:.3f}, box mIoU {ceiling['box_miou']:.3f}", flush=True)
    print(HEADER, flush=True)
    results: dict[str, list[Round]] = {}
    timings: dict[str, float] = {}
    for order in orders:
        t0 = time.perf_counter()
        results[order] = run_order(order, seed, args, pool, held_out, image_dirs, label_config, labels, work, training)
        timings[order] = time.perf_counter() - t0
    summary = {
        order: {
            "seconds": round(timings[order], 1),
            "final": rounds[-1].metrics,
            "target_met_after_last_round": rounds[-1].target_met,
            "tasks_to_target": annotations_to_target(rounds),
            "tasks_to_accuracy": tasks_to_accuracy(rounds),
        }
        for order, rounds in results.items()
    }
    print(f"target: click accuracy >= {TARGET_ACCURACY}, click mIoU >= {TARGET_CLICK_MIOU}")
    for order, s in summary.items():
        print(f"  {order:>6}: {s['seconds']:.0f} s, target after the last round: {'met' if s['target_met_after_last_round'] else 'MISSED'}; "
              f"tasks annotated to reach it: {s['tasks_to_target'] if s['tasks_to_target'] is not None else 'not reached'}")
    print("  tasks annotated until click accuracy first reached: "
          + "; ".join(f"{order} " + ", ".join(f"{lvl}: {'-' if n is None else n}" for lvl, n in s["tasks_to_accuracy"].items())
                      for order, s in summary.items()), flush=True)
    return {"seed": seed, "results": results, "summary": summary, "ceiling": ceiling}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or any(o not in ("active", "random") for o in orders):
        raise SystemExit(f"--orders takes active and/or random, got {args.orders!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else [args.seed]
    except ValueError:
        raise SystemExit(f"--seeds takes a comma list of integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs distinct seeds, got {args.seeds!r}")
    if set(seeds) & {held_out_seed(s) for s in seeds}:
        raise SystemExit(f"--seeds {args.seeds!r}: a seed's pool would be another seed's held-out images "
                         f"(held-out seed = seed + {HELD_OUT_SEED_OFFSET})")
    if not args.base.is_file():
        raise SystemExit(f"no model at {args.base}: train one (scripts/train_demo_model.sh) or pass --base")
    if args.rounds * args.per_round > args.pool:
        raise SystemExit(f"--pool {args.pool} is too small for {args.rounds} rounds of {args.per_round} tasks")
    training = {**DEFAULT_TRAINING, **(json.loads(args.training_options) if args.training_options else {})}
    out = args.out or Path(tempfile.mkdtemp(prefix="ovsam-loop-"))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    runs = [run_seed(seed, args, orders, training, out / "run" / f"seed{seed}") for seed in seeds]
    comparison = compare_orders(runs) if set(orders) == {"active", "random"} else None
    if comparison is not None:
        print(f"\nover {len(seeds)} data seed(s) {seeds}: active ordering needed fewer tasks to reach the target on "
              f"{comparison['active_fewer_tasks_to_target']}, random on {comparison['random_fewer_tasks_to_target']}, "
              f"the same on {comparison['same_tasks_to_target']}")
        for order, m in comparison["mean"].items():
            print(f"  {order:>6}: mean click accuracy after " + " / ".join(
                f"{n}: {a:.3f}" for n, a in zip(m["tasks_annotated"], m["click_accuracy"]))
                  + f" tasks; target met after the last round on {m['target_met_after_last_round']} of {len(seeds)}")
        c = comparison["mean_ceiling"]
        print(f"  ceiling (base model renamed), mean: click accuracy {c['click_accuracy']:.3f}, "
              f"click mIoU {c['click_miou']:.3f}, box accuracy {c['box_accuracy']:.3f}")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "training_options": training,
              "total_seconds": round(time.perf_counter() - started, 1), "comparison": comparison,
              "runs": [{"seed": run["seed"], "summary": run["summary"], "ceiling": run["ceiling"],
                        "rounds": {o: [{**asdict(r), "target_met": r.target_met} for r in rs]
                                   for o, rs in run["results"].items()}} for run in runs]}
    (out / "loop.json").write_text(json.dumps(report, indent=2))
    plot(runs, out / "loop.png")
    print(f"wrote {out / 'loop.json'} and {out / 'loop.png'} ({report['total_seconds']:.0f} s in all)")
    print(json.dumps({"comparison": comparison, "summaries": {run["seed"]: run["summary"] for run in runs},
                      "total_seconds": report["total_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
