"""`python -m training synth`'s command line: its parser and entry point, free of cv2 and pycocotools.

Kept apart from `training.synth` so that `--help` and argument errors answer at once; the
drawing code is imported only once the arguments parse.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
APPEARANCES = ("class", "random")


def _parse_classes(text: str) -> tuple[tuple[str, str], ...]:
    """'circle,star' or 'cat=circle,dog=star' (label=shape) to (label, shape) pairs."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, _, shape = item.partition("=")
        label, shape = label.strip(), (shape or label).strip()
        if shape not in SHAPES:
            raise argparse.ArgumentTypeError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)} (use label=shape)")
        pairs.append((label, shape))
    if not pairs:
        raise argparse.ArgumentTypeError("no classes given")
    return tuple(pairs)


def _parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        size = (int(w), int(h or w))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("size is N or WxH, e.g. 256 or 320x240") from exc
    if min(size) < 16:
        raise argparse.ArgumentTypeError("images must be at least 16 px")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training synth",
        description="Generate a synthetic labelled data set of shapes (Label Studio tasks, COCO, label config).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--size", type=_parse_size, default=(256, 256), help="N or WxH (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--classes",
        type=_parse_classes,
        default=",".join(SHAPES),
        help=f"comma list of shapes or label=shape pairs (default {','.join(SHAPES)})",
    )
    p.add_argument("--min-objects", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument(
        "--appearance",
        choices=APPEARANCES,
        default="class",
        help="class: each class has a characteristic hue and texture (default); "
        "random: colour and texture independent of the class, shape the only cue",
    )
    p.add_argument(
        "--image-url-prefix",
        default="images",
        help="prefix of task image URLs, e.g. http://host:8081/images or /data/local-files/?d=synth/images "
        "(default: 'images', relative to --out)",
    )
    p.add_argument("--from-name", default="tag", help="BrushLabels name in the label config and results")
    p.add_argument("--to-name", default="image", help="Image name in the label config and results")
    p.add_argument("--no-progress", action="store_true")
    return p


def main_synth(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.synth import SynthConfig, write_dataset  # cv2, pycocotools: only once the arguments are good

    cfg = SynthConfig(
        out=args.out,
        num_images=args.num_images,
        width=args.size[0],
        height=args.size[1],
        seed=args.seed,
        classes=args.classes,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        appearance=args.appearance,
        image_url_prefix=args.image_url_prefix,
        from_name=args.from_name,
        to_name=args.to_name,
    )
    summary = write_dataset(cfg, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
