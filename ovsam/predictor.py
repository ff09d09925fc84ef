"""The predictor the backend uses: embed an image once, then answer clicks and boxes with mask + class."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score

from .boxes import mask_to_box
from .cache import SingleFlightLRUCache
from .encoder_runtime import ImageEncoder
from .fusion import foreground_probabilities
from .model import OVSAM, ImageFeatures
from .transforms import upscale_mask_logits, validate_image
from .vocabulary import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One object's prompt in original-image pixels; any mix of points (1 = positive, 0 = negative) and a box."""

    points: Optional[np.ndarray] = None  # [P, 2] (x, y)
    point_labels: Optional[np.ndarray] = None  # [P]
    box: Optional[np.ndarray] = None  # [4] x1, y1, x2, y2
    mask_input: Optional[torch.Tensor] = None  # [1, l, l] low-res logits of a previous prediction
    clip_box: Optional[np.ndarray] = None  # [4] box for the CLIP branch (evaluation modes only)


@dataclass
class LabelScore:
    label: str
    probability: float


@dataclass
class Prediction:
    mask: np.ndarray  # [H0, W0] bool
    low_res_logits: torch.Tensor  # [1, l, l], feed back as Prompt.mask_input to refine
    label: str
    label_index: int
    probability: float
    top_k: List[LabelScore]
    stability: float
    score: float  # stability × recognition confidence: the head has no IoU output
    box: np.ndarray  # [4] mask box in original pixels (x1, y1, x2, y2), zeros if empty


def image_key(image: np.ndarray) -> str:
    """Content key: the same pixels are the same image, whatever URL or array they came from."""
    h = hashlib.blake2b(digest_size=20)
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def validate_prompt(prompt: Prompt, height: int, width: int) -> Prompt:
    """Clear ValueErrors for empty prompts, points outside the image and malformed boxes."""
    has_points = prompt.points is not None and np.asarray(prompt.points).size > 0
    if not has_points and prompt.box is None:
        raise ValueError("empty prompt: give at least one point or a box")
    points = labels = None
    if has_points:
        points = np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)
        if not np.isfinite(points).all():
            raise ValueError("point coordinates must be finite numbers")
        labels = np.ones(len(points), np.int64) if prompt.point_labels is None else np.asarray(prompt.point_labels).reshape(-1)
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} points but {len(labels)} point labels")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("point labels must be 1 (positive) or 0 (negative)")
        if not labels.any():
            if prompt.box is None:
                raise ValueError("at least one positive point is needed (all points are negative)")
        outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
        if outside.any():
            raise ValueError(f"point {points[outside][0].tolist()} is outside the {width}x{height} image")
    box = None
    if prompt.box is not None:
        box = np.asarray(prompt.box, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise ValueError("a box is four finite numbers x1, y1, x2, y2")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box {box.tolist()} has no area (need x2 > x1 and y2 > y1)")
        if box[0] >= width or box[1] >= height or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"box {box.tolist()} lies outside the {width}x{height} image")
        box = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
    return Prompt(points, labels, box, prompt.mask_input, prompt.clip_box)


