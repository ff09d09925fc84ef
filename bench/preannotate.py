"""Pre-annotation: is it worth keeping, and how fast is it?

Quality (issue 22 item 1), on held-out synthetic images (``bench/loop.py``'s: data seed + 1000, the demo model's
own label names), with the model's automatic mode as the backend runs it (``AutomaticConfig`` from the same
settings, regions below ``PREANNOTATION_THRESHOLD`` dropped):

- precision and recall at IoU 0.5 (class-aware, ``training.metrics.match_detections``) and the share of regions an
  annotator would accept unchanged (right label, IoU >= 0.85);
- the click ceiling on the same images with the same model: the share of objects that one positive click at the
  object's centre segments at IoU >= 0.5 (and with the right label too), and recall / ceiling;
- duplicates: region pairs of one image with mask IoU >= 0.8, and the largest such IoU.

Throughput: model only, images/s for encode + automatic mode (no image decoding, no RLE, no HTTP); with
``--end-to-end`` also the server path (a batch ``/predict`` to the backend process) and the bulk path
(``bench/preannotate_paths.py``), all on the same images in short interleaved rounds (``--round-images`` images a
round, ``--passes`` over the images), each path's rate as a ratio to the model-only rate of the same rounds
(target >= 0.9).

    .venv/bin/python bench/preannotate.py [--model labelstudio_backend/default_model/ovsam_demo.safetensors]
        [--seeds 13,14,15] [--tuning-seeds 21,22,23,24] [--images 30] [--threshold 0.5] [--config '{"points_per_side": 16}']
        [--end-to-end] [--passes 2] [--round-images 5] [--encoder-runtime auto|torch|onnx]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = REPO / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
DUPLICATE_IOU = 0.8
TARGET_PRECISION, TARGET_RECALL_SHARE = 0.90, 0.90


@dataclass
class Sample:
    """One synthetic image with its ground truth."""

    image: np.ndarray  # [H, W, 3] uint8
    masks: list[np.ndarray]
    labels: list[str]


def held_out_seed(seed: int) -> int:
    """The generator seed of a data seed's held-out images (as ``bench/loop.py``)."""
    return seed + 1000


def make_samples(out: Path, n: int, seed: int) -> list[Sample]:
    """`python -m training synth` with the demo model's own class names, read back as arrays."""
    from PIL import Image
    from labelstudio_io.brush import decode_brush
    from training.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(out=out, num_images=n, seed=seed), progress=False)
    samples = []
    for raw in json.loads((out / "tasks.json").read_text()):
        result = raw["annotations"][0]["result"]
        w, h = result[0]["original_width"], result[0]["original_height"]
        image = np.asarray(Image.open(out / "images" / Path(raw["data"]["image"]).name).convert("RGB"))
        samples.append(Sample(image, [decode_brush(r["value"]["rle"], w, h) for r in result],
                              [r["value"]["brushlabels"][0] for r in result]))
    return samples


# ----------------------------------------------------------------------------- quality


def click_ceiling(predictor: Any, samples: Sequence[Sample]) -> dict[str, int]:
    """Objects one click at their centre segments at IoU >= 0.5 (`segmented`), and also names right (`named`)."""
    from training.data.prompts import center_point
    from training.metrics import mask_iou

    segmented = named = 0
    for s in samples:
        features = predictor.set_image(s.image)
        for gt, label in zip(s.masks, s.labels):
            x, y = center_point(gt)
            pred = predictor.predict(np.array([[x + 0.5, y + 0.5]]), np.array([1]), features=features)
            ok = mask_iou(gt, pred.mask) >= 0.5
            segmented += int(ok)
            named += int(ok and pred.label == label)
    return {"clicks_segmented": segmented, "clicks_named": named}


def duplicate_pairs(masks: Sequence[np.ndarray], iou: float = DUPLICATE_IOU) -> tuple[int, float]:
    """Pairs of one image's regions with mask IoU >= `iou`, and the largest IoU between two regions."""
    from training.metrics import mask_iou_matrix

    if len(masks) < 2:
        return 0, 0.0
    m = mask_iou_matrix(np.stack(masks), np.stack(masks))
    upper = m[np.triu_indices(len(masks), k=1)]
    return int((upper >= iou).sum()), float(upper.max())


