"""Synthetic labelled images: named shapes on cluttered backgrounds, with exact masks.

Used to train and test the whole loop (Label Studio import, fine-tuning, evaluation) without
any downloaded data. Objects occlude each other (later on top), so masks are the *visible*
pixels; objects left with < 30% of their area or < 32 px are not drawn at all, so every
painted object is labelled. Background clutter (gradients, noise, faint lines and blobs) is
never labelled. Every image depends only on (seed, index), so runs are byte-reproducible.

Appearance (``--appearance``): with ``class`` (the default) each class has, like a real category, a
characteristic hue (classes spread around the colour wheel, each object's hue drawn around its class's,
so neighbouring classes overlap) and a preferred texture, and its shape never varies: colour narrows a
click down, shape decides. With ``random`` colour and texture are independent of the class, and shape
is the only cue (a harder set for stress tests).

Writes: images/img_XXXX.png, tasks.json (Label Studio import with ground-truth brush
annotations), tasks_unlabelled.json (the same tasks without annotations, for pre-annotation),
coco.json (COCO instances, RLE) and label_config.xml.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from labelstudio_io.brush import encode_brush
# The command line lives in a cv2-free module (a fast `--help`); still importable from here.
from training.synth_cli import APPEARANCES, SHAPES, _parse_classes, _parse_size, build_parser, main_synth  # noqa: F401

TEXTURES = ("solid", "stripes", "dots")
HUE_SPREAD = 0.35  # std of an object's hue around its class's, in units of the hue gap between classes
PREFERRED_TEXTURE_P = 0.6  # chance that an object wears its class's texture (else any of the others)
MIN_VISIBLE_FRACTION = 0.3
MIN_AREA = 32
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    num_images: int = 100
    width: int = 256
    height: int = 256
    seed: int = 0
    classes: tuple[tuple[str, str], ...] = tuple((s, s) for s in SHAPES)  # (label, shape)
    min_objects: int = 2
    max_objects: int = 6
    appearance: str = "class"
    image_url_prefix: str = "images"
    from_name: str = "tag"
    to_name: str = "image"


# ----------------------------------------------------------------------------- drawing


def _polygon(mask: np.ndarray, pts: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)], 1, cv2.LINE_8, _SHIFT)


def _disc(mask: np.ndarray, cx: float, cy: float, r: float, value: int) -> None:
    s = 1 << _SHIFT
    cv2.circle(mask, (round(cx * s), round(cy * s)), round(r * s), value, -1, cv2.LINE_8, _SHIFT)


def _regular(cx: float, cy: float, radii: Sequence[float], angle: float) -> np.ndarray:
    """Vertices at evenly spaced angles, cycling through `radii` (a star alternates two)."""
    k = len(radii)
    t = angle + np.arange(k) * 2 * math.pi / k
    r = np.asarray(radii)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, width: int, height: int) -> np.ndarray:
    """Full (unoccluded) bool mask of one shape of 'radius' r, clipped to the image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    if shape == "circle":
        _disc(mask, cx, cy, r, 1)
    elif shape == "ring":
        _disc(mask, cx, cy, r, 1)
        _disc(mask, cx, cy, 0.55 * r, 0)
    elif shape == "square":
        _polygon(mask, _regular(cx, cy, [r] * 4, angle))
    elif shape == "triangle":
        _polygon(mask, _regular(cx, cy, [r] * 3, angle))
    elif shape == "star":
        _polygon(mask, _regular(cx, cy, [r, 0.45 * r] * 5, angle))
    elif shape == "cross":
        a, b = r, 0.3 * r  # arm length and half width
        plus = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        _polygon(mask, plus @ rot.T + [cx, cy])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask.astype(bool)


