"""`python -m training evaluate`: the paper's GT-prompt metric for one model on one data set.

Every GT instance of an image is one prompt, given all at once through `OVSAMPredictor.predict_batch`:
its GT box ('box') and/or the reference's mask centre point ('center'). Per instance we record mask
IoU at the original resolution and whether the predicted label is right; averages are micro over
instances (as the paper), optionally split base/novel, with a per-class table. Box-only instances (no
GT mask) cannot be scored and are counted as skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from ovsam.centre import rescale_mask
from ovsam.class_texts import ReferenceVocabulary
from ovsam.predictor import OVSAMPredictor, Prompt
from ovsam.transforms import ImageFrame
from ovsam.vocabulary import Vocabulary
from training.data.prompts import center_point
from training.data.types import Sample, SkipReport
from training.gate import combined_score
from training.metrics import InstanceEvaluation
# The command line lives in a torch-free module (a fast `--help`); still importable from here.
from training.evaluate_cli import PRECISIONS, PROMPT_MODES, build_parser, main_evaluate  # noqa: F401


def center_prompt(mask: np.ndarray, frame: ImageFrame) -> np.ndarray:
    """The centre point of a GT mask in original pixels, computed as the reference does on the mask rescaled
    to the model's frame (mmcv's size rule, nearest: its pixels are input pixels). A tiny mask that vanishes
    when rescaled uses its own centre (the reference would click the corner (0, 0) for it)."""
    small = rescale_mask(mask, frame.resized_size)
    if small.any():
        cx, cy = center_point(small)
        sx, sy = frame.scale_xy
        return np.array([[cx / sx, cy / sy]], np.float32)
    cx, cy = center_point(mask)
    return np.array([[cx, cy]], np.float32)


def make_prompt(mode: str, mask: np.ndarray, box: np.ndarray, frame: ImageFrame) -> Prompt:
    # clip_box is only read in the model's 'faithful' mode: the reference's unscaled GT box (docs/REFERENCE_NOTES.md B1).
    clip_box = np.asarray(box, np.float32)
    if mode == "box":
        return Prompt(box=np.asarray(box, np.float32), clip_box=clip_box)
    if mode == "center":
        return Prompt(points=center_prompt(mask, frame), point_labels=np.ones(1, np.int64), clip_box=clip_box)
    raise ValueError(f"unknown prompt mode {mode!r}; use one of {PROMPT_MODES}")


@dataclass
class Example:
    """One image kept for the overlay figure (downscaled)."""

    image: np.ndarray
    gt_labels: List[str]
    masks: List[np.ndarray]
    labels: List[str]
    boxes: List[np.ndarray]
    correct: List[bool]


@dataclass
class EvaluationResult:
    metrics: Dict[str, Any]
    ious: Dict[str, List[float]] = field(default_factory=dict)
    examples: List[Example] = field(default_factory=list)


def _downscale(image: np.ndarray, max_side: int = 256) -> Tuple[np.ndarray, float]:
    s = min(1.0, max_side / max(image.shape[:2]))
    if s == 1.0:
        return image, 1.0
    h, w = int(image.shape[0] * s + 0.5), int(image.shape[1] * s + 0.5)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), s


def evaluate_predictor(
    predictor: OVSAMPredictor,
    samples: Sequence[Sample],
    images: Any,
    modes: Sequence[str] = PROMPT_MODES,
    novel_labels: Optional[Sequence[str]] = None,
    max_examples: int = 8,
    progress: bool = False,
) -> EvaluationResult:
    """Run every GT prompt of every sample; `images.load(ref)` gives the RGB image."""
    from tqdm import tqdm

    vocab = predictor.vocabulary
    known = set(vocab.labels)
    evals = {m: InstanceEvaluation(novel_labels=set(novel_labels) if novel_labels is not None else None) for m in modes}
    ious: Dict[str, List[float]] = {m: [] for m in modes}
    skipped = SkipReport()
    examples: List[Example] = []
    n_images = 0
    for sample in tqdm(samples, desc="evaluate", unit="img", disable=not progress):
        insts = []
        for inst in sample.instances:
            if inst.label not in known:
                skipped.add("label not in vocabulary", sample.task_id)
            elif inst.mask is None:
                skipped.add("no mask (box only)", sample.task_id)
            else:
                insts.append(inst)
        if not insts:
            continue
        image = images.load(sample.image_ref)
        feats = predictor.set_image(image)
        n_images += 1
        for mode in modes:
            prompts = [make_prompt(mode, i.mask, i.box, feats.frame) for i in insts]
            preds = predictor.predict_batch(prompts, features=feats, top_k=1)
            for inst, pred in zip(insts, preds):
                ious[mode].append(evals[mode].add_masks(inst.label, pred.label, inst.mask, pred.mask))
            if mode == modes[0] and len(examples) < max_examples:
                small, s = _downscale(image)
                examples.append(Example(
                    small, [i.label for i in insts],
                    [cv2.resize(p.mask.astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0 for p in preds],
                    [p.label for p in preds], [np.asarray(i.box) * s for i in insts],
                    [p.label == i.label for p, i in zip(preds, insts)]))
    metrics: Dict[str, Any] = {m: evals[m].summary() for m in modes}
    metrics.update({
        "prompt_modes": list(modes),
        "num_images": n_images,
        "num_instances": evals[modes[0]].summary()["count"] if modes else 0,
        "skipped": skipped.as_dict(),
        "labels": list(vocab.labels),
        "novel_labels": sorted(novel_labels) if novel_labels is not None else None,
    })
    metrics["score"] = combined_score(metrics)
    return EvaluationResult(metrics, ious, examples)


def evaluate_model(model, vocabulary: Vocabulary, samples: Sequence[Sample], images: Any,
                   device: str | torch.device | None = None, precision: str = "fp32", **kwargs: Any) -> EvaluationResult:
    """`evaluate_predictor` with a fresh predictor that caches nothing (each image is seen once).

    precision: fp32 (the reference's, the default) or bf16 (autocast on CUDA, as the backend serves by default).
    The model is left in eval mode on `device`; callers that keep training switch it back.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    predictor = OVSAMPredictor(model, vocabulary, cache_bytes=0, device=device, use_autocast=precision == "bf16")
    return evaluate_predictor(predictor, samples, images, **kwargs)


# ------------------------------------------------------------------------------------------ report


def _fmt(v: Optional[float], pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def markdown_report(metrics: Dict[str, Any], title: str, figures: Sequence[str]) -> str:
    modes = metrics["prompt_modes"]
    lines = [f"# {title}", "",
             f"{metrics['num_images']} images, {metrics['num_instances']} instances per prompt mode. "
             "Figures are micro-averages over instances (as in the paper), in %. "
             f"Combined score (mean of mIoU and accuracy over modes): {_fmt(metrics.get('score'))}.", ""]
    split = metrics.get("novel_labels") is not None
    head = "| prompt | mIoU | accuracy |" + (" base mIoU | base acc | novel mIoU | novel acc |" if split else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for m in modes:
        r = metrics[m]
        row = f"| {m} | {_fmt(r['miou'])} | {_fmt(r['accuracy'])} |"
        if split:
            cells = (r["base_miou"], r["base_accuracy"], r["novel_miou"], r["novel_accuracy"])
            row += "".join(f" {_fmt(c)} |" for c in cells)
        lines.append(row)
    lines += ["", "## Per class", ""]
    head = "| class | count | " + " | ".join(f"{m} acc | {m} mIoU" for m in modes) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    classes = sorted({c for m in modes for c in metrics[m]["per_class"]})
    for c in classes:
        cells = []
        count = 0
        for m in modes:
            r = metrics[m]["per_class"].get(c, {})
            count = max(count, r.get("count", 0))
            cells += [_fmt(r.get("accuracy")), _fmt(r.get("miou"))]
        lines.append(f"| {c} | {count} | " + " | ".join(cells) + " |")
    if metrics.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in metrics["skipped"].items()]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def plot_per_class(metrics: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = metrics["prompt_modes"]
    classes = sorted({c for m in modes for c in metrics[m]["per_class"]})
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(classes) + 2), 3.5))
    x = np.arange(len(classes))
    for k, m in enumerate(modes):
        acc = [100 * (metrics[m]["per_class"].get(c, {}).get("accuracy") or 0) for c in classes]
        ax.bar(x + k * width - 0.4 + width / 2, acc, width, label=m)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_iou_histogram(ious: Dict[str, List[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 21)
    for m, vals in ious.items():
        ax.hist(vals, bins=bins, alpha=0.6, label=f"{m} (mean {np.mean(vals) if vals else 0:.2f})")
    ax.set_xlabel("mask IoU")
    ax.set_ylabel("instances")
    ax.set_title("IoU per instance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(examples: Sequence[Example], path: Path, cols: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(examples))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        overlay = ex.image.astype(np.float32).copy()
        for k, m in enumerate(ex.masks):
            c = np.array(colours(k % 10)[:3]) * 255
            overlay[m] = 0.5 * overlay[m] + 0.5 * c
        ax.imshow(overlay.astype(np.uint8))
        for k, (box, label, ok) in enumerate(zip(ex.boxes, ex.labels, ex.correct)):
            x1, y1, x2, y2 = box
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colours(k % 10), lw=1))
            ax.text(x1, y1, label, fontsize=6, color="white", va="bottom",
                    bbox={"facecolor": "green" if ok else "red", "alpha": 0.7, "pad": 1, "lw": 0})
    fig.suptitle("Predicted masks and labels on the GT boxes (green: right class, red: wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: EvaluationResult, out_dir: Path, title: str = "OVSAM evaluation") -> Dict[str, Path]:
    """metrics.json, report.md and three PNGs in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": out_dir / "metrics.json",
        "report": out_dir / "report.md",
        "per_class": out_dir / "per_class_accuracy.png",
        "iou_histogram": out_dir / "iou_histogram.png",
        "examples": out_dir / "examples.png",
    }
    files["metrics"].write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
    plot_per_class(result.metrics, files["per_class"])
    plot_iou_histogram(result.ious, files["iou_histogram"])
    plot_examples(result.examples, files["examples"])
    figs = [str(files[k]) for k in ("per_class", "iou_histogram", "examples")]
    files["report"].write_text(markdown_report(result.metrics, title, figs), encoding="utf-8")
    return files


# --------------------------------------------------------------------------------------------- CLI


def reference_classes(kind: str, data_path: Optional[str]) -> ReferenceVocabulary:
    """The reference's COCO classes (its texts and 48/17/15 split), or LVIS's from an LVIS annotation file."""
    from ovsam.class_texts import coco_reference_vocabulary, lvis_reference_vocabulary
    from training.data.coco import read_categories

    if kind == "coco":
        return coco_reference_vocabulary()
    if kind != "lvis":
        raise ValueError(f"unknown reference vocabulary {kind!r}; use coco or lvis")
    try:
        categories = read_categories(data_path) if data_path else []
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, or not a COCO-style file
        categories = []
    if not categories or not any("frequency" in c for c in categories):
        raise ValueError(f"the lvis vocabulary is read from an LVIS annotation file (categories with r/c/f frequency); "
                         f"{data_path} is not one")
    return lvis_reference_vocabulary(categories)


def reference_vocabulary(artifact, kind: str, data_path: str, samples: Sequence[Sample],
                         cache_dir: Optional[Path] = None) -> Tuple[Vocabulary, List[str], List[Sample]]:
    """(vocabulary, novel labels, samples) of the reference's COCO or LVIS evaluation.

    COCO: the 80 classes with the reference's texts; instances of the 15 excluded classes are not scored (the
    reference's 48/17 test split keeps only the 65 classes' instances), yet the 15 stay in the classifier.
    LVIS: the file's categories, texts by `split_label`, rare classes novel.
    """
    from ovsam.vocabulary import artifact_vocabulary

    ref = reference_classes(kind, data_path)
    vocab = artifact_vocabulary(artifact, ref.labels, cache_dir=cache_dir, texts=ref.texts, excluded_labels=ref.excluded)
    scored = set(ref.base) | set(ref.novel)
    unknown = sorted({i.label for s in samples for i in s.instances} - set(ref.labels))
    if unknown:
        raise ValueError(f"labels outside the {kind} vocabulary: {unknown[:5]}")
    kept = []
    for s in samples:
        instances = [i for i in s.instances if i.label in scored]
        if instances:
            kept.append(dataclasses.replace(s, instances=instances))
    return vocab, list(ref.novel), kept


def run_evaluation(args: argparse.Namespace) -> int:
    """`python -m training evaluate` once its arguments (`training.evaluate_cli.build_parser`) have parsed."""
    from training.data.split import split_by_task
    from training.dataset import load_training_data, make_image_source, read_label_config
    from training.distributed import pick_device
    from ovsam.vocabulary import artifact_vocabulary
    from training.vocab_cli import load_model_any, split_labels

    device = pick_device(args.device)
    data = load_training_data(args.data, read_label_config(args.label_config), split_labels(args.labels), args.image_root)
    samples = data.samples
    if args.split != "all":
        train, val = split_by_task(samples, args.val_fraction, args.split_seed)
        samples = val if args.split == "val" else train
    if args.max_images:
        samples = samples[: args.max_images]
    reference = reference_classes(args.reference_vocabulary, args.data) if args.reference_vocabulary else None
    artifact = load_model_any(args.model, device="cpu", reference=reference)
    if args.clip_roi_boxes:
        artifact.model.cfg = artifact.model.cfg.replace(clip_roi_boxes=args.clip_roi_boxes)
    if args.reference_vocabulary:
        vocab, novel, samples = reference_vocabulary(artifact, args.reference_vocabulary, args.data, samples,
                                                     args.cache_dir)
    else:
        base = split_labels(args.base_labels)
        vocab = artifact_vocabulary(artifact, data.labels, data.synonyms, cache_dir=args.cache_dir)
        novel = [l for l in data.labels if l not in set(base)] if base is not None else None
    roi_size = args.head_roi_size or (7 if args.reference_vocabulary == "lvis" else None)
    if roi_size:
        artifact.model.cfg = artifact.model.cfg.replace(head_roi_size=roi_size)
        artifact.model.head.roi_size = roi_size
    modes = PROMPT_MODES if args.prompt == "both" else (args.prompt,)
    result = evaluate_model(artifact.model, vocab, samples, make_image_source(data.image_root), device=device,
                            precision=args.precision, modes=modes, novel_labels=novel, max_examples=args.examples,
                            progress=not args.no_progress)
    result.metrics.update({"model": str(args.model), "model_version": artifact.version, "data": str(args.data),
                           "data_hash": data.data_hash, "split": args.split, "precision": args.precision,
                           "reference_vocabulary": args.reference_vocabulary,
                           "head_roi_size": artifact.model.cfg.head_roi_size})
    write_report(result, args.out, title=f"Evaluation of {artifact.version}")
    summary = {m: {"miou": result.metrics[m]["miou"], "accuracy": result.metrics[m]["accuracy"]} for m in modes}
    print(json.dumps({"score": result.metrics["score"], **summary, "out": str(args.out)}))
    return 0
