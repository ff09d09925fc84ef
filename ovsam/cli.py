"""`python -m ovsam download|predict|export-onnx|...`: fetch the official weights, segment and name one object in an
image, export a model's image encoder to ONNX (run by OpenVINO on CPU)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

EXIT_ERROR = 2
# What `predict` runs without --checkpoint or OVSAM_CHECKPOINT: the model the Label Studio backend serves by
# default (labelstudio_backend.runtime.DEFAULT_MODEL_PATH). Found by path: ovsam never imports the backend.
DEMO_MODEL = Path(__file__).resolve().parents[1] / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
EXIT_MISMATCH = 1  # verify-reference: a stage differs from the reference beyond tolerance
MASK_COLOUR = (255, 144, 30)  # RGB
POSITIVE_COLOUR = (40, 220, 40)
NEGATIVE_COLOUR = (230, 40, 40)
BOX_COLOUR = (255, 210, 0)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---- argument parsing -------------------------------------------------------------------------------
def parse_point(text: str) -> Tuple[float, float, int]:
    """`x,y` or `x,y,label` (label 1 = positive, 0 = negative) in original-image pixels."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1]), 1
        if len(parts) == 3:
            return float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a point is x,y or x,y,label (label 1 or 0), got {text!r}")


def parse_box(text: str) -> Tuple[float, float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x1,y1,x2,y2, got {text!r}")
    return values[0], values[1], values[2], values[3]


def parse_labels(text: str) -> List[str]:
    labels = [l.strip() for l in text.split(",") if l.strip()]
    if not labels:
        raise argparse.ArgumentTypeError("--labels needs at least one name")
    return labels


def build_parser() -> argparse.ArgumentParser:
    from .hub import ASSETS, DEFAULT_ASSETS

    parser = argparse.ArgumentParser(prog="python -m ovsam", description="Open-Vocabulary SAM: click or box in, mask and class name out.")
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="download the official OVSAM weights and SAM ViT-H",
                        description="Download the released OVSAM files (HF HarborYuan/ovsam_models) and SAM ViT-H into one directory.")
    dl.add_argument("--dest", default=os.environ.get("OVSAM_OFFICIAL_DIR", "models/official"),
                    help="target directory (default: $OVSAM_OFFICIAL_DIR or models/official)")
    dl.add_argument("--which", nargs="+", choices=sorted(ASSETS), default=list(DEFAULT_ASSETS),
                    help=f"files to fetch (default: {' '.join(DEFAULT_ASSETS)})")
    dl.add_argument("--force", action="store_true", help="download again even if the file exists")

    pr = sub.add_parser("predict", help="segment and recognise one object from points and/or a box",
                        description="Run OVSAM on one image with point and/or box prompts; write an overlay PNG and JSON.")
    pr.add_argument("--checkpoint", default=os.environ.get("OVSAM_CHECKPOINT"),
                    help="model artifact file or directory of official files (default: $OVSAM_CHECKPOINT, else the "
                         "backend's default demo model, labelstudio_backend/default_model/ovsam_demo.safetensors)")
    pr.add_argument("--image", required=True, help="input image file")
    pr.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
                    help="a click in image pixels; LABEL 1 = positive (default), 0 = negative; repeatable")
    pr.add_argument("--box", type=parse_box, metavar="X1,Y1,X2,Y2", help="a box prompt in image pixels")
    pr.add_argument("--labels", type=parse_labels, metavar="A,B,...", help="vocabulary to choose from (default: the model's)")
    pr.add_argument("--top-k", type=int, default=5, help="how many candidate labels to report (default 5)")
    pr.add_argument("--out", help="write an overlay PNG here")
    pr.add_argument("--json", dest="json_out", help="write the prediction as JSON here")
    pr.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")

    vr = sub.add_parser("verify-reference", help="compare this implementation stage by stage with the reference's outputs",
                        description="Load a golden set computed by the reference OVSAM code (weights in the released "
                                    "key names, inputs and every stage's outputs) through the official checkpoint "
                                    "mappers, run each stage on its golden inputs and print each stage's largest "
                                    "absolute difference. Exit status 1 if any is beyond its tolerance.")
    vr.add_argument("directory", help="folder holding golden_small.safetensors and golden_small.json "
                                      "(the repository's: tests/ovsam/fixtures/reference_golden)")
    vr.add_argument("--all", action="store_true", help="print every compared tensor, not only each stage's worst")
    vr.add_argument("--json", dest="json_out", help="write every comparison as JSON here")

    ini = sub.add_parser("init", help="write a freshly initialised model artifact (a base for training from scratch)",
                         description="Build a model from a configuration preset with random weights (custom text "
                                     "towers included) and save it as an artifact with the given vocabulary.")
    ini.add_argument("--config", default="tiny", help="preset: tiny, demo, rn50x16, rn50, ... (default tiny)")
    ini.add_argument("--labels", type=parse_labels, required=True, metavar="A,B,...", help="the vocabulary")
    ini.add_argument("--out", required=True, help="artifact file to write (.safetensors)")
    ini.add_argument("--version", default=None, help="version string (default <config>-init)")
    ini.add_argument("--seed", type=int, default=0)

    ex = sub.add_parser("export-onnx", help="export a model's image encoder to ONNX for fast CPU serving",
                        description="Export the image encoder (CLIP trunk, SAM2CLIP neck, FPN and per-image maps) to "
                                    "ONNX, check it against eager PyTorch on a fixed input (relative 1e-4) and cache it "
                                    "beside the artifact (or in --cache-dir / $OVSAM_ENCODER_CACHE), keyed by the "
                                    "weights and library versions. The backend and `predict` use it on CPU "
                                    "(ENCODER_RUNTIME=auto|onnx). Official shapes take about a minute on 2 cores.")
    ex.add_argument("artifact", nargs="?", default=os.environ.get("OVSAM_CHECKPOINT"),
                    help="model artifact file or directory of official files (default: $OVSAM_CHECKPOINT, else the "
                         "backend's default demo model)")
    ex.add_argument("--cache-dir", type=Path, default=None, help="write the export here instead of beside the artifact")
    ex.add_argument("--force", action="store_true", help="export again, even after an earlier failure")
    return parser


