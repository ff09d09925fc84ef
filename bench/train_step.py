"""Throughput and peak memory of one CLIP2SAM fine-tuning step at the official configuration.

One step = frozen CLIP trunk + SAM2CLIP neck forward (no grad), FPN + mask decoder + RoI classifier
forward and backward, the reference's losses (CE, point-sampled BCE + Dice), gradient clipping and an AdamW
update: exactly `training.train_step`'s step, on synthetic LSJ-augmented images with 40 prompts each
(21 boxes, 19 points). Weights are random at the official shapes (`get_config('rn50x16')`), so only
speed is measured. On CUDA the forward runs under bf16 autocast, as in training.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmul / conv / attention, 2 per
multiply-add): the frozen image side on a weightless `meta` copy, the trained part (forward + backward)
in a real, untimed pass. Achieved TFLOP/s is compared with the GPU's dense bf16 peak from a small table.

    .venv/bin/python bench/train_step.py                       # CPU, batch 1, 2 timed steps
    .venv/bin/python bench/train_step.py --device cuda --batch-size 2 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovsam import OVSAM, get_config  # noqa: E402
from training import losses as L  # noqa: E402
from training.data.types import Instance, Sample  # noqa: E402
from training.dataset import CLIP2SAMDataset, ExampleConfig, collate_examples  # noqa: E402
from training.train_step import CLIP2SAMTrainStep, compute_losses, to_device  # noqa: E402
from training.optim import build_adamw, param_groups  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 (no bf16)
    ("T4", 65.0),  # fp16
)


def bf16_peak(name: str) -> Optional[float]:
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


class MemoryImages:
    """An image source over arrays held in memory."""

    def __init__(self, images: Dict[str, np.ndarray]) -> None:
        self.images = images

    def load(self, ref: str) -> np.ndarray:
        return self.images[ref]


def synthetic_samples(n: int, size: int, objects: int, seed: int = 0):
    """Noise images of the official input size with `objects` rectangles/ellipses each."""
    rng = np.random.default_rng(seed)
    samples, images = [], {}
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        insts = []
        for _ in range(objects):
            w, h = rng.integers(size // 16, size // 3, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            m = np.zeros((size, size), bool)
            m[y : y + h, x : x + w] = True
            insts.append(Instance(f"c{rng.integers(10)}", m, np.array([x, y, x + w, y + h], np.float32), "brush"))
        images[f"img{i}"] = img
        samples.append(Sample(i, f"img{i}", insts, size, size))
    return samples, MemoryImages(images)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="rn50x16", help="model preset (official: rn50x16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--classes", type=int, default=80, help="vocabulary size K")
    p.add_argument("--objects", type=int, default=8, help="GT instances per image (prompts repeat them up to 40)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    bs = args.batch_size or (2 if cuda else 1)
    steps = args.steps or (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = cuda and not args.no_amp
    torch.manual_seed(0)

    cfg = get_config(args.config)
    model = OVSAM(cfg).to(dev).train()
    text = torch.nn.functional.normalize(torch.randn(args.classes, 1, cfg.clip_embed_dim), dim=-1)
    step_module = CLIP2SAMTrainStep(model, text).to(dev)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = build_adamw(param_groups(model, 0.05), 1e-4)
    loss_cfg = L.LossConfig(num_points=L.default_num_points(cfg.image_size))
    samples, images = synthetic_samples(bs * (warmup + steps + 1), cfg.image_size, args.objects)
    labels = {f"c{i}": i for i in range(10)}
    dataset = CLIP2SAMDataset(samples, labels, images, ExampleConfig(cfg.image_size, augment=True), cfg)
    batches = [collate_examples([dataset[i * bs + j] for j in range(bs)]) for i in range(warmup + steps + 1)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def train_step(batch: Dict[str, Any]) -> float:
        batch = to_device(batch, dev)
        with autocast():
            out = step_module(batch)
        losses = compute_losses(out, batch, loss_cfg, cfg.image_size, 1)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(losses["loss"].detach())

    print(f"config {cfg.name} ({cfg.image_size} px), device {dev}, batch {bs}, 40 prompts/image, "
          f"{loss_cfg.num_points} loss points/mask, amp={'bf16' if amp else 'off'}", flush=True)
    for i in range(warmup):
        t = time.perf_counter()
        train_step(batches[i])
        sync()
        print(f"warm-up step {i + 1}: {time.perf_counter() - t:.2f} s", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps):
        sync()
        t = time.perf_counter()
        loss = train_step(batches[warmup + i])
        sync()
        times.append(time.perf_counter() - t)
        print(f"step {i + 1}: {times[-1]:.3f} s  loss {loss:.3f}", flush=True)
    peak_mem = peak_memory_bytes(dev)

    # FLOPs: the frozen image side on a meta copy; the trained part (forward + backward) for real.
    with torch.no_grad(), torch.device("meta"):
        meta = OVSAM(cfg).eval()
        x = torch.empty(bs, 3, cfg.image_size, cfg.image_size)
        feats_meta = meta.trunk(x)
        image_flops = count_flops(lambda: meta.neck(meta.trunk(x)))
    del meta, feats_meta
    batch = to_device(batches[-1], dev)
    with torch.no_grad(), autocast():
        feats = model.trunk(batch["images"])
        emb = model.neck(feats)

    def head_step() -> None:
        with autocast():
            out = step_module(batch, feats, emb)
        compute_losses(out, batch, loss_cfg, cfg.image_size, 1)["loss"].backward()

    head_flops = count_flops(head_step)
    optimizer.zero_grad(set_to_none=True)
    step_flops = image_flops + head_flops
    median = float(np.median(times))
    images_per_s = bs / median
    tflops = step_flops / median / 1e12
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(dev) if cuda else cpu
    peak = bf16_peak(name) if amp else None
    print(f"device: {name}")
    print(f"step time (median of {steps}): {median:.3f} s  ->  {images_per_s:.2f} images/s")
    print(f"FLOPs per step: {step_flops / 1e12:.2f} TFLOP (image side {image_flops / 1e12:.2f}, "
          f"trained part fwd+bwd {head_flops / 1e12:.2f})")
    share = f" = {100 * tflops / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 dense peak" if peak else ""
    print(f"achieved: {tflops:.2f} TFLOP/s{share}")
    print(f"peak memory: {peak_mem / 2**30:.2f} GiB ({'CUDA allocated' if cuda else 'process RSS'})")
    result = {
        "bench": "train_step", "config": cfg.name, "image_size": cfg.image_size, "device": name, "batch_size": bs,
        "prompts_per_image": 40, "loss_points": loss_cfg.num_points, "amp": "bf16" if amp else None, "steps": steps,
        "step_times_s": [round(t, 4) for t in times], "step_time_s": round(median, 4),
        "images_per_s": round(images_per_s, 4), "flops_per_step": step_flops, "image_side_flops": image_flops,
        "trained_part_flops": head_flops, "achieved_tflops": round(tflops, 3), "bf16_peak_tflops": peak,
        "mfu": round(tflops / peak, 4) if peak else None, "peak_memory_bytes": peak_mem,
        "peak_memory_kind": "cuda_max_allocated" if cuda else "process_max_rss", "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
