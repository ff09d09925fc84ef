"""Model configurations: the official OVSAM layout, other CLIP ResNets, and tiny ones for tests.

Everything that changes a tensor shape lives here, so a saved artifact can rebuild its model from
this dataclass alone (see `ovsam.artifact`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

# SAM/ImageNet statistics: OVSAM feeds CLIP with these, not CLIP's own (docs/REFERENCE_NOTES.md, preprocessing).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

CLIP_ROI_BOX_MODES = ("pred_mask_box", "prompt_box", "faithful")


@dataclass(frozen=True)
class OVSAMConfig:
    """Shapes and switches of one OVSAM model."""

    name: str = "ovsam_rn50x16"
    # CLIP ResNet trunk (open_clip ModifiedResNet)
    clip_model: str = "RN50x16"
    clip_layers: Tuple[int, ...] = (6, 8, 18, 8)
    clip_width: int = 96
    clip_image_size: int = 384  # sets the attention pool's grid: clip_image_size // 32
    clip_embed_dim: int = 768
    clip_pretrained: Optional[str] = "openai"
    # Text tower (open_clip); `text_cfg` set means a custom tower whose weights ship in the artifact.
    text_model: str = "RN50x16-quickgelu"
    text_pretrained: Optional[str] = "openai"
    text_cfg: Optional[Dict[str, Any]] = None
    # Input
    image_size: int = 1024
    # SAM2CLIP neck
    neck_embed_dim: int = 1280
    neck_depth: int = 5
    neck_num_heads: int = 16
    neck_window_size: int = 14
    neck_global_attn_indexes: Tuple[int, ...] = (4,)
    # SAM prompt encoder / mask decoder
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    # CLIP2SAM recognition head
    fpn_channels: int = 256
    head_roi_size: int = 12
    finest_scale: float = 56.0
    logit_scale: float = math.exp(4.6052)
    # Average the RoI features over the mask's share of each bin instead of the whole box. Not OVSAM's
    # (its released weights were trained on box averages): for overlapping, non-convex objects the box
    # holds as much of the neighbours and background as of the object.
    head_mask_pooling: bool = False
    # Add the trunk's stride-8 and stride-4 maps (C3, C2, projected by zero-initialised 1x1 convs) to the
    # mask decoder's two upscaling steps. Not OVSAM's: its decoder sees only the stride-16 embedding, so
    # edges are drawn from a grid 16 input pixels wide; small objects lose most. Off in every official
    # preset (their released weights have no such convs); `finetune --decoder-high-res` adds them.
    decoder_high_res: bool = False
    # Fusion of head and CLIP-branch logits (docs/REFERENCE_NOTES.md, fusion)
    use_clip_branch: bool = True
    alpha: float = 0.1
    beta: float = 0.9
    clip_roi_boxes: str = "pred_mask_box"
    pixel_mean: Tuple[float, float, float] = PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = PIXEL_STD

    def __post_init__(self) -> None:
        if self.clip_roi_boxes not in CLIP_ROI_BOX_MODES:
            raise ValueError(f"clip_roi_boxes must be one of {CLIP_ROI_BOX_MODES}, got {self.clip_roi_boxes!r}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

    @property
    def trunk_channels(self) -> Tuple[int, int, int, int]:
        """Channels of C2..C5 (Bottleneck expansion 4 on width, 2·width, 4·width, 8·width)."""
        w = self.clip_width
        return (w * 4, w * 8, w * 16, w * 32)

    @property
    def embedding_size(self) -> int:
        """Side of the SAM-like image embedding grid (stride 16)."""
        return self.image_size // 16

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (stride 4)."""
        return self.image_size // 4

    @property
    def clip_roi_size(self) -> int:
        """RoI size for the CLIP branch: the attention pool only takes its own grid."""
        return self.clip_image_size // 32

    def replace(self, **changes: Any) -> "OVSAMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "OVSAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OVSAMConfig fields: {sorted(unknown)}")
        tuples = {f.name for f in dataclasses.fields(cls) if "Tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()})


def _clip_resnet(name: str, layers: Tuple[int, ...], width: int, image_size: int, embed_dim: int) -> OVSAMConfig:
    return OVSAMConfig(
        name=f"ovsam_{name.lower()}",
        clip_model=name,
        clip_layers=layers,
        clip_width=width,
        clip_image_size=image_size,
        clip_embed_dim=embed_dim,
        text_model=f"{name}-quickgelu",
    )


# open_clip's OpenAI ResNets (model_configs/*.json): layers, width, image size, embed dim.
PRESETS: Dict[str, OVSAMConfig] = {
    "rn50x16": _clip_resnet("RN50x16", (6, 8, 18, 8), 96, 384, 768),
    "rn50": _clip_resnet("RN50", (3, 4, 6, 3), 64, 224, 1024),
    "rn101": _clip_resnet("RN101", (3, 4, 23, 3), 64, 224, 512),
    "rn50x4": _clip_resnet("RN50x4", (4, 6, 10, 6), 80, 288, 640),
    "rn50x64": _clip_resnet("RN50x64", (3, 15, 36, 10), 128, 448, 1024),
}

# The reference's LVIS evaluation config (ovsam_lvis_rn50x16_point.py) pools the head's RoIs at 7x7 (trained at
# 12x12, docs/REFERENCE_NOTES.md B4); the COCO config and the CLIP branch keep 12.
PRESETS["rn50x16_lvis"] = PRESETS["rn50x16"].replace(name="ovsam_rn50x16_lvis", head_roi_size=7)

TINY_TEXT_CFG: Dict[str, Any] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

# A few-MB model for tests: every module of the official one at toy widths.
PRESETS["tiny"] = OVSAMConfig(
    name="ovsam_tiny",
    clip_model="tiny-resnet",
    clip_layers=(1, 1, 1, 1),
    clip_width=8,
    clip_image_size=64,
    clip_embed_dim=32,
    clip_pretrained=None,
    text_model="tiny-text",
    text_pretrained=None,
    text_cfg=TINY_TEXT_CFG,
    image_size=128,
    neck_embed_dim=32,
    neck_depth=2,
    neck_num_heads=2,
    neck_window_size=4,
    neck_global_attn_indexes=(1,),
    prompt_embed_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    fpn_channels=32,
    head_roi_size=4,
    finest_scale=14.0,
)

# The small model the project trains on synthetic data and ships as the offline default.
PRESETS["demo"] = OVSAMConfig(
    name="ovsam_demo",
    clip_model="demo-resnet",
    clip_layers=(1, 1, 2, 1),
    clip_width=16,
    clip_image_size=128,
    clip_embed_dim=64,
    clip_pretrained=None,
    text_model="demo-text",
    text_pretrained=None,
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    image_size=256,
    neck_embed_dim=64,
    neck_depth=2,
    neck_num_heads=4,
    neck_window_size=8,
    neck_global_attn_indexes=(1,),
    prompt_embed_dim=64,
    decoder_depth=2,
    decoder_mlp_dim=256,
    decoder_num_heads=4,
    fpn_channels=64,
    head_roi_size=7,
    finest_scale=28.0,
    head_mask_pooling=True,
    use_clip_branch=False,  # its trunk is not CLIP: the attention pool was never aligned with the text tower
)


def get_config(name: str, **overrides: Any) -> OVSAMConfig:
    """A preset by name (`rn50x16` is the official one), with field overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
