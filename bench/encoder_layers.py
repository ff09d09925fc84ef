#!/usr/bin/env python
"""Where the exported encoder's time goes, node by node, and how close to the GEMM peak the model's shape lets it get.

Issue 23 asks the exported encoder to reach 90 % of the machine's measured fp32 GEMM peak. A whole network is more
than GEMMs: normalisations, activations not fused into a convolution, pooling, resizes, layout reorders and
attention's softmax do no multiply-adds (no FLOPs in the count `bench/latency.py` uses) yet take time. This script
runs the verified ONNX export under OpenVINO with per-node timing (`CompiledEncoder(profile=True)`) and reports:

- each executed node's FLOPs (the multiply-adds of the ONNX convolutions and matmuls it computes after OpenVINO's
  fusions, counted from the ONNX graph's static shapes) and time, as the median over `--repeats` inferences;
- the GEMM nodes' own rate against the measured GEMM peak (how good the kernels are), and the time of the nodes
  without FLOPs (what the model's shape adds);
- the **bound**: the share of peak the whole encoder would reach if every GEMM node ran at the peak and every other
  node took the time it takes now. A share of peak above this bound needs fewer or cheaper non-GEMM nodes, that is
  another model or another runtime, not faster kernels.

Run:   .venv/bin/python bench/encoder_layers.py [--ovsam rn50x16|demo|tiny] [--repeats 3] [--top 15] [--json PATH]
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_runtimes import add_encoder_args, finish, gemm_peak, random_encoder_setup  # noqa: E402  (bench/encoder_runtimes.py)
from ovsam.encoder_export import export_encoder  # noqa: E402
from ovsam.encoder_runtime import CompiledEncoder, static_shape  # noqa: E402


def gemm_flops(kind: str, inputs: List[Optional[List[int]]], outputs: List[Optional[List[int]]]) -> int:
    """FLOPs (2 per multiply-add) of one convolution or matmul from its static shapes; 0 for anything else."""
    if len(inputs) < 2 or not outputs or inputs[0] is None or inputs[1] is None or outputs[0] is None:
        return 0
    x, w, out = inputs[0], inputs[1], outputs[0]
    n_x, n_w, n_out = int(np.prod(x)), int(np.prod(w)), int(np.prod(out))
    if kind in ("Deconvolution", "ConvolutionBackpropData"):  # every input element meets |w| / Ci weights
        return 2 * n_x * n_w // x[1]
    if kind in ("Convolution", "GroupConvolution"):  # every output element meets |w| / Co weights
        return 2 * n_out * n_w // out[1]
    if kind == "MatMul":  # [.., M, K] x [.., K, N], either transposed: K = |A| * N / |out|
        return 2 * n_out * (n_x * out[-1] // n_out)
    if kind == "FullyConnected":  # [.., K] x weights: K is the input's last dimension
        return 2 * n_out * x[-1]
    return 0


def onnx_op_flops(onnx_path: Path) -> Dict[str, int]:
    """FLOPs of every convolution and matmul of the ONNX graph, by operation name: for the nodes OpenVINO fuses
    them into (its Subgraphs, e.g. attention), whose own shapes do not tell."""
    import openvino as ov

    flops: Dict[str, int] = {}
    for op in ov.Core().read_model(str(onnx_path)).get_ordered_ops():
        f = gemm_flops(op.get_type_name(), [static_shape(i) for i in op.inputs()],
                       [static_shape(o) for o in op.outputs()])
        if f:
            flops[op.get_friendly_name()] = f
    return flops


def node_flops(node: dict, onnx_flops: Dict[str, int]) -> int:
    """A runtime node's FLOPs: from its own shapes when it is a convolution or matmul, else those of the ONNX
    operations fused into it."""
    own = gemm_flops(node["type"], node["inputs"], node["outputs"])
    return own or sum(onnx_flops.get(n, 0) for n in node["original"])


def profile(encoder: CompiledEncoder, x: np.ndarray, repeats: int) -> tuple[Dict[str, float], List[float]]:
    """Median time (µs) of each executed node over `repeats` inferences, and each inference's wall time (s)."""
    per_node: Dict[str, List[float]] = defaultdict(list)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.run(x)
        walls.append(time.perf_counter() - t0)
        for name, us in encoder.node_times_us().items():
            per_node[name].append(us)
    return {name: float(np.median(v)) for name, v in per_node.items()}, walls


