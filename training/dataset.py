"""Training examples for CLIP2SAM: annotated images -> augmented, normalised inputs with sampled prompts.

Every random choice of an example (LSJ, prompt sampling, loss points) comes from a generator seeded by
(seed, epoch, index), never from global state. That is what makes a resumed run, a DDP run and a
1-process run see exactly the same examples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ovsam.config import OVSAMConfig
from ovsam.transforms import ImageFrame, resize_and_normalize, validate_image
from ovsam.boxes import mask_to_box
from training.data.prompts import lsj_augment, sample_training_prompts
from training.data.types import Sample, SkipReport


class ImageSource(Protocol):
    def load(self, ref: str) -> np.ndarray: ...


def make_image_source(data_roots: Optional[Path | Sequence[Path]] = None, loader: Any = None) -> ImageSource:
    """`labelstudio_io`'s ImageLoader (Label Studio URLs, http, data URIs, local files under allowed roots),
    with the data files' folders added as local roots so relative paths in exports and COCO files work."""
    if loader is not None:
        return loader
    from labelstudio_io.images import ImageLoader, ImageLoaderConfig

    cfg = ImageLoaderConfig.from_env()
    if data_roots is not None:
        extra = [data_roots] if isinstance(data_roots, (str, Path)) else list(data_roots)
        roots = (*(str(Path(r).resolve()) for r in extra), *cfg.local_roots)
        cfg = dataclasses.replace(cfg, local_roots=roots)
    return ImageLoader(cfg)


@dataclass
class TrainingData:
    """Samples plus what describes them: vocabulary labels/synonyms, skip counts, provenance."""

    samples: List[Sample]
    labels: List[str]
    synonyms: Dict[str, List[str]]
    report: SkipReport
    data_hash: str
    source: str
    image_root: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def hash_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_tasks(tasks: Any) -> str:
    return hash_bytes(json.dumps(tasks, sort_keys=True, default=str).encode())


def labels_from_config(label_config: Optional[str]) -> Tuple[Optional[List[str]], Dict[str, List[str]], Optional[str]]:
    """(labels, synonyms, image data key) of a Label Studio config, or Nones when there is none."""
    if not label_config:
        return None, {}, None
    from labelstudio_io.label_config import parse_label_config

    schema = parse_label_config(label_config)
    syn = {l: [s for s in schema.synonyms.get(l, []) if s != l] for l in schema.labels}
    return list(schema.labels), syn, schema.image_value_key


def read_label_config(path_or_xml: Optional[str]) -> Optional[str]:
    """A config given as a file path or inline XML."""
    if not path_or_xml:
        return None
    if path_or_xml.lstrip().startswith("<"):
        return path_or_xml
    return Path(path_or_xml).read_text(encoding="utf-8")


def is_coco_file(obj: Any) -> bool:
    return isinstance(obj, dict) and "images" in obj and "annotations" in obj and "categories" in obj


def load_training_data(
    data: str | Path | List[dict],
    label_config: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
    image_root: Optional[str | Path] = None,
) -> TrainingData:
    """A Label Studio export (file or task list) or a COCO file -> samples and the vocabulary to train.

    Labels come from the label config (with its `predicted_values` synonyms), else `labels`, else the
    data itself (COCO categories in file order; Label Studio labels sorted).
    """
    from training.data.coco import load_coco
    from training.data.labelstudio_export import load_labelstudio_export

    cfg_labels, synonyms, image_key = labels_from_config(label_config)
    wanted = cfg_labels or (list(labels) if labels else None)
    if isinstance(data, list):
        samples, report = load_labelstudio_export(data, labels=wanted, image_key=image_key)
        return _finish(samples, report, wanted, synonyms, hash_tasks(data), "tasks", Path(image_root) if image_root else None)
    path = Path(data)
    raw = path.read_bytes()
    obj = json.loads(raw)
    if is_coco_file(obj):
        root = Path(image_root) if image_root else _coco_image_root(path.resolve(), obj)
        samples, report = load_coco(path, root, labels=wanted)
        if wanted is None:
            wanted = [c["name"] for c in sorted(obj["categories"], key=lambda c: c["id"])]
        return _finish(samples, report, wanted, synonyms, hash_bytes(raw), str(path), root)
    samples, report = load_labelstudio_export(obj, labels=wanted, image_key=image_key)
    root = Path(image_root) if image_root else path.resolve().parent
    return _finish(samples, report, wanted, synonyms, hash_bytes(raw), str(path), root)