def run_export_onnx(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .encoder_export import export_encoder

    path = Path(args.artifact) if args.artifact else DEMO_MODEL
    artifact = load_model(path, device="cpu")
    result = export_encoder(artifact.model, path, args.cache_dir, force=args.force)
    if result.path is None:
        raise CLIError(f"the image encoder of {path} was not exported: {result.error}")
    if result.cached:
        print(f"already exported: {result.path}")
    else:
        print(f"exported: {result.path} in {result.seconds:.1f} s; max relative difference to eager "
              f"{result.max_rel_diff:.2g}")
    return 0


def run_init(args: argparse.Namespace) -> int:
    from .artifact import save_artifact
    from .random_model import build_random

    art = build_random(args.config, args.labels, args.seed, args.version,
                       {"config": args.config, "command": " ".join(sys.argv)})
    own_text = art.config.text_cfg is not None  # official presets' towers are open_clip's pretrained ones: not saved
    path = save_artifact(args.out, art.model, art.vocabulary, art.version, provenance=art.provenance,
                         text_encoder=art.text_encoder if own_text else None)
    print(f"wrote {path} ({art.version}, {len(art.vocabulary)} labels)")
    return 0


# ---- predict ----------------------------------------------------------------------------------------
def read_image(path: str) -> np.ndarray:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise CLIError(f"cannot read image {path!r} (missing or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def choose_vocabulary(artifact, labels: Optional[Sequence[str]]):
    """The artifact's vocabulary, or `--labels` as `artifact_vocabulary` gives them (the backend's rule)."""
    if not labels or list(labels) == list(artifact.vocabulary.labels):
        return artifact.vocabulary
    if len(set(labels)) != len(labels):
        raise CLIError(f"duplicate names in --labels: {list(labels)}")
    from .vocabulary import artifact_vocabulary

    return artifact_vocabulary(artifact, labels)


def draw_overlay(image: np.ndarray, prediction, points: Sequence[Tuple[float, float, int]], box) -> np.ndarray:
    """RGB image with the mask tinted and outlined, prompts drawn, and `label p` written by the object."""
    import cv2

    out = image.copy()
    mask = prediction.mask.astype(bool)
    tint = np.array(MASK_COLOUR, np.float32)
    out[mask] = (0.5 * out[mask].astype(np.float32) + 0.5 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, MASK_COLOUR, 2)
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, 2)
    radius = max(3, round(0.01 * max(image.shape[:2])))
    for x, y, label in points:
        centre = (int(round(x)), int(round(y)))
        cv2.circle(out, centre, radius, POSITIVE_COLOUR if label == 1 else NEGATIVE_COLOUR, -1)
        cv2.circle(out, centre, radius, (255, 255, 255), 1)
    text = f"{prediction.label} {prediction.probability:.2f}"
    anchor = prediction.box if prediction.box.any() else (box if box is not None else (0, 0, 0, 0))
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, max(image.shape[:2]) / 1000), 1
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    x = int(min(max(anchor[0], 0), max(image.shape[1] - tw, 0)))
    y = int(max(anchor[1], th + base))
    cv2.rectangle(out, (x, y - th - base), (x + tw, y), (0, 0, 0), -1)
    cv2.putText(out, text, (x, y - base), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def prediction_record(prediction, artifact, image_shape, checkpoint: str) -> dict:
    return {
        "label": prediction.label,
        "probability": prediction.probability,
        "score": prediction.score,
        "stability": prediction.stability,
        "top_k": [{"label": s.label, "probability": s.probability} for s in prediction.top_k],
        "box": [float(v) for v in prediction.box],
        "mask_area": int(prediction.mask.sum()),
        "image_size": [int(image_shape[0]), int(image_shape[1])],
        "checkpoint": checkpoint,
        "model_version": artifact.version,
    }


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .encoder_runtime import configure_encoder, parse_runtime
    from .predictor import OVSAMPredictor

    if not args.checkpoint:
        if not DEMO_MODEL.is_file():
            raise CLIError(f"no model: pass --checkpoint PATH or set OVSAM_CHECKPOINT (the default demo model "
                           f"{DEMO_MODEL} is missing)")
        args.checkpoint = str(DEMO_MODEL)
        print(f"model: {DEMO_MODEL.name} (the backend's default demo model; --checkpoint chooses another)")
    if not args.point and args.box is None:
        raise CLIError("give at least one --point or a --box")
    if args.top_k < 1:
        raise CLIError("--top-k must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda asked for, but no CUDA device is available")
    image = read_image(args.image)
    artifact = load_model(args.checkpoint, device=device)
    vocabulary = choose_vocabulary(artifact, args.labels)
    predictor = OVSAMPredictor(artifact.model, vocabulary, device=device)
    runtime = os.environ.get("ENCODER_RUNTIME", "auto")
    # One image: an existing export is used, a new one (tens of seconds) only when ENCODER_RUNTIME=onnx asks.
    configure_encoder(predictor.image_encoder, runtime, Path(args.checkpoint), export=parse_runtime(runtime) == "onnx")
    predictor.set_image(image)
    points = labels = None
    if args.point:
        points = np.array([[x, y] for x, y, _ in args.point], np.float32)
        labels = np.array([l for _, _, l in args.point], np.int64)
    prediction = predictor.predict(points, labels, None if args.box is None else np.array(args.box, np.float32), top_k=args.top_k)

    record = prediction_record(prediction, artifact, image.shape, str(args.checkpoint))
    print(f"label: {prediction.label}  probability: {prediction.probability:.3f}  score: {prediction.score:.3f}")
    print("top-k: " + ", ".join(f"{s.label} {s.probability:.3f}" for s in prediction.top_k))
    if args.out:
        import cv2

        overlay = draw_overlay(image, prediction, args.point, args.box)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(args.out, cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
            raise CLIError(f"could not write {args.out!r} (use a .png name in an existing folder)")
        print(f"overlay: {args.out}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(record, indent=2))
        print(f"json: {args.json_out}")
    return 0


def run_verify_reference(args: argparse.Namespace) -> int:
    """Compare every stage with a golden set; exit 1 if any comparison is beyond its tolerance."""
    import torch

    from .reference_check import GoldenSet, compare_all, stage_summary

    torch.manual_seed(0)
    golden = GoldenSet.load(args.directory)
    results = compare_all(golden)
    shown = results if args.all else list(stage_summary(results).values())
    stage_w = max(len("stage"), *(len(r.stage) for r in shown))
    name_w = max(len("tensor (worst of the stage)"), *(len(r.name) for r in shown))
    print(f"reference golden set: {args.directory}")
    print(f"{'stage':<{stage_w}}  {'tensor' if args.all else 'tensor (worst of the stage)':<{name_w}}  "
          f"{'max |diff|':>10}  {'tolerance':>10}")
    for r in shown:
        flag = "ok" if r.ok else "FAIL"
        note = f"  ({r.note})" if r.note and not r.ok else ""
        print(f"{r.stage:<{stage_w}}  {r.name:<{name_w}}  {r.max_abs_diff:10.3g}  {r.tolerance:10.3g}  {flag}{note}")
    failed = [r for r in results if not r.ok]
    if args.json_out:
        records = [{"stage": r.stage, "name": r.name, "max_abs_diff": r.max_abs_diff, "tolerance": r.tolerance,
                    "ok": r.ok, "note": r.note} for r in results]
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(records, indent=2))
    print(f"{len(results) - len(failed)} of {len(results)} comparisons within tolerance"
          + (f"; beyond: {', '.join(f'{r.stage} {r.name}' for r in failed)}" if failed else ""))
    return EXIT_MISMATCH if failed else 0


def run_download(args: argparse.Namespace) -> int:
    from .hub import download_official

    for key, path in download_official(args.dest, which=args.which, force=args.force).items():
        print(f"{key}: {path}")
    return 0


def _user_errors() -> Tuple[type, ...]:
    """Exceptions printed as one line: ours, plus `CheckpointError` once the (torch-heavy) loader is imported."""
    from .hub import DownloadError

    errors: List[type] = [CLIError, DownloadError, OSError, ValueError]
    checkpoint = sys.modules.get(f"{__package__}.checkpoint")
    if checkpoint is not None:
        errors.append(checkpoint.CheckpointError)
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; user errors print one `error:` line and return 2. Parsing imports nothing heavy."""
    args = build_parser().parse_args(argv)
    runners = {"download": run_download, "predict": run_predict, "init": run_init,
               "verify-reference": run_verify_reference, "export-onnx": run_export_onnx}
    try:
        return runners[args.command](args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