def summarise(nodes: List[dict], times_us: Dict[str, float], flops: Dict[str, int], peak_gflops: float,
              wall_s: float, top: int) -> Dict[str, Any]:
    rows = []
    for node in nodes:
        if node["name"] not in times_us:
            continue
        rows.append({**node, "us": times_us[node["name"]], "flops": node_flops(node, flops)})
    gemm = [r for r in rows if r["flops"] > 0]
    other = [r for r in rows if r["flops"] == 0]
    gemm_s = sum(r["us"] for r in gemm) / 1e6
    other_s = sum(r["us"] for r in other) / 1e6
    total_flops = sum(r["flops"] for r in gemm)
    counted_flops = sum(flops.values())
    by_type: Dict[str, Dict[str, float]] = defaultdict(lambda: {"nodes": 0, "seconds": 0.0})
    for r in other:
        by_type[r["type"]]["nodes"] += 1
        by_type[r["type"]]["seconds"] += r["us"] / 1e6
    gemm_by_type: Dict[str, Dict[str, float]] = defaultdict(lambda: {"nodes": 0, "seconds": 0.0, "gflop": 0.0})
    for r in gemm:
        key = f"{r['type']} ({r['kernel']})"
        gemm_by_type[key]["nodes"] += 1
        gemm_by_type[key]["seconds"] += r["us"] / 1e6
        gemm_by_type[key]["gflop"] += r["flops"] / 1e9
    for v in gemm_by_type.values():
        v["peak_fraction"] = v["gflop"] / v["seconds"] / peak_gflops if v["seconds"] else float("nan")
    nodes_s = gemm_s + other_s
    ideal_gemm_s = total_flops / (peak_gflops * 1e9)
    def described(r: dict) -> dict:
        return {"name": r["name"], "type": r["type"], "kernel": r["kernel"], "ms": r["us"] / 1e3,
                "gflop": r["flops"] / 1e9, "original": r["original"],
                "peak_fraction": (r["flops"] / (r["us"] / 1e6) / 1e9 / peak_gflops) if r["flops"] and r["us"] else None}

    slowest = sorted(rows, key=lambda r: -r["us"])[:top]
    return {
        "wall_s": wall_s,
        "nodes_s": nodes_s,
        "outside_nodes_s": wall_s - nodes_s,
        "gflop": total_flops / 1e9,
        "gflop_in_onnx": counted_flops / 1e9,
        "gemm_nodes": len(gemm), "gemm_s": gemm_s,
        "gemm_peak_fraction": total_flops / gemm_s / 1e9 / peak_gflops if gemm_s else float("nan"),
        "other_nodes": len(other), "other_s": other_s, "other_share_of_nodes": other_s / nodes_s if nodes_s else 0.0,
        "whole_peak_fraction": total_flops / wall_s / 1e9 / peak_gflops,
        # every GEMM node at the peak, every other node as now (the nodes' sum; the wall adds scheduling on top)
        "bound_peak_fraction": ideal_gemm_s / (ideal_gemm_s + other_s) if total_flops else 0.0,
        "bound_with_outside_peak_fraction": ideal_gemm_s / (ideal_gemm_s + other_s + max(wall_s - nodes_s, 0.0)),
        "other_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["seconds"])),
        "gemm_by_type": dict(sorted(gemm_by_type.items(), key=lambda kv: -kv[1]["seconds"])),
        "slowest": [described(r) for r in slowest],
        "nodes": [described(r) for r in rows],  # every executed node, in execution order
    }