def _coco_image_root(path: Path, obj: dict) -> Path:
    """COCO file names are relative to an image folder: the file's own folder or its `images/`."""
    first = obj["images"][0]["file_name"] if obj["images"] else ""
    for root in (path.parent, path.parent / "images"):
        if (root / first).exists():
            return root
    return path.parent


def _finish(samples: List[Sample], report: SkipReport, labels: Optional[List[str]], synonyms: Dict[str, List[str]],
            data_hash: str, source: str, root: Optional[Path]) -> TrainingData:
    if labels is None:
        labels = sorted({inst.label for s in samples for inst in s.instances})
    if root is not None:  # relative paths become absolute: two data files may use the same relative names
        for s in samples:
            ref = s.image_ref
            if "://" not in ref and not ref.startswith(("/", "data:")) and (root / ref).is_file():
                s.image_ref = str((root / ref).resolve())
    return TrainingData(samples, list(labels), synonyms, report, data_hash, source, root)


def keep_loadable(data: TrainingData, images: ImageSource) -> TrainingData:
    """Drop samples whose image cannot be read or does not match its annotations' size, counting them
    ('image not loadable', 'image size mismatch'), so one bad task cannot stop a training run midway.
    Reads every image once (meant for project-sized data; it also warms the loader's cache)."""
    kept = []
    for s in data.samples:
        try:
            image = images.load(s.image_ref)
        except Exception:  # any loader error (HTTP, decoding, permissions) means the same for training
            data.report.add("image not loadable", s.task_id)
            continue
        if tuple(image.shape[:2]) != (s.height, s.width):
            data.report.add("image size mismatch", s.task_id)
            continue
        kept.append(s)
    data.samples = kept
    return data


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleConfig:
    image_size: int
    augment: bool = True
    ratio_range: Tuple[float, float] = (0.9, 2.0)
    flip_prob: float = 0.5
    num_proposals: int = 40
    num_box_prompts: int = 21
    min_mask_area: Optional[int] = None  # default: 32 px at 1024, scaled with the image area
    seed: int = 0

    @property
    def min_area(self) -> int:
        if self.min_mask_area is not None:
            return self.min_mask_area
        return max(1, int(32 * (self.image_size / 1024) ** 2))


