#!/usr/bin/env python
"""Interactive latency and FLOPs: the OVSAM predictor against SAM (ViT-B / ViT-H) and a SAM-then-CLIP recogniser.

All models are built with random weights at their official shapes: only speed is measured here, never quality.
Every image encoder is built, measured, and freed before the next one is built (ViT-H is about 2.5 GB in fp32).

What is measured (medians of `time.perf_counter`, with `torch.cuda.synchronize` on CUDA):
  * ours        `OVSAMPredictor.set_image` (hash, resize, CLIP trunk, SAM2CLIP neck, FPN) and `predict` with one
                positive point on the cached image (prompt encoder, decoder, mask box, RoIAlign head, CLIP
                attention-pool branch, fusion, upsampling to the original size, numpy conversion);
  * SAM         `SamPredictor.set_image` and `predict(..., multimask_output=False)` (its decoder click);
  * SAM+CLIP    the naive open-vocabulary recogniser: a SAM click, then the box of the mask is cropped from the
                image, resized to the CLIP input size, run through the open_clip visual tower and scored by
                cosine against the vocabulary (the image embedding is cached, as it is for ours).
  first click = set_image + one click;  further click = one click on an image that is already embedded.
  exported    the same OVSAM image encoder exported to ONNX and run by OpenVINO (ovsam/encoder_export.py, ovsam/encoder_runtime.py), measured
                against eager in alternation on the same images (bench/encoder_runtimes.py): set_image, first click and
                pre-annotation (automatic mode, as the backend runs it) images/s; its equality to eager on the bench
                image; and each runtime's encoder GFLOP/s as a share of this machine's fp32 GEMM peak, measured here.
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` in a separate, untimed pass; it counts matrix
multiplications, convolutions and attention (2 FLOPs per multiply-add) and ignores element-wise work,
interpolation and RoIAlign. The paper's "GFLOPs" are multiply-adds (SAM-H's encoder: ~3.0 T), so GMACs =
FLOPs / 2 is printed for comparison with its table (OVSAM 1,180G, SAM-H 3,001G).

Run:   .venv/bin/python bench/latency.py [--device cuda] [--repeats 5] [--image-repeats 1] [--skip-vit-h] [--quick]
       .venv/bin/python bench/latency.py --ovsam demo --skip-sam     (the shipped demo model, exported vs eager only)
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovsam.artifact import load_artifact  # noqa: E402
from ovsam.config import get_config  # noqa: E402
from ovsam.head import cosine_logits  # noqa: E402
from ovsam.model import OVSAM, ImageFeatures  # noqa: E402
from ovsam.boxes import mask_to_box  # noqa: E402
from ovsam.predictor import OVSAMPredictor  # noqa: E402
from ovsam.transforms import ImageFrame, upscale_mask_logits  # noqa: E402
from ovsam.vocabulary import Vocabulary  # noqa: E402

from encoder_runtimes import add_rates, bench_runtimes, gemm_peak  # noqa: E402  (bench/encoder_runtimes.py)
from harness import variant  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_CLASSES = 10

# Targets from the project brief (paper: OVSAM 1,180 GFLOPs vs SAM-H 3,001G, "3x efficiency").
TARGETS = {
    "first_click_ours_over_sam": ("<=", 1 / 3),
    "click_ours_over_sam_decoder": ("<=", 1.3),
    "click_sam_clip_over_ours": (">=", 10.0),
    "set_image_exported_speedup": (">=", 1.5),
    "encoder_exported_peak_fraction": (">=", 0.9),
    "first_click_exported_over_sam": ("<=", 1 / 3),
}
DEMO_MODEL = Path(__file__).resolve().parents[1] / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
PAPER_GMACS = {"ovsam": 1180.0, "sam_vit_h": 3001.0, "feature_crop_sam_clip": 3545.0, "image_crop_sam_clip": 3748.0}


# ---- measurement helpers ----------------------------------------------------------------------------
class Bench:
    """Device, precision and synchronisation for one run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def ctx(self) -> Iterator[None]:
        """inference_mode, plus bf16 autocast on CUDA (what the OVSAM predictor does itself)."""
        with torch.inference_mode():
            if self.cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield

    def time(self, fn: Callable[[], Any]) -> Tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (FlopCounterMode: matmul / conv / attention, 2 per multiply-add)."""
    return flops_and_output(fn)[0]


def flops_and_output(fn: Callable[[], Any]) -> Tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB image (blocks of colour plus noise), uint8."""
    base = rng.integers(0, 256, size=(max(height // 32, 1), max(width // 32, 1), 3), dtype=np.uint8)
    img = np.kron(base, np.ones((32, 32, 1), np.uint8))[:height, :width]
    img = np.pad(img, ((0, height - img.shape[0]), (0, width - img.shape[1]), (0, 0)), mode="edge")
    noise = rng.integers(-12, 13, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def click_points(rng: np.random.Generator, height: int, width: int, n: int) -> List[np.ndarray]:
    return [np.array([[rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height]], np.float32) for _ in range(n)]


def random_vocabulary(dim: int, rng_seed: int = 0) -> Vocabulary:
    g = torch.Generator().manual_seed(rng_seed)
    emb = F.normalize(torch.randn(NUM_CLASSES, 1, dim, generator=g), dim=-1)
    labels = [f"class_{i}" for i in range(NUM_CLASSES)]
    return Vocabulary(labels, [[l] for l in labels], emb)


# ---- ours -------------------------------------------------------------------------------------------
def bench_ours(b: Bench, cfg_name: str, image: np.ndarray, points: List[np.ndarray], args: argparse.Namespace) -> Dict[str, Any]:
    if cfg_name == "demo":  # the shipped model: trained weights, its own vocabulary
        artifact = load_artifact(DEMO_MODEL)
        model, vocab, cfg = artifact.model, artifact.vocabulary, artifact.model.cfg
    else:
        cfg = get_config(cfg_name)
        torch.manual_seed(0)
        model = OVSAM(cfg).eval()
        vocab = random_vocabulary(cfg.clip_embed_dim)
    pred = OVSAMPredictor(model, vocab, cache_bytes=4 << 30, device=b.device)
    h, w = image.shape[:2]
    one = np.ones(1, np.int64)
    s, g = cfg.image_size, cfg.embedding_size

    # Warm the click path on zero features of the right shapes (no image encoder run needed).
    dev = b.device
    c2, c3 = cfg.trunk_channels[:2]
    with torch.no_grad():
        high_res = model.head.high_res_features([torch.zeros(1, c2, s // 4, s // 4, device=dev),
                                                 torch.zeros(1, c3, s // 8, s // 8, device=dev)])
    fake = ImageFeatures(
        torch.zeros(1, cfg.prompt_embed_dim, g, g, device=dev),
        [torch.zeros(1, cfg.fpn_channels, s // st, s // st, device=dev) for st in (4, 8, 16, 32)],
        torch.zeros(1, cfg.trunk_channels[3], s // 32, s // 32, device=dev),
        ImageFrame.for_image(h, w, s),
        tuple(torch.zeros(1, cfg.trunk_channels[3], s // 32, s // 32, device=dev) for _ in range(2)),
        high_res,
    )
    for _ in range(2):
        pred.predict(points[0], one, features=fake)
    for i in range(args.warmup):
        pred.set_image(variant(image, 1000 + i))

    set_times, first_pred = [], []
    for r in range(args.image_repeats):
        t, _ = b.time(lambda: pred.set_image(variant(image, r)))
        set_times.append(t)
        t, _ = b.time(lambda: pred.predict(points[0], one))
        first_pred.append(t)
    clicks, empty = [], 0
    for p in points[1 : args.repeats + 1]:
        t, out = b.time(lambda: pred.predict(p, one))
        clicks.append(t)
        empty += int(not out.mask.any())
    res: Dict[str, Any] = {
        "config": cfg.name,
        "image_size": cfg.image_size,
        "params_m": n_params(model) / 1e6,
        "vocabulary_size": len(vocab),
        "set_image_s": median(set_times),
        "first_predict_s": median(first_pred),
        "click_s": median(clicks),
        "click_all_s": clicks,
        "empty_masks": empty,
    }
    res["first_click_s"] = res["set_image_s"] + res["first_predict_s"]
    res["stages_s"] = stage_times(b, model, pred, vocab, image, points, args)

    # FLOPs, untimed: image side per module on a weightless (meta) copy, click side per stage for real.
    feats = pred.set_image(variant(image, 0))
    frame = feats.frame
    fl: Dict[str, int] = {}
    with torch.inference_mode():
        with torch.device("meta"):
            meta = OVSAM(cfg).eval()
        x = torch.empty(1, 3, s, s, device="meta")
        fl["trunk"], trunk_feats = flops_and_output(lambda: meta.trunk(x))
        fl["neck"] = count_flops(lambda: meta.neck(trunk_feats))
        fl["fpn"] = count_flops(lambda: meta.head.pyramid(trunk_feats))
        del meta, trunk_feats
    with b.ctx():
        pts = frame.points_to_input(points[1])[None].to(dev)
        lab = torch.ones(1, 1, dtype=torch.long, device=dev)
        sparse, dense = model.encode_prompts(pts, lab)
        low_res = model.decode(feats.embedding, sparse, dense, high_res=feats.high_res).float()
        rois = torch.cat([low_res.new_zeros(1, 1), model.mask_boxes(low_res)], dim=1)
        text = vocab.embeddings.to(dev)
        fl["click_prompt_encoder"] = count_flops(lambda: model.encode_prompts(pts, lab))
        fl["click_decoder"] = count_flops(lambda: model.decode(feats.embedding, sparse, dense, high_res=feats.high_res))
        fl["click_head_roi"] = count_flops(lambda: model.head.classify(feats.pyramid, rois, text))
        fl["click_clip_branch"] = count_flops(lambda: model.clip_branch_logits(feats.c5, rois, text, feats.clip_kv))
        fl["click_upscale"] = count_flops(lambda: upscale_mask_logits(low_res, frame))
    fl["image"] = fl["trunk"] + fl["neck"] + fl["fpn"]
    fl["click"] = count_flops(lambda: pred.predict(points[1], one))
    res["flops"] = fl
    del pred, feats
    b.free()
    if not args.skip_exported and b.device.type == "cpu":
        res["runtimes"] = bench_runtimes(model, vocab, image, points[0], args.image_repeats, args.preannotate_images,
                                         args.points_per_side)
    del model
    b.free()
    return res


def stage_times(
    b: Bench, model: OVSAM, pred: OVSAMPredictor, vocab: Vocabulary, image: np.ndarray, points: List[np.ndarray],
    args: argparse.Namespace,
) -> Dict[str, float]:
    """Where our time goes: one untimed-elsewhere encoder pass split by module, and the click split by stage."""
    out: Dict[str, float] = {}
    dev = b.device
    with b.ctx():
        x, frame = model.preprocess(variant(image, 0))
        out["image_trunk"], feats = b.time(lambda: model.trunk(x))
        out["image_neck"], _ = b.time(lambda: model.neck(feats))
        out["image_fpn"], _ = b.time(lambda: model.head.pyramid(feats))
        del feats
    cached = pred.set_image(variant(image, 0))
    text, is_base = vocab.embeddings.to(dev), vocab.is_base.to(dev)
    lab = torch.ones(1, 1, dtype=torch.long, device=dev)
    runs: Dict[str, List[float]] = {k: [] for k in ("click_decoder", "click_head_roi", "click_clip_branch", "click_upscale")}
    with b.ctx():
        for p in points[1 : args.repeats + 1]:
            pts = frame.points_to_input(p)[None].to(dev)

            def decode() -> torch.Tensor:
                sparse, dense = model.encode_prompts(pts, lab)
                return model.decode(cached.embedding, sparse, dense, high_res=cached.high_res).float()

            t, low_res = b.time(decode)
            runs["click_decoder"].append(t)
            rois = torch.cat([low_res.new_zeros(1, 1), model.mask_boxes(low_res)], dim=1)
            t, _ = b.time(lambda: model.head.classify(cached.pyramid, rois, text))
            runs["click_head_roi"].append(t)
            t, _ = b.time(lambda: model.clip_branch_logits(cached.c5, rois, text, cached.clip_kv))
            runs["click_clip_branch"].append(t)
            t, _ = b.time(lambda: mask_to_box((upscale_mask_logits(low_res, frame)[0] > 0).cpu().numpy()))
            runs["click_upscale"].append(t)
    out.update({k: median(v) for k, v in runs.items()})
    return out


# ---- SAM and SAM-then-CLIP --------------------------------------------------------------------------
def build_clip_visual(name: str) -> Tuple[torch.nn.Module, int, int]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    visual = model.visual.eval()
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    dim = model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor) else model.text_projection.out_features
    del model
    return visual, int(size), int(dim)


def bench_sam(
    b: Bench,
    arch: str,
    image: np.ndarray,
    points: List[np.ndarray],
    args: argparse.Namespace,
    clip_name: Optional[str] = None,
) -> Dict[str, Any]:
    """SamPredictor latency; with `clip_name`, also the SAM-then-CLIP-crop recogniser on the same SAM."""
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry[arch]().to(b.device).eval()
    pred = SamPredictor(sam)
    h, w = image.shape[:2]
    one = np.ones(1, np.int64)

    # Warm the click path on a zero embedding.
    pred.features = torch.zeros(1, 256, 64, 64, device=b.device)
    pred.original_size = (h, w)
    pred.input_size = pred.transform.get_preprocess_shape(h, w, sam.image_encoder.img_size)
    pred.is_image_set = True
    with b.ctx():
        for _ in range(2):
            pred.predict(point_coords=points[0], point_labels=one, multimask_output=False)
        pred.reset_image()
        for i in range(args.warmup):
            pred.set_image(variant(image, 1000 + i))

    set_times, first_pred, clicks = [], [], []
    with b.ctx():
        for r in range(args.image_repeats):
            t, _ = b.time(lambda: pred.set_image(variant(image, r)))
            set_times.append(t)
            t, _ = b.time(lambda: pred.predict(point_coords=points[0], point_labels=one, multimask_output=False))
            first_pred.append(t)
        for p in points[1 : args.repeats + 1]:
            t, _ = b.time(lambda: pred.predict(point_coords=p, point_labels=one, multimask_output=False))
            clicks.append(t)
    res: Dict[str, Any] = {
        "arch": arch,
        "params_m": n_params(sam) / 1e6,
        "set_image_s": median(set_times),
        "first_predict_s": median(first_pred),
        "click_s": median(clicks),
        "click_all_s": clicks,
    }
    res["first_click_s"] = res["set_image_s"] + res["first_predict_s"]
    with torch.inference_mode():  # the image encoder's FLOPs on a weightless (meta) copy
        with torch.device("meta"):
            meta = sam_model_registry[arch]()
        size = meta.image_encoder.img_size
        image_flops = count_flops(lambda: meta.image_encoder(torch.empty(1, 3, size, size, device="meta")))
        del meta
    with b.ctx():
        res["flops"] = {
            "image": image_flops,
            "click": count_flops(lambda: pred.predict(point_coords=points[1], point_labels=one, multimask_output=False)),
        }

    if clip_name:
        res["sam_clip"] = bench_sam_clip(b, pred, sam, clip_name, image, points, args)
    del pred, sam
    b.free()
    return res


def bench_sam_clip(
    b: Bench, pred: Any, sam: torch.nn.Module, clip_name: str, image: np.ndarray, points: List[np.ndarray],
    args: argparse.Namespace,
) -> Dict[str, Any]:
    """SAM click -> crop the mask's box from the image -> resize to the CLIP input -> CLIP visual -> cosine."""
    visual, size, dim = build_clip_visual(clip_name)
    visual = visual.to(b.device)
    vocab = random_vocabulary(dim, rng_seed=1)
    text = vocab.embeddings.to(b.device)
    mean = torch.tensor(CLIP_MEAN, device=b.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=b.device).view(1, 3, 1, 1) * 255
    h, w = image.shape[:2]
    one = np.ones(1, np.int64)
    stats = {"empty": 0}

    def crop_tensor(mask: np.ndarray) -> torch.Tensor:
        box = mask_to_box(mask).astype(int)
        if box[2] <= box[0] or box[3] <= box[1]:  # random weights can give an empty mask: use the whole image
            stats["empty"] += 1
            box = np.array([0, 0, w, h])
        crop = np.ascontiguousarray(image[box[1] : box[3], box[0] : box[2]])
        x = torch.from_numpy(crop).to(b.device).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
        return (x - mean) / std

    def recognise(x: torch.Tensor) -> Tuple[int, float]:
        logits = cosine_logits(visual(x), text, 100.0)[:, :-1]
        probs = logits.softmax(dim=-1)
        p, i = probs.max(dim=-1)
        return int(i), float(p)

    def click(p: np.ndarray) -> Tuple[float, float]:
        t_sam, out = b.time(lambda: pred.predict(point_coords=p, point_labels=one, multimask_output=False))
        t_clip, _ = b.time(lambda: recognise(crop_tensor(out[0][0])))
        return t_sam, t_clip

    with b.ctx():
        for _ in range(2):
            click(points[0])  # warm the CLIP tower
        stats["empty"] = 0
        sam_t, clip_t = [], []
        for p in points[1 : args.repeats + 1]:
            ts, tc = click(p)
            sam_t.append(ts)
            clip_t.append(tc)
        x = crop_tensor(np.ones((h, w), bool))
        flops_clip = count_flops(lambda: recognise(x))
    totals = [a + c for a, c in zip(sam_t, clip_t)]
    res = {
        "clip_model": clip_name,
        "clip_input": size,
        "clip_params_m": n_params(visual) / 1e6,
        "click_sam_s": median(sam_t),
        "click_clip_s": median(clip_t),
        "click_s": median(totals),
        "click_all_s": totals,
        "empty_masks": stats["empty"],
        "flops": {"clip_crop": flops_clip},
    }
    del visual
    b.free()
    return res


# ---- report -----------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def gf(x: float) -> str:
    return f"{x / 1e9:9.1f}"


def report_runtimes(results: Dict[str, Any]) -> None:
    """Eager vs exported, side by side."""
    rt, peak = results["ours"].get("runtimes"), results.get("gemm_peak")
    if not rt:
        return
    print(f"image encoder runtimes (alternating on the same images; export {rt['export_s']:.1f} s)")
    if "onnx" not in rt:
        print(f"  exported: none ({rt.get('export_error')})")
        return
    if peak:
        print(f"  fp32 GEMM peak: {peak['gflops']:.1f} GFLOP/s ({peak['n']}^3 on {peak['threads']} threads; start "
              f"{peak['start_gflops']:.1f}, end {peak['end_gflops']:.1f})")
    print(f"  {'runtime':<10}{'set_image ms':>14}{'1st click ms':>14}{'pre-annot img/s':>17}{'enc GFLOP/s':>13}"
          f"{'of peak':>9}")
    for name in ("torch", "onnx"):
        r = rt[name]
        print(f"  {name:<10}{r['set_image_s'] * 1e3:14.1f}{r['first_click_s'] * 1e3:14.1f}"
              f"{r['preannotate_images_per_s']:17.3f}{r.get('encoder_gflops', float('nan')):13.1f}"
              f"{r.get('encoder_peak_fraction', float('nan')):9.2f}")
    print(f"  exported vs eager: max relative difference {rt['bench_image_max_rel_diff']:.2g} on the bench image "
          f"({rt['export_max_rel_diff']:.2g} at export); click masks identical: {rt['click_masks_identical']}; "
          f"pre-annotation instances eager {rt['torch']['preannotate_instances']}, exported "
          f"{rt['onnx']['preannotate_instances']}")
    print()


def print_ratios(results: Dict[str, Any], ref_name: str) -> None:
    print(f"ratios (reference SAM: {ref_name}; targets from the brief)")
    for key, val in results["ratios"].items():
        tgt = TARGETS.get(key.replace("flops_", ""))
        mark = ""
        if tgt is not None and not key.startswith("flops_"):
            op, bound = tgt
            ok = val <= bound if op == "<=" else val >= bound
            mark = f"  target {op} {bound:.3g}: {'met' if ok else 'MISSED'}"
        elif tgt is not None:
            mark = f"  (latency target {tgt[0]} {tgt[1]:.3g})"
        print(f"  {key:<42}{val:8.3f}{mark}")


def report(results: Dict[str, Any]) -> None:
    ours, ref = results["ours"], results["sam_ref"]
    sams = results["sam"]
    if ref is None:  # --skip-sam
        print()
        print(f"device: {results['device']}  threads: {results['threads']}  image: {results['image_hw']}  OVSAM "
              f"{ours['config']}: set_image {ours['set_image_s'] * 1e3:.1f} ms, click {ours['click_s'] * 1e3:.1f} ms, "
              f"image {ours['flops']['image'] / 1e9:.1f} GFLOP")
        report_runtimes(results)
        print(f"load average (1/5/15 min) at start {results['loadavg_start_end'][0]}, at end "
              f"{results['loadavg_start_end'][1]} on {os.cpu_count()} cores")
        print_ratios(results, "none")
        print()
        return
    sc = ref.get("sam_clip")
    ms = lambda s: f"{s * 1e3:10.1f}"  # noqa: E731
    print()
    print(f"device: {results['device']}  threads: {results['threads']}  image: {results['image_hw']}  "
          f"repeats: clicks {results['repeats']}, images {results['image_repeats']} (medians)")
    print()
    hdr = f"{'pipeline':<34}{'params M':>9}{'set_image ms':>14}{'click ms':>11}{'1st click ms':>14}" \
          f"{'img GFLOP':>11}{'click GFLOP':>12}{'img+click GMAC':>16}"
    print(hdr)
    print("-" * len(hdr))

    def row(name: str, params: float, set_s: float, click_s: float, first_s: float, img_f: float, click_f: float) -> None:
        print(f"{name:<34}{params:9.1f}{ms(set_s):>14}{ms(click_s):>11}{ms(first_s):>14}{gf(img_f):>11}{gf(click_f):>12}"
              f"{(img_f + click_f) / 2e9:16.1f}")

    row(f"OVSAM ({ours['config']})", ours["params_m"], ours["set_image_s"], ours["click_s"], ours["first_click_s"],
        ours["flops"]["image"], ours["flops"]["click"])
    for s in sams:
        row(f"SAM {s['arch']}", s["params_m"], s["set_image_s"], s["click_s"], s["first_click_s"],
            s["flops"]["image"], s["flops"]["click"])
    if sc:
        click_f = ref["flops"]["click"] + sc["flops"]["clip_crop"]
        row(f"SAM {ref['arch']} + {sc['clip_model']} crop", ref["params_m"] + sc["clip_params_m"], ref["set_image_s"],
            sc["click_s"], ref["set_image_s"] + sc["click_s"], ref["flops"]["image"], click_f)
    print()
    fl = ours["flops"]
    print("OVSAM FLOP breakdown (GFLOP): " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in fl.items()))
    st = ours["stages_s"]
    print("OVSAM stage latency (ms, one encoder pass; click medians): "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in st.items()))
    print(f"OVSAM click: first predict {ours['first_predict_s'] * 1e3:.1f} ms, further clicks "
          + ", ".join(f"{t * 1e3:.1f}" for t in ours["click_all_s"]) + " ms")
    if sc:
        print(f"SAM+CLIP click split: SAM predict {sc['click_sam_s'] * 1e3:.1f} ms + crop/resize/CLIP/cosine "
              f"{sc['click_clip_s'] * 1e3:.1f} ms; CLIP crop {sc['flops']['clip_crop'] / 1e9:.1f} GFLOP")
    print(f"load average (1/5/15 min) at start {results['loadavg_start_end'][0]}, at end {results['loadavg_start_end'][1]}"
          f" on {os.cpu_count()} cores: other processes on the machine inflate the timings when it exceeds that")
    print(f"empty masks (random weights): ours {ours['empty_masks']}/{len(ours['click_all_s'])}"
          + (f", SAM+CLIP {sc['empty_masks']}/{len(sc['click_all_s'])} (an empty mask crops the whole image)" if sc else ""))
    print()
    report_runtimes(results)
    print_ratios(results, ref["arch"])
    p = results["paper_gmacs"]
    print(f"paper (GMACs, per image): OVSAM {p['ovsam']:.0f}, SAM-H {p['sam_vit_h']:.0f} "
          f"-> {p['ovsam'] / p['sam_vit_h']:.3f}; ours here: image encoder {fl['image'] / 2e9:.0f} GMACs")
    print()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (CUDA: bf16 autocast + synchronize)")
    ap.add_argument("--repeats", type=int, default=5, help="timed further clicks per model (median)")
    ap.add_argument("--image-repeats", type=int, default=1, help="timed set_image runs per model (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed set_image runs first (default 0 on CPU, 2 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--image-hw", default="480x640", help="original image size HxW (default a COCO-like 480x640)")
    ap.add_argument("--skip-vit-h", action="store_true", help="no ViT-H: SAM ViT-B is the reference and runs SAM+CLIP")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny OVSAM, SAM ViT-B, CLIP RN50 crops")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object to this file")
    ap.add_argument("--ovsam", default=None, help="OVSAM configuration: rn50x16 (default), tiny (--quick), demo (the "
                                                  "shipped model), or any preset")
    ap.add_argument("--skip-sam", action="store_true", help="no SAM / SAM+CLIP: OVSAM eager vs exported only")
    ap.add_argument("--skip-exported", action="store_true", help="no ONNX export (CPU only measures it)")
    ap.add_argument("--preannotate-images", type=int, default=1, help="images per runtime for pre-annotation images/s")
    ap.add_argument("--points-per-side", type=int, default=16, help="automatic-mode grid for pre-annotation (default 16)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # random weights must not pay for denormal arithmetic real ones avoid
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 0
    b = Bench(device)
    height, width = (int(v) for v in args.image_hw.lower().split("x"))
    rng = np.random.default_rng(0)
    image = make_image(rng, height, width)
    points = click_points(rng, height, width, args.repeats + 1)

    cfg_name = args.ovsam or ("tiny" if args.quick else "rn50x16")
    archs = [] if args.skip_sam else ["vit_b"] if (args.quick or args.skip_vit_h) else ["vit_b", "vit_h"]
    clip_name = "RN50" if args.quick else "RN50x16"

    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    log = lambda m: print(f"[{time.perf_counter() - t_start:7.1f}s] {m}", flush=True)  # noqa: E731
    peak = gemm_peak() if device.type == "cpu" else None
    if peak:
        log(f"fp32 GEMM peak {peak['gflops']:.1f} GFLOP/s ({peak['n']}^3, {peak['threads']} threads)")
    log(f"OVSAM {cfg_name} ...")
    ours = bench_ours(b, cfg_name, image, points, args)
    sams = []
    for arch in archs:
        log(f"SAM {arch}{' + ' + clip_name + ' crops' if arch == archs[-1] else ''} ...")
        sams.append(bench_sam(b, arch, image, points, args, clip_name if arch == archs[-1] else None))
    if peak:  # again at the end: the best of both is the least disturbed by other processes
        end = gemm_peak()
        peak = {**max(peak, end, key=lambda p: p["gflops"]), "start_gflops": peak["gflops"], "end_gflops": end["gflops"]}
    log("done")
    ratios = exported_ratios(ours, peak)
    ref = sams[-1] if sams else None
    if ref is not None:
        ratios.update(sam_ratios(ours, ref))
    results: Dict[str, Any] = {
        "benchmark": "latency",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": bool(args.quick),
        "image_hw": [height, width],
        "repeats": args.repeats,
        "image_repeats": args.image_repeats,
        "warmup": args.warmup,
        "vocabulary_size": ours["vocabulary_size"],
        "gemm_peak": peak,
        "ours": ours,
        "sam": sams,
        "sam_ref": ref,
        "ratios": ratios,
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "targets_met": {
            k: (ratios[k] <= v if op == "<=" else ratios[k] >= v) for k, (op, v) in TARGETS.items() if k in ratios
        },
        "paper_gmacs": PAPER_GMACS,
        "wall_s": time.perf_counter() - t_start,
        "loadavg_start_end": [load_start, list(os.getloadavg())],
    }
    report(results)
    out = dict(results)
    out.pop("sam_ref")  # the same dict is in "sam"; keep the JSON line free of duplicates
    out["sam_ref_arch"] = ref["arch"] if ref else None
    line = json.dumps(out, default=float)
    if args.json:
        args.json.write_text(line + "\n")
    print(line, flush=True)
    return results


def exported_ratios(ours: Dict[str, Any], peak: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Eager vs exported encoder (same run, alternating): speed-ups and shares of the GEMM peak."""
    rt = ours.get("runtimes")
    if not rt or "onnx" not in rt:
        return {}
    if peak:
        add_rates(rt, ours["flops"]["image"], peak["gflops"])
    out = {
        "set_image_exported_speedup": ratio(rt["torch"]["set_image_s"], rt["onnx"]["set_image_s"]),
        "first_click_exported_speedup": ratio(rt["torch"]["first_click_s"], rt["onnx"]["first_click_s"]),
        "preannotate_exported_speedup": ratio(rt["torch"]["preannotate_image_s"], rt["onnx"]["preannotate_image_s"]),
    }
    if peak:
        out["encoder_eager_peak_fraction"] = rt["torch"]["encoder_peak_fraction"]
        out["encoder_exported_peak_fraction"] = rt["onnx"]["encoder_peak_fraction"]
    return out


def sam_ratios(ours: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, float]:
    sc = ref["sam_clip"]
    sam_clip_click_flops = ref["flops"]["click"] + sc["flops"]["clip_crop"]
    out = {
        "first_click_ours_over_sam": ratio(ours["first_click_s"], ref["first_click_s"]),
        "set_image_ours_over_sam": ratio(ours["set_image_s"], ref["set_image_s"]),
        "click_ours_over_sam_decoder": ratio(ours["click_s"], ref["click_s"]),
        "click_sam_clip_over_ours": ratio(sc["click_s"], ours["click_s"]),
        "first_click_ours_over_sam_clip": ratio(ours["first_click_s"], ref["set_image_s"] + sc["click_s"]),
        "flops_first_click_ours_over_sam": ratio(ours["flops"]["image"] + ours["flops"]["click"],
                                                 ref["flops"]["image"] + ref["flops"]["click"]),
        "flops_click_ours_over_sam_decoder": ratio(ours["flops"]["click"], ref["flops"]["click"]),
        "flops_click_sam_clip_over_ours": ratio(sam_clip_click_flops, ours["flops"]["click"]),
    }
    rt = ours.get("runtimes") or {}
    if "onnx" in rt:
        out["first_click_exported_over_sam"] = ratio(rt["onnx"]["first_click_s"], ref["first_click_s"])
    return out


if __name__ == "__main__":
    main()