def _texture(
    rng: np.random.Generator,
    width: int,
    height: int,
    base: np.ndarray,
    kind: str | None = None,
    other: np.ndarray | None = None,
) -> np.ndarray:
    """An HxWx3 pattern in the object's colours: solid, stripes or dots (random kind and second colour
    unless given)."""
    if kind is None:
        kind = TEXTURES[rng.integers(len(TEXTURES))]
    if other is None:
        other = np.clip(base + rng.choice([-1, 1], 3) * rng.integers(50, 110, 3), 0, 255)
    out = np.empty((height, width, 3), np.float32)
    out[:] = base
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stripes":
        t = rng.uniform(0, math.pi)
        on = ((xx * math.cos(t) + yy * math.sin(t)) // rng.integers(3, 8)) % 2 == 1
        out[on] = other
    elif kind == "dots":
        step, radius = int(rng.integers(5, 9)), float(rng.uniform(1.0, 2.2))
        on = (xx % step - step / 2) ** 2 + (yy % step - step / 2) ** 2 <= radius**2
        out[on] = other
    return out


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Gradient, faint blobs and lines: clutter that no label covers."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    g = xx / width * math.cos(t) + yy / height * math.sin(t)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c0 * (1 - g[..., None]) + c1 * g[..., None]
    for _ in range(int(rng.integers(2, 7))):  # blobs
        layer = img.copy()
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(5, max(6, width // 4))), int(rng.integers(5, max(6, height // 4))))
        cv2.ellipse(layer, center, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
        alpha = rng.uniform(0.1, 0.3)
        img = img * (1 - alpha) + layer * alpha
    for _ in range(int(rng.integers(3, 10))):  # lines
        layer = img.copy()
        p, q = rng.integers(0, [width, height], size=(2, 2))
        cv2.line(
            layer,
            (int(p[0]), int(p[1])),
            (int(q[0]), int(q[1])),
            rng.uniform(0, 255, 3).tolist(),
            int(rng.integers(1, 3)),
        )
        alpha = rng.uniform(0.15, 0.35)
        img = img * (1 - alpha) + layer * alpha
    return img.astype(np.float32)


def _object_colour(rng: np.random.Generator, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A colour that stands out from the background under the object."""
    under = background[mask].mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(10):
        if np.abs(colour - under).mean() >= 60:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def check_appearance(appearance: str) -> None:
    if appearance not in APPEARANCES:
        raise ValueError(f"unknown appearance {appearance!r}; known: {', '.join(APPEARANCES)}")


@dataclass(frozen=True)
class ClassStyle:
    """What a class tends to look like under the ``class`` appearance."""

    hue: float  # 0..1, the centre of the class's hues
    hue_spread: float  # std of its objects' hues
    texture: str  # the texture its objects usually wear


def class_styles(labels: Sequence[str]) -> dict[str, ClassStyle]:
    """Hues evenly spaced around the wheel in label order; textures cycle through TEXTURES."""
    n = max(len(labels), 1)
    return {
        label: ClassStyle(hue=i / n, hue_spread=HUE_SPREAD / n, texture=TEXTURES[i % len(TEXTURES)])
        for i, label in enumerate(labels)
    }


def _styled_texture(
    rng: np.random.Generator, style: ClassStyle, background: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The object's pattern: a hue near its class's that stands out from the background under it, its
    class's texture most of the time, the pattern's second colour a darker or lighter shade of the same hue."""
    under = background[mask].mean(axis=0)
    for _ in range(10):
        hue = (style.hue + rng.normal(0, style.hue_spread)) % 1.0
        sat, val = rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
        colour = 255 * np.array(colorsys.hsv_to_rgb(hue, sat, val))
        if np.abs(colour - under).mean() >= 60:
            break
    if rng.random() < PREFERRED_TEXTURE_P:
        kind = style.texture
    else:
        others = [t for t in TEXTURES if t != style.texture]
        kind = others[rng.integers(len(others))]
    shade = val - 0.35 if val > 0.7 else val + 0.35
    other = 255 * np.array(colorsys.hsv_to_rgb(hue, sat * 0.8, min(max(shade, 0.0), 1.0)))
    return _texture(rng, background.shape[1], background.shape[0], colour, kind=kind, other=other)


# ----------------------------------------------------------------------------- images


def generate_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    classes: Sequence[tuple[str, str]],
    min_objects: int,
    max_objects: int,
    appearance: str = "class",
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One RGB uint8 image and its (label, visible mask) objects, bottom-most first."""
    check_appearance(appearance)
    styles = class_styles(list(dict.fromkeys(label for label, _ in classes)))
    background = _background(rng, width, height)
    side = min(width, height)
    for _ in range(20):  # redraw until enough objects survive occlusion (else keep the last try)
        drawn = []
        for _ in range(int(rng.integers(min_objects, max_objects + 1))):
            label, shape = classes[rng.integers(len(classes))]
            r = rng.uniform(0.07, 0.22) * side
            cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
            mask = shape_mask(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), width, height)
            if mask.sum() >= MIN_AREA:
                drawn.append((label, mask))
        kept = _visible(drawn)
        if len(kept) >= min_objects:
            break
    image = background
    for label, full, visible in kept:
        if appearance == "class":
            texture = _styled_texture(rng, styles[label], background, full)
        else:
            texture = _texture(rng, width, height, _object_colour(rng, background, full))
        image = np.where(visible[..., None], texture, image)
    image = image + rng.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), [(label, visible) for label, _, visible in kept]


def _visible(drawn: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Occlusion from the top object down; objects hidden too much are dropped, not drawn."""
    covered = np.zeros_like(drawn[0][1]) if drawn else None
    kept = []
    for label, full in reversed(drawn):
        visible = full & ~covered
        area = int(visible.sum())
        if area >= MIN_AREA and area >= MIN_VISIBLE_FRACTION * full.sum():
            kept.append((label, full, visible))
            covered |= visible
    return kept[::-1]


# ----------------------------------------------------------------------------- files


def label_config(labels: Sequence[str], from_name: str = "tag", to_name: str = "image") -> str:
    """Image + BrushLabels + smart KeyPointLabels + smart RectangleLabels over the same labels."""
    items = "".join(
        f"\n    <Label value={quoteattr(l)} background={quoteattr(_PALETTE[i % len(_PALETTE)])}/>"
        for i, l in enumerate(labels)
    )
    img, name = quoteattr(to_name), from_name
    return (
        "<View>\n"
        f'  <Image name={img} value="$image" zoom="true"/>\n'
        f"  <BrushLabels name={quoteattr(name)} toName={img}>{items}\n  </BrushLabels>\n"
        f"  <KeyPointLabels name={quoteattr(name + '_point')} toName={img} smart=\"true\">{items}\n  </KeyPointLabels>\n"
        f"  <RectangleLabels name={quoteattr(name + '_box')} toName={img} smart=\"true\">{items}\n  </RectangleLabels>\n"
        "</View>\n"
    )


def _brush_region(index: int, k: int, label: str, mask: np.ndarray, cfg: SynthConfig) -> dict:
    return {
        "id": f"s{index:04d}r{k:02d}",
        "from_name": cfg.from_name,
        "to_name": cfg.to_name,
        "type": "brushlabels",
        "original_width": cfg.width,
        "original_height": cfg.height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_brush(np.asarray(mask, dtype=bool)), "brushlabels": [label]},
    }


def _coco_annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def write_dataset(cfg: SynthConfig, progress: bool = True) -> dict:
    """Generate and write the data set; returns counts for the log line."""
    if not cfg.classes:
        raise ValueError("no classes")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    check_appearance(cfg.appearance)  # before any file is written
    labels = list(dict.fromkeys(label for label, _ in cfg.classes))
    category_ids = {label: i + 1 for i, label in enumerate(labels)}
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    prefix = cfg.image_url_prefix.rstrip("/")

    tasks, images, annotations = [], [], []
    for index in tqdm(range(cfg.num_images), desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([cfg.seed, index])
        image, objects = generate_image(
            rng, cfg.width, cfg.height, cfg.classes, cfg.min_objects, cfg.max_objects, cfg.appearance
        )
        name = f"img_{index:04d}.png"
        Image.fromarray(image).save(out / "images" / name, format="PNG")
        result = [_brush_region(index, k, label, mask, cfg) for k, (label, mask) in enumerate(objects)]
        tasks.append(
            {
                "data": {"image": f"{prefix}/{name}" if prefix else name},
                "annotations": [{"result": result, "ground_truth": True}],
            }
        )
        images.append({"id": index + 1, "file_name": name, "width": cfg.width, "height": cfg.height})
        for label, mask in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, index + 1, category_ids[label], mask))

    _write_json(out / "tasks.json", tasks)
    _write_json(out / "tasks_unlabelled.json", [{"data": t["data"]} for t in tasks])
    categories = [{"id": i, "name": label, "supercategory": "shape"} for label, i in category_ids.items()]
    _write_json(out / "coco.json", {"images": images, "annotations": annotations, "categories": categories})
    (out / "label_config.xml").write_text(label_config(labels, cfg.from_name, cfg.to_name), encoding="utf-8")
    return {"images": len(images), "objects": len(annotations), "classes": labels, "out": str(out)}


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")