class CLIP2SAMDataset(Dataset):
    """Example i of epoch e: LSJ (or plain resize) + normalise/pad + 40 sampled prompts, seeded by (seed, e, i)."""

    def __init__(self, samples: Sequence[Sample], label_to_index: Dict[str, int], images: ImageSource,
                 cfg: ExampleConfig, model_cfg: OVSAMConfig) -> None:
        self.samples = list(samples)
        self.label_to_index = label_to_index
        self.images = images
        self.cfg = cfg
        self.mean = torch.tensor(model_cfg.pixel_mean)
        self.std = torch.tensor(model_cfg.pixel_std)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_image(self, sample: Sample) -> np.ndarray:
        image = validate_image(self.images.load(sample.image_ref))
        if image.shape[:2] != (sample.height, sample.width):
            raise ValueError(
                f"task {sample.task_id}: image {sample.image_ref} is {image.shape[1]}x{image.shape[0]} but its "
                f"annotations are for {sample.width}x{sample.height}"
            )
        return image

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = self.samples[index]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, index])
        image = self.load_image(sample)
        insts = [i for i in sample.instances if i.label in self.label_to_index]
        if not insts:
            raise ValueError(f"task {sample.task_id} has no instance with a vocabulary label")
        h, w = image.shape[:2]
        masks = np.stack([i.mask if i.mask is not None else np.zeros((h, w), bool) for i in insts])
        boxes = np.stack([np.asarray(i.box, np.float32) for i in insts])
        has_mask = np.array([i.mask is not None for i in insts])
        labels = np.array([self.label_to_index[i.label] for i in insts], np.int64)
        out = self._augmented(image, masks, boxes, has_mask, rng) if self.cfg.augment else None
        if out is None:
            out = self._resized(image, masks, boxes, has_mask)
        img, masks, boxes, keep = out
        has_mask, labels = has_mask[keep], labels[keep]
        prompts = sample_training_prompts(masks, boxes, self.cfg.num_proposals, self.cfg.num_box_prompts,
                                          generator=rng, has_mask=has_mask)
        frame = ImageFrame(img.shape[:2], img.shape[:2], self.cfg.image_size)
        x = resize_and_normalize(img, frame, self.mean, self.std)[0]
        return {
            "index": index,
            "image": x,
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "mask_index": torch.from_numpy(prompts["indices"]),
            "is_box": torch.from_numpy(prompts["prompt_types"] == 0),
            "points": torch.from_numpy(prompts["points"].astype(np.float32)),
            "boxes": torch.from_numpy(prompts["boxes"].astype(np.float32)),
            "labels": torch.from_numpy(labels[prompts["indices"]]),
            "has_mask": torch.from_numpy(prompts["has_mask"]),
            "seed": int(rng.integers(2**62)),
        }

    def _augmented(self, image, masks, boxes, has_mask, rng):
        for _ in range(10):  # the reference redraws an image left without instances
            aug = lsj_augment(image, masks, boxes, rng, out_size=self.cfg.image_size, ratio_range=self.cfg.ratio_range,
                              flip_prob=self.cfg.flip_prob, has_mask=has_mask, min_mask_area=self.cfg.min_area)
            if len(aug.keep):
                return aug.image, aug.masks, aug.boxes, aug.keep
        return None

    def _resized(self, image, masks, boxes, has_mask):
        """No augmentation: the inference resize (long side = image size), masks by nearest neighbour."""
        frame = ImageFrame.for_image(image.shape[0], image.shape[1], self.cfg.image_size)
        h, w = frame.resized_size
        img = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != image.shape[:2] else image
        out_masks, out_boxes, keep = [], [], []
        for i in range(len(masks)):
            if has_mask[i]:
                m = cv2.resize(masks[i].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
                if not m.any():
                    continue
                box = mask_to_box(m)
            else:
                m = np.zeros((h, w), bool)
                box = frame.boxes_to_input(boxes[i]).numpy()
            out_masks.append(m)
            out_boxes.append(box)
            keep.append(i)
        if not keep:
            raise ValueError("no instance survives resizing")
        return img, np.stack(out_masks), np.stack(out_boxes).astype(np.float32), np.asarray(keep)


def collate_examples(examples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One batch: images stacked; prompts concatenated image by image; masks zero-padded to a common size."""
    hh = max(e["masks"].shape[1] for e in examples)
    ww = max(e["masks"].shape[2] for e in examples)
    masks, offsets, offset = [], [], 0
    for e in examples:
        m = e["masks"]
        masks.append(torch.nn.functional.pad(m, (0, ww - m.shape[2], 0, hh - m.shape[1])))
        offsets.append(offset)
        offset += m.shape[0]
    cat = lambda key: torch.cat([e[key] for e in examples])  # noqa: E731
    return {
        "index": [e["index"] for e in examples],
        "images": torch.stack([e["image"] for e in examples]),
        "masks": torch.cat(masks),
        "mask_index": torch.cat([e["mask_index"] + o for e, o in zip(examples, offsets)]),
        "image_index": torch.cat([torch.full((len(e["labels"]),), i, dtype=torch.long) for i, e in enumerate(examples)]),
        "is_box": cat("is_box"),
        "points": cat("points"),
        "boxes": cat("boxes"),
        "labels": cat("labels"),
        "has_mask": cat("has_mask"),
        "seeds": [e["seed"] for e in examples],
        "masked_counts": [int(e["has_mask"].sum()) for e in examples],
    }


class FeatureStore:
    """Frozen trunk features (C2..C5) and SAM-like embeddings per image, computed once.

    Only valid without augmentation (the input of an image is then the same every epoch). The FPN is
    trained, so its inputs are cached, not its outputs.
    """

    def __init__(self) -> None:
        self._feats: Dict[int, Tuple[List[torch.Tensor], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._feats)

    @torch.no_grad()
    def get(self, model: torch.nn.Module, indices: Sequence[int],
            images: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        missing = [j for j, i in enumerate(indices) if i not in self._feats]
        if missing:
            x = images[missing]
            feats = model.trunk(x)
            emb = model.neck(feats)
            for k, j in enumerate(missing):
                self._feats[indices[j]] = ([f[k : k + 1].float().cpu() for f in feats], emb[k : k + 1].float().cpu())
        rows = [self._feats[i] for i in indices]
        dev = images.device
        levels = [torch.cat([r[0][lvl] for r in rows]).to(dev) for lvl in range(len(rows[0][0]))]
        return levels, torch.cat([r[1] for r in rows]).to(dev)
