"""`python -m training dump-sam-features`: SAM image-encoder embeddings, the teacher targets of SAM2CLIP.

One fp16 `<image stem>.pt` ([256, 64, 64] for SAM at 1024 px) per image in one flat folder, which is
where `distill` looks (the reference wrote them next to the images and read them from elsewhere,
pitfall P5). Images get the same preprocessing as the student sees: long side resized to the
encoder's input size (cv2 bilinear), SAM/ImageNet normalisation, zero padding after normalising.
Existing files are skipped, so an interrupted dump continues where it stopped; under torchrun each
rank dumps its share of the images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from ovsam.config import PIXEL_MEAN, PIXEL_STD
from ovsam.transforms import ImageFrame, resize_and_normalize, validate_image
# The command line lives in a torch-free module (a fast `--help`); still importable from here.
from training.dump_features_cli import build_parser, main_dump_sam_features  # noqa: F401

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(dirs: Sequence[str | Path], recursive: bool = False) -> List[Path]:
    """Image files of the folders, sorted; stems must be unique because the output folder is flat."""
    files: List[Path] = []
    for d in dirs:
        it = Path(d).rglob("*") if recursive else Path(d).iterdir()
        files += sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    seen: Dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise ValueError(f"two images share the stem {p.stem!r} ({seen[p.stem]}, {p}); features are keyed by stem")
        seen[p.stem] = p
    return files


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return validate_image(np.array(ImageOps.exif_transpose(img).convert("RGB")))


def sam_input(image: np.ndarray, size: int) -> torch.Tensor:
    """[1, 3, size, size]: the student's preprocessing, so teacher and student see the same pixels."""
    frame = ImageFrame.for_image(image.shape[0], image.shape[1], size)
    return resize_and_normalize(image, frame, torch.tensor(PIXEL_MEAN), torch.tensor(PIXEL_STD))


def build_sam_encoder(model_type: str, checkpoint: str) -> nn.Module:
    """SAM's image encoder (with its neck) from an official `sam_vit_{h,l,b}_*.pth`."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose from {sorted(sam_model_registry)}")
    return sam_model_registry[model_type](checkpoint=checkpoint).image_encoder


def save_atomic(tensor: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(tensor, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def dump_features(encoder: nn.Module, images: Sequence[Path], out_dir: Path, device: torch.device,
                  progress: bool = True, amp: bool = True) -> Dict[str, int]:
    """Encode every image whose `<stem>.pt` is missing; returns {'written', 'skipped'}."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    size = int(getattr(encoder, "img_size", 1024))
    written = skipped = 0
    use_amp = amp and device.type == "cuda"
    for path in tqdm(images, desc="sam features", unit="img", disable=not progress):
        target = out_dir / f"{path.stem}.pt"
        if target.exists():
            skipped += 1
            continue
        x = sam_input(read_rgb(path), size).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            feat = encoder(x)[0]
        save_atomic(feat.float().half().cpu().clone(), target)
        written += 1
    return {"written": written, "skipped": skipped}


def run_dump_sam_features(args: argparse.Namespace) -> int:
    """`python -m training dump-sam-features` once its arguments (`training.dump_features_cli`) have parsed."""
    from training.distributed import cleanup_distributed, init_distributed, shard

    info = init_distributed(args.device)
    images = list_images(args.images, args.recursive)
    if not images:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    encoder = build_sam_encoder(args.model_type, args.sam_checkpoint)
    counts = dump_features(encoder, shard(images, info.rank, info.world_size), args.out, info.device,
                           progress=not args.no_progress and info.is_main, amp=not args.no_amp)
    cleanup_distributed()
    print(json.dumps({"rank": info.rank, "images": len(images), **counts, "out": str(args.out)}))
    return 0
