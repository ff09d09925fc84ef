"""bench/encoder_layers.py counts the FLOPs it divides by the nodes' times: check the count against PyTorch's.

The per-node share of the GEMM peak is only as right as each node's FLOPs, counted from OpenVINO's shapes (its own
node, or the ONNX operations fused into it). On a tiny model, every FLOP PyTorch's counter sees in the encoder must
land on exactly one executed node, and the nodes' sum must equal the ONNX graph's and PyTorch's totals.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import encoder_layers  # noqa: E402  (bench/encoder_layers.py)

pytest.importorskip("openvino")


def test_gemm_flops_of_each_kind() -> None:
    # 3x3 convolution 8 -> 16 channels on 10x10: 2 * 16*10*10 outputs * 8*3*3 weights each
    assert encoder_layers.gemm_flops("Convolution", [[1, 8, 10, 10], [16, 8, 3, 3]], [[1, 16, 10, 10]]) == 2 * 1600 * 72
    # depthwise (grouped) 3x3 on 8 channels: each output meets 9 weights
    assert encoder_layers.gemm_flops("GroupConvolution", [[1, 8, 10, 10], [8, 1, 1, 3, 3]], [[1, 8, 10, 10]]) == 2 * 800 * 9
    # 2x2 stride-2 transposed convolution 8 -> 4: every input element meets 4*2*2 weights
    assert encoder_layers.gemm_flops("Deconvolution", [[1, 8, 5, 5], [8, 4, 2, 2]], [[1, 4, 10, 10]]) == 2 * 200 * 16
    # [2, 7, 5] x [2, 5, 3], either operand transposed in the graph
    assert encoder_layers.gemm_flops("MatMul", [[2, 7, 5], [2, 3, 5]], [[2, 7, 3]]) == 2 * 42 * 5
    assert encoder_layers.gemm_flops("FullyConnected", [[4096, 640], [2560, 640]], [[4096, 2560]]) == 2 * 4096 * 2560 * 640
    assert encoder_layers.gemm_flops("Eltwise", [[1, 8], [1, 8]], [[1, 8]]) == 0


def test_every_flop_of_the_encoder_lands_on_one_executed_node(tmp_path: Path) -> None:
    from ovsam.config import get_config
    from ovsam.encoder_export import export_encoder
    from ovsam.encoder_runtime import CompiledEncoder
    from ovsam.model import OVSAM

    torch.manual_seed(0)
    model = OVSAM(get_config("tiny")).eval()
    export = export_encoder(model, cache_dir=tmp_path)
    assert export.path is not None, export.error
    size = model.cfg.image_size
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_outputs(x)
    onnx_flops = encoder_layers.onnx_op_flops(export.path)
    encoder = CompiledEncoder(export.path, 1, profile=True)
    times, walls = encoder_layers.profile(encoder, x.numpy(), repeats=1)
    nodes = encoder.runtime_nodes()
    summary = encoder_layers.summarise(nodes, times, onnx_flops, peak_gflops=100.0, wall_s=walls[0], top=5)
    executed = sum(encoder_layers.node_flops(n, onnx_flops) for n in nodes if n["name"] in times)
    assert summary["gemm_nodes"] > 0 and summary["other_nodes"] > 0 and summary["gemm_s"] > 0
    assert executed == pytest.approx(sum(onnx_flops.values()), rel=0.01)
    assert executed == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert 0 < summary["bound_peak_fraction"] <= 1
