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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_runtimes import add_encoder_args, finish, random_encoder_setup  # noqa: E402  (bench/encoder_runtimes.py)
from ovsam.encoder_export import export_encoder, max_relative_diff  # noqa: E402
from ovsam.encoder_runtime import CompiledEncoder  # noqa: E402

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
    add_encoder_args(ap, 2, "timed runs per runtime, after one untimed warm run")
    ap.add_argument("--bf16", action="store_true", help="also OpenVINO with bf16 inference precision")
    args = ap.parse_args(argv)
    setup = random_encoder_setup(args.ovsam, args.threads)
    model, x, xn, threads = setup.model, setup.x, setup.x_numpy, setup.threads
    size = model.cfg.image_size
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
    return finish(setup, args, "cpu_runtimes", {
        "export_s": export_s, "seconds": times, "best_s": best,
        "speedup_over_eager": {n: best["eager"] / best[n] for n in best}, "max_rel_diff": rel,
    })


if __name__ == "__main__":
    main()
