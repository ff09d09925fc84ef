"""Image and coordinate transforms between the original image and the model's padded square input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass(frozen=True)
class ImageFrame:
    """Where an image sits in the model input: original (H0, W0), resized (h', w') inside a square of `input_size`."""

    original_size: Tuple[int, int]
    resized_size: Tuple[int, int]
    input_size: int

    @classmethod
    def for_image(cls, height: int, width: int, input_size: int) -> "ImageFrame":
        # mmdet's keep-ratio Resize rounds like SAM's: int(side * scale + 0.5).
        resized = ResizeLongestSide.get_preprocess_shape(height, width, input_size)
        # A very thin image (e.g. 1x300) would round its short side to 0 pixels: keep at least one.
        resized = (max(1, int(resized[0])), max(1, int(resized[1])))
        return cls((int(height), int(width)), resized, int(input_size))

    @property
    def scale_xy(self) -> Tuple[float, float]:
        return (self.resized_size[1] / self.original_size[1], self.resized_size[0] / self.original_size[0])

    def points_to_input(self, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(x, y) original pixels -> input pixels."""
        pts = torch.as_tensor(points, dtype=torch.float32).clone()
        sx, sy = self.scale_xy
        pts[..., 0] *= sx
        pts[..., 1] *= sy
        return pts

    def boxes_to_input(self, boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
        b = torch.as_tensor(boxes, dtype=torch.float32)
        return self.points_to_input(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        sx, sy = self.scale_xy
        scale = boxes.new_tensor([sx, sy, sx, sy])
        return boxes / scale


def resize_and_normalize(
    image: np.ndarray, frame: ImageFrame, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
) -> torch.Tensor:
    """RGB uint8 HxWx3 -> [1, 3, S, S] float: cv2 bilinear resize, SAM statistics, zero padding after normalising."""
    h, w = frame.resized_size
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != image.shape[:2] else image
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
    x = (x - pixel_mean.view(3, 1, 1).cpu()) / pixel_std.view(3, 1, 1).cpu()
    s = frame.input_size
    return F.pad(x, (0, s - w, 0, s - h)).unsqueeze(0)


def validate_image(image: np.ndarray) -> np.ndarray:
    """Accept HxWx3 RGB uint8 (or HxW grey / HxWx4 RGBA); anything else is a clear ValueError."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
            image = image * 255.0
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def input_frame_mask_logits(low_res: torch.Tensor, input_size: int, height: int, width: int) -> torch.Tensor:
    """Low-res logits [N, 1, l, l] -> logits [N, 1, height, width] on the model's input canvas, cropped to the
    image's resized part (its top-left corner): the frame training's annotated masks live in."""
    x = F.interpolate(low_res.float(), (input_size, input_size), mode="bilinear", align_corners=False)
    return x[..., :height, :width]


def upscale_mask_logits(low_res: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """Low-res logits [N, 1, l, l] -> logits at the original size [N, H0, W0]."""
    x = input_frame_mask_logits(low_res, frame.input_size, *frame.resized_size)
    x = F.interpolate(x, frame.original_size, mode="bilinear", align_corners=False)
    return x[:, 0]
