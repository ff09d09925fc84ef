#!/usr/bin/env python
"""Which CPU runtime runs the exported image encoder: eager PyTorch, ONNX Runtime and OpenVINO on one export.

Issue 23 asked to compare ONNX Runtime and OpenVINO and keep one; this is that comparison, kept so it can be
re-run when either library moves. One model (random weights at the chosen preset's shape), one export
(`ovsam.encoder_export`, verified against eager), one input; the runtimes are timed in alternation (eager, ONNX
Runtime, OpenVINO, eager, ...) so load from other processes falls on all alike, and the minimum of `--repeats`
runs counts. Each runtime's largest relative difference to eager is printed next to its time.

OpenVINO runs in fp32 (what the backend serves); `--bf16` adds OpenVINO with its bf16 inference precision, which
uses AMX / AVX512-BF16 where the CPU has them: a figure for what a lower-precision option would buy, not served.
ONNX Runtime is not a dependency of the project: `pip install onnxruntime` to include it (else it is skipped).

Run:   .venv/bin/python bench/cpu_runtimes.py [--ovsam rn50x16|demo|tiny] [--repeats 2] [--bf16]
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovsam.config import get_config  # noqa: E402
from ovsam.encoder_export import export_encoder, max_relative_diff  # noqa: E402
from ovsam.encoder_runtime import CompiledEncoder  # noqa: E402
from ovsam.model import OVSAM  # noqa: E402

Runner = Callable[[], List[np.ndarray]]


def onnxruntime_runner(path: Path, x: np.ndarray, threads: int) -> Optional[Runner]:
    """ONNX Runtime's CPU provider with all graph optimisations, or None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"image": x})


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ovsam", default="rn50x16", help="model preset (random weights at its shape)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per runtime, after one untimed warm run")
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime (default torch's)")
    ap.add_argument("--bf16", action="store_true", help="also OpenVINO with bf16 inference precision")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = list(os.getloadavg())
    torch.manual_seed(0)
    model = OVSAM(get_config(args.ovsam)).eval()
    size = model.cfg.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    xn = np.ascontiguousarray(x.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export = export_encoder(model, cache_dir=Path(tmp))
        export_s = time.perf_counter() - t0
        if export.path is None:
            raise SystemExit(f"export failed: {export.error}")
        with torch.no_grad():
            reference = list(model.encode_outputs(x))

        def eager() -> List[np.ndarray]:
            with torch.no_grad():
                return [o.numpy() for o in model.encode_outputs(x)]

        openvino = CompiledEncoder(export.path, threads)
        runners: Dict[str, Runner] = {"eager": eager, "openvino": lambda: openvino.run(xn)}
        ort_runner = onnxruntime_runner(export.path, xn, threads)
        if ort_runner is not None:
            runners["onnxruntime"] = ort_runner
        else:
            print("onnxruntime is not installed: skipped (pip install onnxruntime to include it)")
        if args.bf16:
            bf16 = CompiledEncoder(export.path, threads, precision="bf16")
            runners["openvino_bf16"] = lambda: bf16.run(xn)
        rel = {name: max_relative_diff(reference, run()) for name, run in runners.items()}  # also the warm run
        times: Dict[str, List[float]] = {name: [] for name in runners}
        for r in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                print(f"repeat {r}: {name:14s} {times[name][-1]:8.3f} s", flush=True)
    best = {name: min(v) for name, v in times.items()}
    print(f"\n{args.ovsam}, {size}x{size}, {threads} threads; export {export_s:.1f} s")
    print(f"{'runtime':14s} {'best s':>8s} {'x eager':>8s} {'max rel diff':>13s}")
    for name in runners:
        print(f"{name:14s} {best[name]:8.3f} {best['eager'] / best[name]:8.2f} {rel[name]:13.2e}")
    result = {
        "benchmark": "cpu_runtimes", "model": args.ovsam, "image_size": size, "threads": threads,
        "machine": platform.machine(), "torch": torch.__version__, "export_s": export_s,
        "seconds": times, "best_s": best, "speedup_over_eager": {n: best["eager"] / best[n] for n in best},
        "max_rel_diff": rel, "loadavg_start_end": [load_start, list(os.getloadavg())],
    }
    line = json.dumps(result)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