def preannotation_counts(generate: Callable[[np.ndarray], list[Any]], samples: Sequence[Sample],
                         threshold: float) -> dict[str, Any]:
    """Automatic mode on every sample, regions below `threshold` dropped as the backend does, matched to the GT."""
    from training.metrics import DetectionCounts, match_detections

    counts, pairs, worst, most = DetectionCounts(), 0, 0.0, 0
    for s in samples:
        regions = [i for i in generate(s.image) if i.probability >= threshold]
        masks = [i.mask for i in regions]
        predicted = np.stack(masks) if masks else np.zeros((0, *s.image.shape[:2]), bool)
        counts = counts + match_detections(np.stack(s.masks), s.labels, predicted, [i.label for i in regions],
                                           [i.score for i in regions])
        n, top = duplicate_pairs(masks)
        pairs, worst, most = pairs + n, max(worst, top), max(most, len(regions))
    return {"regions": counts.num_pred, "objects": counts.num_gt, "true_positives": counts.true_positives,
            "accepted": counts.accepted, "duplicate_pairs": pairs, "max_pair_iou": worst,
            "max_regions_per_image": most}


def measure_quality(artifact: Any, config: Any, samples: Sequence[Sample], threshold: float) -> dict[str, Any]:
    """Pre-annotation counts and the click ceiling's on the same images with the same model."""
    from ovsam.automatic import AutomaticMaskGenerator
    from ovsam.predictor import OVSAMPredictor

    predictor = OVSAMPredictor(artifact.model, artifact.vocabulary, device="cpu")
    generator = AutomaticMaskGenerator(predictor, config)
    counts = preannotation_counts(lambda img: generator.generate(predictor.set_image(img)), samples, threshold)
    return {**counts, **click_ceiling(predictor, samples)}


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two seeds' counts together (largest values for the maxima)."""
    return {k: max(a[k], b[k]) if k.startswith("max_") else a[k] + b[k] for k in a}


def summarise(c: dict[str, Any]) -> dict[str, Any]:
    """The figures of issue 22 item 1 from the counts."""
    ratio = lambda x, y: x / y if y else 1.0  # noqa: E731
    out = dict(c)
    out["precision"] = ratio(c["true_positives"], c["regions"])
    out["recall"] = ratio(c["true_positives"], c["objects"])
    out["accepted_share"] = ratio(c["accepted"], c["regions"])
    out["click_ceiling"] = ratio(c["clicks_segmented"], c["objects"])
    out["click_ceiling_named"] = ratio(c["clicks_named"], c["objects"])
    out["recall_over_ceiling"] = ratio(out["recall"], out["click_ceiling"])
    out["recall_over_named_ceiling"] = ratio(out["recall"], out["click_ceiling_named"])
    return out


# ----------------------------------------------------------------------------- throughput


class ModelPath:
    """Encode + automatic mode alone, in this process, with the image encoder `encoder_runtime` picks
    (ENCODER_RUNTIME's values), as the end-to-end paths get it. No embedding cache: every image encoded afresh."""

    name = "model"

    def __init__(self, artifact: Any, config: Any, sample: np.ndarray, device: str, encoder_runtime: str,
                 model_path: Path, batch_images: int = 1) -> None:
        from ovsam.automatic import AutomaticMaskGenerator
        from ovsam.encoder_runtime import configure_encoder
        from ovsam.predictor import OVSAMPredictor

        self.device = device
        self.predictor = OVSAMPredictor(artifact.model, artifact.vocabulary, device=device, cache_bytes=0)
        configure_encoder(self.predictor.image_encoder, encoder_runtime, model_path)
        self.image_encoder = self.predictor.image_encoder.runtime
        self.generator = AutomaticMaskGenerator(self.predictor, config)
        self.batch_images = batch_images
        self._count = 0
        self.measure([sample])

    def measure(self, images: Sequence[np.ndarray]) -> tuple[float, int]:
        import torch

        def sync() -> None:
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize()

        sync()
        start = time.perf_counter()
        for first in range(0, len(images), self.batch_images):  # encoded in batches, as the backend does
            group = images[first:first + self.batch_images]
            keys = [f"model-{self._count + i}" for i in range(len(group))]
            self._count += len(group)
            for features in self.predictor.set_images(group, keys):
                self.generator.generate(features)
        sync()
        return time.perf_counter() - start, len(images)

    def close(self) -> None:
        pass