def print_report(s: Dict[str, Any], peak: Dict[str, Any], model: str, threads: int) -> None:
    print(f"\n{model}, {threads} threads; fp32 GEMM peak {peak['gflops']:.1f} GFLOP/s (torch {peak['n']}^3 matmul)")
    print(f"inference {s['wall_s']:.3f} s (median), nodes {s['nodes_s']:.3f} s, outside the nodes "
          f"{s['outside_nodes_s']:.3f} s; {s['gflop']:.1f} GFLOP in GEMM nodes (ONNX graph: {s['gflop_in_onnx']:.1f})")
    print(f"GEMM nodes: {s['gemm_nodes']}, {s['gemm_s']:.3f} s, {s['gemm_peak_fraction']:.2f} of peak")
    print(f"other nodes: {s['other_nodes']}, {s['other_s']:.3f} s = {s['other_share_of_nodes']:.1%} of node time")
    if s["outside_nodes_s"] < 0:
        print(f"note: the nodes' times add up to {-s['outside_nodes_s']:.3f} s more than the inference's wall time "
              f"({s['nodes_s'] / s['wall_s'] - 1:.0%}): OpenVINO's per-node times overlap or include waiting, so "
              "shares of node time are approximate to that much")
    print(f"whole encoder: {s['whole_peak_fraction']:.2f} of peak; bound with every GEMM node at the peak: "
          f"{s['bound_peak_fraction']:.2f} ({s['bound_with_outside_peak_fraction']:.2f} counting the time outside nodes)")
    print(f"\n{'GEMM nodes by kind':48s} {'nodes':>5s} {'s':>8s} {'GFLOP':>8s} {'of peak':>8s}")
    for k, v in s["gemm_by_type"].items():
        print(f"{k[:48]:48s} {v['nodes']:5d} {v['seconds']:8.3f} {v['gflop']:8.1f} {v['peak_fraction']:8.2f}")
    print(f"\n{'other nodes by type':48s} {'nodes':>5s} {'s':>8s}")
    for k, v in s["other_by_type"].items():
        print(f"{k[:48]:48s} {v['nodes']:5d} {v['seconds']:8.3f}")
    print(f"\n{'slowest nodes':60s} {'type':>14s} {'ms':>8s} {'GFLOP':>7s} {'of peak':>8s}")
    for r in s["slowest"]:
        frac = f"{r['peak_fraction']:8.2f}" if r["peak_fraction"] is not None else f"{'-':>8s}"
        print(f"{r['name'][:60]:60s} {r['type'][:14]:>14s} {r['ms']:8.1f} {r['gflop']:7.2f} {frac}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_encoder_args(ap, 3, "profiled inferences after one warm run (medians)")
    ap.add_argument("--top", type=int, default=15, help="slowest nodes listed")
    args = ap.parse_args(argv)
    setup = random_encoder_setup(args.ovsam, args.threads)
    model, x, threads = setup.model, setup.x_numpy, setup.threads
    with tempfile.TemporaryDirectory() as tmp:
        export = export_encoder(model, cache_dir=Path(tmp))
        if export.path is None:
            raise SystemExit(f"export failed: {export.error}")
        flops = onnx_op_flops(export.path)
        encoder = CompiledEncoder(export.path, threads, profile=True)
        encoder.run(x)  # warm: OpenVINO's first-inference allocations
        peak_before = gemm_peak()
        times_us, walls = profile(encoder, x, args.repeats)
        peak_after = gemm_peak()
        nodes = encoder.runtime_nodes()
    # the better of the two peak readings: this machine's speed drifts, and the peak is a roof
    peak = max(peak_before, peak_after, key=lambda p: p["gflops"])
    summary = summarise(nodes, times_us, flops, peak["gflops"], float(np.median(walls)), args.top)
    print_report(summary, peak, args.ovsam, threads)
    return finish(setup, args, "encoder_layers", {
        "repeats": args.repeats, "walls_s": walls, "gemm_peak": peak,
        "gemm_peak_readings_gflops": [peak_before["gflops"], peak_after["gflops"]], **summary,
    })


if __name__ == "__main__":
    main()
