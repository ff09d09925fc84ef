"""Eager PyTorch vs the exported (ONNX, run by OpenVINO) image encoder, side by side in one process, plus the GEMM peak.

Used by `bench/latency.py`. Measurements of the two runtimes alternate (eager, exported, eager, ...) on the same
images so that load from other processes falls on both alike: their ratio is the figure that counts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from harness import variant  # bench/ is the importing script's folder
from ovsam.automatic import AutomaticConfig, AutomaticMaskGenerator
from ovsam.config import get_config
from ovsam.encoder_export import export_encoder, max_relative_diff
from ovsam.encoder_runtime import OnnxEncoder
from ovsam.model import OVSAM
from ovsam.predictor import OVSAMPredictor
from ovsam.vocabulary import Vocabulary

RUNTIMES = ("torch", "onnx")


def add_encoder_args(ap: argparse.ArgumentParser, repeats: int, repeats_help: str) -> None:
    """The options every single-encoder bench takes (cpu_runtimes.py, encoder_layers.py)."""
    ap.add_argument("--ovsam", default="rn50x16", help="model preset (random weights at its shape)")
    ap.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    ap.add_argument("--threads", type=int, default=None, help="threads (default torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object here")


@dataclass
class RandomEncoderSetup:
    """A random-weight model at a preset's shape, one fixed input, and the conditions the figures were taken in."""

    model: OVSAM
    x: torch.Tensor  # [1, 3, S, S]
    threads: int
    load_start: List[float]

    @property
    def x_numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self.x.numpy())


def random_encoder_setup(preset: str, threads: Optional[int]) -> RandomEncoderSetup:
    if threads:
        torch.set_num_threads(threads)
    load_start = list(os.getloadavg())
    torch.manual_seed(0)
    model = OVSAM(get_config(preset)).eval()
    size = model.cfg.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return RandomEncoderSetup(model, x, torch.get_num_threads(), load_start)


def finish(setup: RandomEncoderSetup, args: argparse.Namespace, benchmark: str, figures: Dict[str, Any]) -> Dict[str, Any]:
    """The bench's JSON object (its figures and the conditions they were taken in), printed as the last line and
    written to ``--json`` if given."""
    result = {
        "benchmark": benchmark, "model": args.ovsam, "image_size": setup.model.cfg.image_size,
        "threads": setup.threads, "machine": platform.machine(), "torch": torch.__version__, **figures,
        "loadavg_start_end": [setup.load_start, list(os.getloadavg())],
    }
    line = json.dumps(result)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return result


def gemm_peak(n: int = 4096, repeats: int = 3) -> Dict[str, float]:
    """The machine's fp32 matmul rate on torch's current threads (best of `repeats`): the roof for conv/GEMM work."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "seconds": best, "gflops": 2 * n**3 / best / 1e9, "threads": torch.get_num_threads()}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_runtimes(
    model: OVSAM, vocab: Vocabulary, image: np.ndarray, point: np.ndarray, image_repeats: int,
    preannotate_images: int, points_per_side: int,
) -> Dict[str, Any]:
    """Export, then set_image / first click / pre-annotation with both runtimes on the same images (medians)."""
    res: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export = export_encoder(model, cache_dir=Path(tmp))
        res["export_s"] = time.perf_counter() - t0
        if export.path is None:
            res["export_error"] = export.error
            return res
        res["export_max_rel_diff"] = export.max_rel_diff
        onnx = OnnxEncoder(model, export.path)
        preds = {rt: OVSAMPredictor(model, vocab, cache_bytes=4 << 30) for rt in RUNTIMES}
        preds["onnx"].image_encoder.use_onnx(onnx, "bench")
        one = np.ones(1, np.int64)
        onnx.encode_image(variant(image, 999))  # first run: OpenVINO's own allocations

        times: Dict[str, Dict[str, List[float]]] = {rt: {"set_image": [], "first_predict": []} for rt in RUNTIMES}
        masks: Dict[str, List[np.ndarray]] = {rt: [] for rt in RUNTIMES}
        feats: Dict[str, Any] = {}
        for r in range(image_repeats):
            for rt in RUNTIMES:
                img = variant(image, 3000 + r)
                t, feats[rt] = _timed(lambda: preds[rt].set_image(img))
                times[rt]["set_image"].append(t)
                t, out = _timed(lambda: preds[rt].predict(point, one))
                times[rt]["first_predict"].append(t)
                masks[rt].append(out.mask)
        e, o = feats["torch"], feats["onnx"]
        eager_list = [e.embedding, *e.pyramid, e.c5, *(e.clip_kv or ()), *(e.high_res or ())]
        onnx_list = [o.embedding, *o.pyramid, o.c5, *(o.clip_kv or ()), *(o.high_res or ())]
        res["bench_image_max_rel_diff"] = max_relative_diff(eager_list, [t.numpy() for t in onnx_list])
        res["click_masks_identical"] = all(np.array_equal(a, b) for a, b in zip(masks["torch"], masks["onnx"]))

        config = AutomaticConfig(points_per_side=points_per_side)
        pre: Dict[str, List[float]] = {rt: [] for rt in RUNTIMES}
        instances: Dict[str, List[int]] = {rt: [] for rt in RUNTIMES}
        for i in range(preannotate_images):
            for rt in RUNTIMES:
                generator = AutomaticMaskGenerator(preds[rt], config)
                img = variant(image, 4000 + i)
                t, found = _timed(lambda: generator.generate(preds[rt].set_image(img)))
                pre[rt].append(t)
                instances[rt].append(len(found))
        for rt in RUNTIMES:
            set_s = float(np.median(times[rt]["set_image"]))
            first = float(np.median(times[rt]["first_predict"]))
            per_image = float(np.median(pre[rt])) if pre[rt] else float("nan")
            res[rt] = {
                "set_image_s": set_s,
                "set_image_all_s": times[rt]["set_image"],
                "first_click_s": set_s + first,
                "preannotate_image_s": per_image,
                "preannotate_images_per_s": 1.0 / per_image if pre[rt] else float("nan"),
                "preannotate_all_s": pre[rt],
                "preannotate_instances": instances[rt],
            }
        del preds, onnx
    return res


def add_rates(res: Dict[str, Any], image_flops: float, peak_gflops: float) -> None:
    """GFLOP/s of each runtime's set_image (hash, resize and copies included) and its share of the GEMM peak."""
    for rt in RUNTIMES:
        if rt in res:
            rate = image_flops / res[rt]["set_image_s"] / 1e9
            res[rt]["encoder_gflops"] = rate
            res[rt]["encoder_peak_fraction"] = rate / peak_gflops