def measure_rounds(
    paths: Sequence[Any], images: Sequence[np.ndarray], passes: int, round_images: int
) -> dict[str, Any]:
    """Every path on the same images in short rounds: each round is `round_images` images, run by every path in an
    order rotating from round to round (model, server, bulk; server, bulk, model; ...), and `passes` times over all
    images. Each round's images are fresh one-pixel variants (`variant`), so no cache of any path helps.

    Short rounds because this machine's speed drifts by 10-20 % over minutes: the paths of one round run within
    seconds of each other, so the drift mostly cancels in their ratio. A path's rate is its images over its seconds
    summed over rounds; the ratios to the model-only rate are also given per round, with their median and quartiles,
    whose spread shows how much the machine moved under the measurement."""
    from harness import variant

    chunks = [images[i:i + round_images] for i in range(0, len(images), max(round_images, 1))]
    rounds = passes * len(chunks)
    seconds = {p.name: [] for p in paths}
    counts = {p.name: [] for p in paths}
    for r in range(rounds):
        order = list(paths[r % len(paths):]) + list(paths[:r % len(paths)])
        chunk = chunks[r % len(chunks)]
        for k, path in enumerate(order):
            batch = [variant(image, 10 * r + k) for image in chunk]
            s, n = path.measure(batch)
            seconds[path.name].append(s)
            counts[path.name].append(n)
            print(f"round {r + 1}/{rounds} {path.name:>6}: {n} images in {s:.1f} s", flush=True)
    out: dict[str, Any] = {"rounds": rounds, "passes": passes, "round_images": round_images}
    for name in seconds:
        out[f"{name}_images_per_s"] = sum(counts[name]) / sum(seconds[name])
        out[f"{name}_seconds"] = sum(seconds[name])
        out[f"{name}_seconds_per_round"] = seconds[name]
        out[f"{name}_images"] = sum(counts[name])
    model_rate = out["model_images_per_s"]
    for name in seconds:
        if name != "model":
            per_round = [(counts[name][r] / seconds[name][r]) / (counts["model"][r] / seconds["model"][r])
                         for r in range(rounds)]
            out[f"{name}_over_model"] = out[f"{name}_images_per_s"] / model_rate
            out[f"{name}_over_model_per_round"] = per_round
            q1, median, q3 = np.quantile(per_round, [0.25, 0.5, 0.75]).tolist()
            out[f"{name}_over_model_median"] = median
            out[f"{name}_over_model_quartiles"] = [q1, q3]
    return out


def measure_throughput(model: Path, artifact: Any, config: Any, samples: Sequence[Sample], device: str,
                       threshold: float, encoder_runtime: str, passes: int, round_images: int,
                       end_to_end: bool, batch_images: int) -> dict[str, Any]:
    """Model-only images/s, and with `end_to_end` the server and bulk paths measured in the same rounds."""
    from preannotate_paths import BulkPath, ServerPath, warm_up_image

    images = [s.image for s in samples]
    warm = warm_up_image(images)
    paths: list[Any] = [ModelPath(artifact, config, warm, device, encoder_runtime, model, batch_images)]
    try:
        if end_to_end:
            labels = "".join(f'<Label value="{label}"/>' for label in artifact.vocabulary.labels)
            xml = (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}'
                   "</BrushLabels></View>")
            args = (model, warm, xml, device, dataclasses.asdict(config), threshold, encoder_runtime, batch_images)
            paths.append(ServerPath(*args))
            paths.append(BulkPath(*args))
        out = measure_rounds(paths, images, passes, round_images)
        for p in paths:
            out[f"{p.name}_image_encoder"] = p.image_encoder
        if end_to_end:
            out["bulk_posted"] = paths[2].ls.posted - 1  # less the warm-up image's
    finally:
        for p in paths:
            p.close()
    return out


# ----------------------------------------------------------------------------- main