class OVSAMPredictor:
    """Embeds images once (content-keyed, byte-bounded cache) and decodes prompts in batches.

    Model work is serialised by a lock so several request threads can share one predictor; the cache makes
    concurrent `set_image` calls for the same image compute it once.
    """

    def __init__(
        self,
        model: OVSAM,
        vocabulary: Vocabulary,
        cache_bytes: int = 2 << 30,
        device: Optional[str | torch.device] = None,
        use_autocast: bool = True,
        max_batch: int = 64,
    ) -> None:
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.vocabulary = vocabulary
        self.cache: SingleFlightLRUCache[ImageFeatures] = SingleFlightLRUCache(cache_bytes, lambda f: f.nbytes)
        # Predictors of different models sharing one cache (a fine-tuned model on its base's trunk) key their entries
        # apart: the features hold the recognition head's FPN maps, which are each model's own.
        self.cache_namespace = ""
        self.use_autocast = use_autocast and self.device.type == "cuda"
        self.max_batch = max_batch
        # Eager until an exported encoder is installed (`encoder_runtime.configure_encoder`); copies share it.
        self.image_encoder = ImageEncoder(self.model)
        self.model_lock = threading.RLock()
        # The "current image" of the SAM-style API is per thread, so request threads never see each other's.
        self._local = threading.local()

    # ---- state ------------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        with self.model_lock, torch.inference_mode():
            if self.use_autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield

    def set_image(self, image: np.ndarray, key: Optional[str] = None) -> ImageFeatures:
        """Compute (or fetch from the cache) every per-image feature; also becomes the current image."""
        image = validate_image(image)
        key = key or image_key(image)
        self._local.current = self.cache.get_or_compute(self._cache_key(key), lambda: self._encode(image))
        return self._local.current

    def set_images(
        self, images: Sequence[np.ndarray], keys: Optional[Sequence[Optional[str]]] = None
    ) -> List[ImageFeatures]:
        """`set_image` for several images (pre-annotation), those not cached encoded in one batch where batches
        pay (eager PyTorch, i.e. a GPU); the exported CPU encoder takes them one at a time, each its own model
        call, so a click waits for one image, not a batch. Every image's features are cached as `set_image`
        caches them (a click on one being encoded waits for it); none becomes the current image."""
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        images = [validate_image(image) for image in images]
        cache_keys = [self._cache_key(k or image_key(im)) for im, k in zip(images, keys or [None] * len(images))]
        if len(images) == 1 or not self.image_encoder.batches:
            return [self.cache.get_or_compute(k, lambda im=im: self._encode(im)) for im, k in zip(images, cache_keys)]
        return self.cache.get_or_compute_many(cache_keys, lambda missing: self._encode_batch([images[i] for i in missing]))

    def _encode(self, image: np.ndarray) -> ImageFeatures:
        with self.inference():
            feats = self.image_encoder.encode_image(image)
        return feats.to(self.device, torch.float32)

    def _encode_batch(self, images: List[np.ndarray]) -> List[ImageFeatures]:
        if len(images) == 1:
            return [self._encode(images[0])]
        with self.inference():
            try:
                return [f.to(self.device, torch.float32) for f in self.image_encoder.encode_images(images)]
            except torch.OutOfMemoryError:
                pass  # retried below, once this frame no longer holds the failed batch's activations
        # a batch too large for this device's memory: one image at a time needs a batch's fraction
        log.warning("out of memory encoding %d images in one batch: encoding them one by one (lower "
                    "PREDICT_BATCH_IMAGES)", len(images))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [self._encode(image) for image in images]

    def _cache_key(self, key: str) -> str:
        return f"{self.cache_namespace}/{key}" if self.cache_namespace else key

    def cached_features(self, key: str) -> Optional[ImageFeatures]:
        """This model's features of the image `key` names, if they are cached (nothing is computed)."""
        return self.cache.get(self._cache_key(key))

    @property
    def current_features(self) -> Optional[ImageFeatures]:
        """The features of this thread's last `set_image`, used when `predict` gets no `features`."""
        return getattr(self._local, "current", None)

    def is_cached(self, image: np.ndarray) -> bool:
        return self._cache_key(image_key(validate_image(image))) in self.cache

    # ---- prompts ----------------------------------------------------------------------------
    def predict(
        self,
        points: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[torch.Tensor] = None,
        top_k: int = 5,
        features: Optional[ImageFeatures] = None,
    ) -> Prediction:
        """One object from any mix of points and a box in original pixels."""
        return self.predict_batch([Prompt(points, point_labels, box, mask_input)], features=features, top_k=top_k)[0]

    def predict_batch(
        self, prompts: Sequence[Prompt], features: Optional[ImageFeatures] = None, top_k: int = 5
    ) -> List[Prediction]:
        """Many objects on one image in as few decoder calls as possible (prompts grouped by structure)."""
        feats = features or self.current_features
        if feats is None:
            raise ValueError("no image: call set_image first")
        h, w = feats.frame.original_size
        checked = [validate_prompt(p, h, w) for p in prompts]
        groups: Dict[Tuple[int, bool, bool], List[int]] = {}
        for i, p in enumerate(checked):
            n_pts = 0 if p.points is None else len(p.points)
            groups.setdefault((n_pts, p.box is not None, p.mask_input is not None), []).append(i)
        results: List[Optional[Prediction]] = [None] * len(checked)
        for idx in groups.values():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start : start + self.max_batch]
                for i, pred in zip(chunk, self._predict_group([checked[i] for i in chunk], feats, top_k)):
                    results[i] = pred
        return results  # type: ignore[return-value]

    def _predict_group(self, prompts: List[Prompt], feats: ImageFeatures, top_k: int) -> List[Prediction]:
        model, frame, dev = self.model, feats.frame, self.device
        points = labels = boxes = masks = clip_boxes = None
        if prompts[0].points is not None:
            points = torch.stack([frame.points_to_input(p.points) for p in prompts]).to(dev)
            labels = torch.stack([torch.as_tensor(p.point_labels, dtype=torch.long) for p in prompts]).to(dev)
        if prompts[0].box is not None:
            boxes = torch.stack([frame.boxes_to_input(p.box) for p in prompts]).to(dev)
        if prompts[0].mask_input is not None:
            masks = torch.stack([torch.as_tensor(p.mask_input).float().reshape(1, *p.mask_input.shape[-2:]) for p in prompts]).to(dev)
        mode = model.cfg.clip_roi_boxes
        if mode == "prompt_box" and boxes is not None:
            clip_boxes = boxes
        elif mode == "faithful" and all(p.clip_box is not None for p in prompts):
            # The reference's CLIP branch reads unscaled original-coordinate boxes (docs/REFERENCE_NOTES.md B1), kept for comparisons.
            clip_boxes = torch.as_tensor(np.stack([p.clip_box for p in prompts]), dtype=torch.float32, device=dev)
        vocab = self.vocabulary
        with self.inference():
            sparse, dense = model.encode_prompts(points, labels, boxes, masks)
            low_res = model.decode(feats.embedding, sparse, dense, high_res=feats.high_res).float()
            rec = model.recognise(
                feats.pyramid, feats.c5, low_res, vocab.embeddings.to(dev), vocab.is_base.to(dev), clip_boxes=clip_boxes,
                clip_kv=feats.clip_kv, excluded=vocab.excluded.to(dev) if vocab.excluded.any() else None,
            )
            probs = foreground_probabilities(rec.scores.float())
            stability = calculate_stability_score(low_res[:, 0], 0.0, 1.0)
        k = min(top_k, len(vocab))
        top_p, top_i = probs.topk(k, dim=-1)
        out: List[Prediction] = []
        for j in range(len(prompts)):
            logits = upscale_mask_logits(low_res[j : j + 1], frame)[0]
            mask = (logits > 0).cpu().numpy()
            top = [LabelScore(vocab.labels[int(i)], float(p)) for p, i in zip(top_p[j], top_i[j])]
            stab = float(stability[j])
            box = mask_to_box(mask)
            out.append(
                Prediction(
                    mask=mask,
                    low_res_logits=low_res[j].cpu(),
                    label=top[0].label,
                    label_index=int(top_i[j, 0]),
                    probability=top[0].probability,
                    top_k=top,
                    stability=stab,
                    score=stab * top[0].probability,
                    box=box,
                )
            )
        return out
