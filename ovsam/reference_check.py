"""Stage-by-stage comparison with outputs of the reference OVSAM code (HarborYuan/ovsam), a "golden set".

A golden set is a folder holding `golden_small.safetensors` (weights under the released key names plus
`golden.*` inputs and expected outputs) and `golden_small.json` (the configuration, prompts, class split,
centre-point results and diagnostics); see tests/ovsam/fixtures/reference_golden/README.md. The weights go
through the same key mappers as the official checkpoints (`ovsam.checkpoint`), and each stage is fed the
golden inputs of that stage, so one wrong stage shows as itself and not as everything after it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .centre import centre_point
from .checkpoint import (
    CheckpointError,
    load_into,
    map_clip2sam,
    map_open_clip_visual,
    map_sam,
    map_sam2clip,
)
from .config import OVSAMConfig, get_config
from .fusion import EXCLUDED_SCORE, fuse_logits
from .model import OVSAM
from .roi import boxes_to_rois
from .transforms import ImageFrame, upscale_mask_logits

WEIGHTS_FILE = "golden_small.safetensors"
META_FILE = "golden_small.json"
GOLDEN_PREFIX = "golden."

# Float32 agreement with the reference: 0 to ~1e-5 (logits of magnitude ~40, neck outputs ~4). Each float
# comparison allows 2e-5 x max(1, largest |expected|), about ten times the differences measured here with
# torch 2.14.1 on x86 CPUs, so another CPU's rounding fits; a wrong mapping, normalisation, token or
# activation moves outputs by 1e-2 to 1e2.
RELATIVE_TOLERANCE = 2e-5

PathLike = Union[str, os.PathLike]


@dataclass
class StageResult:
    """One compared tensor: its largest absolute difference and the tolerance it had."""

    stage: str
    name: str
    max_abs_diff: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class GoldenSet:
    """A golden set in memory: weights (float32), `golden.*` tensors without the prefix, and the JSON."""

    meta: Dict[str, Any]
    weights: Dict[str, torch.Tensor]
    tensors: Dict[str, torch.Tensor]

    @classmethod
    def load(cls, directory: PathLike) -> "GoldenSet":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (WEIGHTS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a golden set: {name} is missing")
        meta = json.loads((directory / META_FILE).read_text())
        weights: Dict[str, torch.Tensor] = {}
        tensors: Dict[str, torch.Tensor] = {}
        for key, value in load_file(str(directory / WEIGHTS_FILE)).items():
            if key.startswith(GOLDEN_PREFIX):
                tensors[key[len(GOLDEN_PREFIX):]] = value
            else:  # stored as float16; the expected outputs were computed from these values in float32
                weights[key] = value.float()
        return cls(meta, weights, tensors)

    def config(self) -> OVSAMConfig:
        """The official preset at the set's reduced sizes (its JSON `config.ovsam_config`)."""
        sizes = {k: v for k, v in self.meta["config"]["ovsam_config"].items() if k != "logit_scale_reference"}
        return get_config("rn50x16", **sizes)

    @property
    def prompt_sets(self) -> List[str]:
        return list(self.meta["prompts"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def class_indicator(self) -> torch.Tensor:
        """Per class: 1 base, 2 novel, 0 excluded."""
        return self.tensors["classes.indicator"]


# ---- the model, through the official mappers ---------------------------------------------------------------
WEIGHT_GROUPS: Dict[str, tuple] = {
    # released prefix: (mapper, prefixes of our model it must fill completely)
    "neck_student.": (map_sam2clip, ["neck."]),
    "mask_decoder.": (map_clip2sam, ["head."]),
    "fpn_neck.": (map_clip2sam, ["head."]),
    "prompt_encoder.": (lambda s: map_sam(s, ("prompt_encoder",)), ["prompt_encoder."]),
    "visual.": (map_open_clip_visual, ["trunk.visual.attnpool."]),
}


def build_model(golden: GoldenSet) -> OVSAM:
    """Our OVSAM at the set's sizes with every golden weight loaded strictly through `ovsam.checkpoint`'s mappers.

    The trunk's convolutions stay random: the set gives their outputs (C2..C5) instead.
    """
    model = OVSAM(golden.config())
    groups: Dict[Callable, Dict[str, torch.Tensor]] = {}
    targets: Dict[Callable, List[str]] = {}
    for key, value in golden.weights.items():
        for prefix, (mapper, prefixes) in WEIGHT_GROUPS.items():
            if key.startswith(prefix):
                groups.setdefault(mapper, {})[key] = value
                targets[mapper] = prefixes
                break
        else:
            raise CheckpointError(f"golden weights: key {key!r} has no released prefix {sorted(WEIGHT_GROUPS)}")
    for mapper, state in groups.items():
        load_into(model, mapper(state), targets[mapper], source=f"golden weights {targets[mapper]}")
    return model.eval()


# ---- comparisons ---------------------------------------------------------------------------------------------
def _float_result(stage: str, name: str, got: torch.Tensor, expected: torch.Tensor, note: str = "") -> StageResult:
    expected = expected.float()
    scored = expected[expected != EXCLUDED_SCORE]  # the -1000 of excluded classes must match, but sets no scale
    tol = RELATIVE_TOLERANCE * max(1.0, float(scored.abs().max())) if scored.numel() else RELATIVE_TOLERANCE
    if tuple(got.shape) != tuple(expected.shape):
        return StageResult(stage, name, float("inf"), tol, f"shape {tuple(got.shape)} vs {tuple(expected.shape)}")
    diff = float((got.detach().float().cpu() - expected).abs().max()) if expected.numel() else 0.0
    return StageResult(stage, name, diff if diff == diff else float("inf"), tol, note)  # NaN fails


def _exact_result(stage: str, name: str, got: torch.Tensor, expected: torch.Tensor,
                  ignore: Optional[torch.Tensor] = None) -> StageResult:
    """Integer/boolean outputs: the count of differing entries must be 0 (`ignore` marks entries not judged)."""
    if tuple(got.shape) != tuple(expected.shape):
        return StageResult(stage, name, float("inf"), 0.0, f"shape {tuple(got.shape)} vs {tuple(expected.shape)}")
    differ = got.cpu().to(expected.dtype) != expected
    note = "differing entries"
    if ignore is not None:
        differ &= ~ignore
        note += f" (ignoring {int(ignore.sum())} near-zero pixels)"
    return StageResult(stage, name, float(differ.sum()), 0.0, note)


def _prompt_inputs(golden: GoldenSet, name: str):
    pts = golden.tensors.get(f"prompts.{name}.point_coords")
    boxes = golden.tensors.get(f"prompts.{name}.boxes")
    labels = None
    if pts is not None:
        pts = pts.float()
        labels = torch.ones(pts.shape[:2], dtype=torch.long)  # the reference sets every point label to 1
    return pts, labels, boxes


def compare_preprocessing(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    rgb = golden["image.rgb"].numpy()
    h0, w0 = rgb.shape[:2]
    frame = ImageFrame.for_image(h0, w0, model.cfg.image_size)
    img_shape = tuple(golden.meta["image"]["img_shape"])
    shape_ok = StageResult("image", "img_shape", 0.0 if frame.resized_size == img_shape else float("inf"), 0.0,
                           f"ours {frame.resized_size}, reference {img_shape}")
    x, _ = model.preprocess(rgb)
    return [shape_ok, _float_result("image", "input", x, golden["image.input"])]


def compare_neck(model: OVSAM, golden: GoldenSet, trunk: List[torch.Tensor]) -> List[StageResult]:
    return [_float_result("neck", "embedding", model.neck(trunk), golden["neck.embedding"])]


def compare_fpn(model: OVSAM, golden: GoldenSet, trunk: List[torch.Tensor]) -> List[StageResult]:
    pyramid = model.head.pyramid(trunk)
    names = [f"P{i + 2}" for i in range(len(trunk))]
    return [_float_result("fpn", n, p, golden[f"fpn.{n}"]) for n, p in zip(names, pyramid)]


def compare_prompt_encoder(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    out = [_float_result("prompt_encoder", "image_pe", model.image_pe(), golden["pe.image_pe"])]
    for name in golden.prompt_sets:
        pts, labels, boxes = _prompt_inputs(golden, name)
        sparse, dense = model.encode_prompts(pts, labels, boxes)
        out.append(_float_result("prompt_encoder", f"{name}.sparse", sparse, golden[f"pe.{name}.sparse"]))
        out.append(_float_result("prompt_encoder", f"{name}.dense", dense[:1], golden["pe.dense"]))
    return out


def compare_decoder(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    out = []
    for name in golden.prompt_sets:
        sparse = golden[f"pe.{name}.sparse"]
        dense = golden["pe.dense"].expand(sparse.shape[0], -1, -1, -1)
        low_res = model.decode(golden["neck.embedding"], sparse, dense)
        out.append(_float_result("decoder", f"{name}.low_res_logits", low_res, golden[f"decoder.{name}.low_res_logits"]))
    return out


def _given_head_boxes(golden: GoldenSet, name: str) -> Optional[torch.Tensor]:
    """The head's RoIs are the prompt boxes where the reference ran it with gen_box=False."""
    return golden[f"prompts.{name}.boxes"] if str(golden.meta["prompts"][name].get("head_rois", "")).startswith("given") else None


def compare_head(model: OVSAM, golden: GoldenSet, pyramid: List[torch.Tensor]) -> List[StageResult]:
    out = []
    text = golden["text.embeddings"]
    for name in golden.prompt_sets:
        low_res = golden[f"decoder.{name}.low_res_logits"]
        given = _given_head_boxes(golden, name)
        boxes = model.mask_boxes(low_res) if given is None else given
        out.append(_exact_result("head", f"{name}.roi_boxes", boxes, golden[f"head.{name}.roi_boxes"]))
        rois = boxes_to_rois(golden[f"head.{name}.roi_boxes"])
        embed = model.head.roi_embeddings(pyramid, rois)
        out.append(_float_result("head", f"{name}.roi_embed", embed, golden[f"head.{name}.roi_embed"]))
        logits = model.head.classify(pyramid, rois, text)
        out.append(_float_result("head", f"{name}.logits", logits, golden[f"head.{name}.logits"]))
    return out


def compare_clip_branch(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    out = []
    c5, text = golden["trunk.C5"], golden["text.embeddings"]
    kv = model.trunk.key_value_maps(c5)
    for name in golden.prompt_sets:
        rois = boxes_to_rois(golden[f"clip.{name}.boxes"])
        embed = model.trunk.attention_pool(_clip_roi_align(c5, rois, model.cfg.clip_roi_size))
        out.append(_float_result("clip_branch", f"{name}.roi_embed", embed, golden[f"clip.{name}.roi_embed"]))
        out.append(_float_result("clip_branch", f"{name}.logits", model.clip_branch_logits(c5, rois, text),
                                 golden[f"clip.{name}.logits"]))
        out.append(_float_result("clip_branch", f"{name}.logits_from_kv_maps",
                                 model.clip_branch_logits(c5, rois, text, kv), golden[f"clip.{name}.logits"]))
    return out


def _clip_roi_align(c5: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.ops import roi_align

    return roi_align(c5, rois, size, spatial_scale=1.0 / 32, sampling_ratio=0, aligned=True)


def _split(golden: GoldenSet):
    indicator = golden.class_indicator()
    return indicator == 1, indicator == 0


def _valid(low_res: torch.Tensor, grid: int) -> torch.Tensor:
    """The reference's `valid_masking`: the mask resized to the C5 grid has a positive logit."""
    small = torch.nn.functional.interpolate(low_res.float(), (grid, grid), mode="bilinear", align_corners=False)
    return (small > 0).flatten(1).any(1)


def compare_fusion(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    out = []
    is_base, excluded = _split(golden)
    cfg, grid = model.cfg, golden["trunk.C5"].shape[-1]
    for name in golden.prompt_sets:
        head, clip = golden[f"head.{name}.logits"], golden[f"clip.{name}.logits"]
        low_res = golden[f"decoder.{name}.low_res_logits"]
        valid = _valid(low_res, grid)
        out.append(_exact_result("fusion", f"{name}.valid", valid, golden[f"fusion.{name}.valid"]))
        scores = fuse_logits(head, clip, is_base, valid, cfg.alpha, cfg.beta, excluded)
        out.append(_float_result("fusion", f"{name}.scores", scores, golden[f"fusion.{name}.scores"]))
        labels = scores[:, :-1].argmax(-1)
        out.append(_exact_result("fusion", f"{name}.labels", labels, golden[f"fusion.{name}.labels"]))
        emptied = low_res.clone()
        rows = golden.meta["prompts"][name]["invalid_rows"]
        emptied[rows] = -emptied[rows].abs() - 0.01
        invalid = fuse_logits(head, clip, is_base, _valid(emptied, grid), cfg.alpha, cfg.beta, excluded)
        out.append(_float_result("fusion", f"{name}.scores_invalid_rows", invalid,
                                 golden[f"fusion.{name}.scores_invalid_rows"]))
        no_split = fuse_logits(head, clip, torch.zeros_like(is_base), valid, cfg.alpha, cfg.beta)
        out.append(_float_result("fusion", f"{name}.scores_no_split", no_split, golden[f"fusion.{name}.scores_no_split"]))
    return out


def compare_recognise(model: OVSAM, golden: GoldenSet) -> List[StageResult]:
    """`OVSAM.recognise` as a whole (RoIs from the masks, CLIP boxes as given, split and exclusions) -> fused scores."""
    out = []
    is_base, excluded = _split(golden)
    pyramid = [golden[f"fpn.P{i}"] for i in range(2, 6)]
    for name in golden.prompt_sets:
        rec = model.recognise(pyramid, golden["trunk.C5"], golden[f"decoder.{name}.low_res_logits"],
                              golden["text.embeddings"], is_base, head_boxes=_given_head_boxes(golden, name),
                              clip_boxes=golden[f"clip.{name}.boxes"], excluded=excluded)
        out.append(_float_result("recognise", f"{name}.scores", rec.scores, golden[f"fusion.{name}.scores"]))
    return out


def compare_masks(golden: GoldenSet) -> List[StageResult]:
    """Low-res logits -> original-size masks; pixels the diagnostics list as within 1e-5 of 0 are not judged."""
    out = []
    h0, w0 = golden.meta["image"]["original_hw"]
    frame = ImageFrame.for_image(h0, w0, golden.meta["config"]["image_size"])
    near_zero = golden.meta.get("diagnostics", {}).get("predict", {})
    for key in sorted(k for k in golden.tensors if k.startswith("predict.") and k.endswith(".masks")):
        name = key.split(".")[1]
        expected = golden[key]
        masks = upscale_mask_logits(golden[f"decoder.{name}.low_res_logits"], frame) > 0
        ignore = torch.zeros_like(expected)
        for n, y, x, _ in near_zero.get(name, {}).get("near_zero_logit_pixels_n_y_x_logit", []):
            ignore[int(n), int(y), int(x)] = True
        out.append(_exact_result("masks", f"{name}.masks", masks, expected, ignore))
        labels_key = f"predict.{name}.labels"
        if labels_key in golden.tensors:
            out.append(_exact_result("masks", f"{name}.labels", golden[f"fusion.{name}.labels"], golden[labels_key]))
    return out


def compare_centre_points(golden: GoldenSet) -> List[StageResult]:
    """The evaluation's click: our `centre_point` on each rescaled mask vs the reference's (kornia 0.7.x)."""
    results = golden.meta.get("centre", {}).get("results", {})
    primary = golden.meta.get("centre", {}).get("primary")
    if primary not in results:
        return []
    out = []
    expected = golden[f"centre.points_{primary}"]
    got = torch.zeros_like(expected)
    for i in range(expected.shape[0]):
        rescaled = golden[f"centre.rescaled_{i:02d}"].numpy().astype(bool)
        got[i] = torch.tensor(centre_point(rescaled))
    out.append(_exact_result("centre_point", f"points_{primary}", got, expected))
    return out


def compare_all(golden: GoldenSet, model: Optional[OVSAM] = None) -> List[StageResult]:
    """Every stage the set has, each fed its own golden inputs."""
    model = model or build_model(golden)
    trunk = [golden[f"trunk.C{i}"] for i in range(2, 6)]
    pyramid = [golden[f"fpn.P{i}"] for i in range(2, 6)]
    with torch.no_grad():
        return [
            *compare_preprocessing(model, golden),
            *compare_neck(model, golden, trunk),
            *compare_fpn(model, golden, trunk),
            *compare_prompt_encoder(model, golden),
            *compare_decoder(model, golden),
            *compare_head(model, golden, pyramid),
            *compare_clip_branch(model, golden),
            *compare_fusion(model, golden),
            *compare_recognise(model, golden),
            *compare_masks(golden),
            *compare_centre_points(golden),
        ]


def stage_summary(results: Sequence[StageResult]) -> Dict[str, StageResult]:
    """Per stage, its worst comparison (the largest difference relative to its tolerance)."""
    worst: Dict[str, StageResult] = {}

    def badness(r: StageResult) -> float:
        return r.max_abs_diff / r.tolerance if r.tolerance > 0 else (0.0 if r.max_abs_diff == 0 else float("inf"))

    for r in results:
        if r.stage not in worst or badness(r) > badness(worst[r.stage]):
            worst[r.stage] = r
    return worst