def build_config(overrides: dict[str, Any]) -> Any:
    from ovsam.automatic import AutomaticConfig

    names = {f.name for f in dataclasses.fields(AutomaticConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise SystemExit(f"unknown AutomaticConfig fields: {sorted(unknown)}; known: {sorted(names)}")
    return AutomaticConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--seeds", default="13,14,15",
                   help="data seeds; images are drawn at seed + 1000 (held out; 7,8,9 were the first round's)")
    p.add_argument("--tuning-seeds", default="",
                   help="data seeds the defaults were tuned on (21,22,23,24), reported apart from --seeds for comparison")
    p.add_argument("--images", type=int, default=30, help="images per seed")
    p.add_argument("--threshold", type=float, default=None,
                   help="PREANNOTATION_THRESHOLD (default: the config's confidence_threshold)")
    p.add_argument("--config", default="{}", help="AutomaticConfig overrides as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--passes", type=int, default=2,
                   help="throughput: passes over the images, every path on every image once per pass")
    p.add_argument("--round-images", type=int, default=5,
                   help="throughput: images per round; the paths take turns round by round (see measure_rounds)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--end-to-end", action="store_true",
                   help="also the server path (HTTP batch to the backend process) and the bulk path (iter_predictions "
                        "+ posting), on the same images (bench/preannotate_paths.py)")
    p.add_argument("--encoder-runtime", default="auto", choices=("auto", "torch", "onnx"),
                   help="ENCODER_RUNTIME for every path (auto: the exported encoder on CPU, as the backend serves)")
    p.add_argument("--batch-images", type=int, default=None,
                   help="images encoded in one batch by every path (PREDICT_BATCH_IMAGES; default: the backend's for "
                        "the device, 4 on a GPU, 1 on the CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("passes", "round_images", "batch_images", "images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    import torch

    from labelstudio_backend.config import Settings
    from ovsam.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(json.loads(args.config))
    batch_images = Settings(device=args.device, predict_batch_images=args.batch_images or 0).batch_images
    threshold = config.confidence_threshold if args.threshold is None else args.threshold
    artifact = load_model(args.model, "cpu")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    record: dict[str, Any] = {
        "bench": "preannotate", "model": artifact.version, "seeds": seeds,
        "image_seeds": [held_out_seed(s) for s in seeds], "images_per_seed": args.images, "threshold": threshold,
        "config": dataclasses.asdict(config), "device": args.device, "batch_images": batch_images,
        "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_start": os.getloadavg()[0], "per_seed": {},
    }
    tuning = [int(s) for s in args.tuning_seeds.split(",") if s.strip()]
    record["tuning_seeds"] = tuning
    all_samples: list[Sample] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-preannotate-") as tmp:
        for group, group_seeds in (("tuning", tuning), ("quality", seeds)):
            total: dict[str, Any] | None = None
            for seed in group_seeds:
                samples = make_samples(Path(tmp) / str(seed), args.images, held_out_seed(seed))
                if group == "quality":
                    all_samples += samples
                counts = measure_quality(artifact, config, samples, threshold)
                record["per_seed"][seed] = summarise(counts)
                total = counts if total is None else add_counts(total, counts)
            if total is not None:
                record[group] = summarise(total)
    record["quality_seconds"] = time.perf_counter() - started
    if not args.skip_throughput:
        record["throughput"] = measure_throughput(args.model, artifact, config, all_samples, args.device, threshold,
                                                  args.encoder_runtime, args.passes, args.round_images,
                                                  args.end_to_end, batch_images)
    record["load_end"] = os.getloadavg()[0]
    q = record["quality"]
    record["targets_met"] = {
        "precision": q["precision"] >= TARGET_PRECISION,
        "recall_over_ceiling": q["recall_over_ceiling"] >= TARGET_RECALL_SHARE,
        "no_duplicates": q["duplicate_pairs"] == 0,
    }
    print_table(record)
    line = json.dumps(record)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0


def print_table(record: dict[str, Any]) -> None:
    cols = ("precision", "recall", "click_ceiling", "recall_over_ceiling", "accepted_share", "duplicate_pairs",
            "max_pair_iou", "regions", "objects")
    print(f"model {record['model']}, images {record['images_per_seed']} per seed at seeds "
          f"{record['image_seeds']}, threshold {record['threshold']}")
    print("seed  " + "  ".join(f"{c:>12.12}" for c in cols))
    rows = [(str(k), v) for k, v in record["per_seed"].items()]
    rows += [("tuned", record["tuning"])] if "tuning" in record else []
    rows += [("held", record["quality"])]
    for name, q in rows:
        print(f"{name:<5} " + "  ".join(f"{q[c]:>12.3f}" if isinstance(q[c], float) else f"{q[c]:>12}" for c in cols))
    if "throughput" in record:
        t = record["throughput"]
        print(f"model only (encode + automatic mode): {t['model_images_per_s']:.2f} images/s "
              f"({t['model_images']} images in {t['rounds']} rounds of {t['round_images']}, {t['model_seconds']:.1f} s, "
              f"{record['device']}, image encoder {t['model_image_encoder']}, {record['batch_images']} a batch)")
        if "server_images_per_s" in t:
            print(f"server path (HTTP batch): {t['server_images_per_s']:.2f} images/s = x{t['server_over_model']:.2f} "
                  f"model only; bulk path: {t['bulk_images_per_s']:.2f} images/s = x{t['bulk_over_model']:.2f} "
                  "(target >= 0.9)")
            print(f"  median of the rounds: server x{t['server_over_model_median']:.2f} (quartiles "
                  f"{t['server_over_model_quartiles'][0]:.2f}-{t['server_over_model_quartiles'][1]:.2f}), bulk "
                  f"x{t['bulk_over_model_median']:.2f} ({t['bulk_over_model_quartiles'][0]:.2f}-"
                  f"{t['bulk_over_model_quartiles'][1]:.2f})")
            print("  per round: server " + " ".join(f"x{x:.2f}" for x in t["server_over_model_per_round"])
                  + ", bulk " + " ".join(f"x{x:.2f}" for x in t["bulk_over_model_per_round"]))
    print("targets met:", record["targets_met"])


if __name__ == "__main__":
    raise SystemExit(main())
