"""Which runtime computes a predictor's image features: eager PyTorch, or a verified ONNX export run by OpenVINO.

`ImageEncoder` is shared by a predictor and its per-vocabulary copies, so switching it to the export once one is
ready (in the background, at start-up) switches every copy. `ENCODER_RUNTIME` = auto | torch | onnx: auto uses the
exported encoder on CPU when it verifies equal, PyTorch on GPU.

Why OpenVINO: the issue asked to compare ONNX Runtime and OpenVINO on the same export and keep one
(bench/cpu_runtimes.py; official RN50x16 shape, 2 cores, fp32, bench/README.md): both run it ~1.6-1.8x faster than
eager, within this machine's noise of each other (OpenVINO 11.2-12.4 s in 7 runs, ONNX Runtime 11.0-14.6 s in 5);
OpenVINO was the steadier and also compiles the same file to bf16 on AMX CPUs (~4x; not served: not equal to eager).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .model import OVSAM, ImageFeatures

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")


def parse_runtime(value: Optional[str]) -> str:
    """`ENCODER_RUNTIME`'s value, checked (empty = auto)."""
    v = (value or "auto").strip().lower()
    if v not in RUNTIMES:
        raise ValueError(f"ENCODER_RUNTIME={value!r} is not one of {', '.join(RUNTIMES)}")
    return v


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def wants_onnx(runtime: str, device: torch.device | str) -> bool:
    """auto: the export on CPU (if OpenVINO is installed); torch: never; onnx: on CPU (GPU keeps PyTorch)."""
    runtime = parse_runtime(runtime)
    if runtime == "torch" or torch.device(device).type != "cpu":
        return False
    return runtime == "onnx" or openvino_available()


class CompiledEncoder:
    """An ONNX encoder graph compiled by OpenVINO for this CPU, using as many threads as torch does.

    OpenVINO would pick bf16 by itself on CPUs with AMX/AVX512-BF16; the precision is pinned (f32 unless told:
    what is served is held to eager's outputs within 1e-4, so only benches ask for bf16). One inference at a time
    (an infer request is not reentrant); outputs are copied out, since the request reuses its buffers.
    """

    def __init__(self, onnx_model: bytes | str | Path, threads: Optional[int] = None, precision: str = "f32",
                 profile: bool = False) -> None:
        import openvino as ov

        core = ov.Core()
        source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            # The same share of the machine as torch, whose decoder runs right after on the same cores.
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            # Denormals cost orders of magnitude more cycles and change nothing at the 1e-4 the export is held to.
            "CPU_DENORMALS_OPTIMIZATION": True,
            # No pinning: torch's threads (decoder, head) share these cores right after, in the same process.
            "ENABLE_CPU_PINNING": False,
            # Per-node execution times (`node_times_us`), for bench/encoder_layers.py; off when serving.
            "PERF_COUNT": profile,
        }
        self.compiled = core.compile_model(core.read_model(source), "CPU", config)
        self.output_names = [_graph_output_name(o.get_names()) for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, image: np.ndarray) -> List[np.ndarray]:
        """The graph's outputs, in order, for a normalised [1, 3, S, S] float32 array."""
        with self._lock:
            self._request.infer({0: image})
            return [np.array(self._request.get_output_tensor(i).data, copy=True)
                    for i in range(len(self.output_names))]

    def runtime_nodes(self) -> List[Dict[str, Any]]:
        """The executed graph after OpenVINO's fusions, in execution order: each node's name, layer type, kernel
        and the original (ONNX) operations it computes; for bench/encoder_layers.py."""
        nodes = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = {k: v.astype(str) for k, v in op.get_rt_info().items()}
            nodes.append({"name": op.get_friendly_name(), "type": info.get("layerType", op.get_type_name()),
                          "kernel": info.get("primitiveType", ""),
                          "original": [n for n in info.get("originalLayersNames", "").split(",") if n],
                          "inputs": [static_shape(i) for i in op.inputs()],
                          "outputs": [static_shape(o) for o in op.outputs()]})
        return nodes

    def node_times_us(self) -> Dict[str, float]:
        """Each executed node's time in the last inference, in µs (compiled with `profile`, else empty)."""
        with self._lock:
            return {p.node_name: p.real_time.total_seconds() * 1e6 for p in self._request.get_profiling_info()
                    if p.status.name == "EXECUTED"}


def static_shape(port: object) -> Optional[List[int]]:
    """An OpenVINO port's shape as a list of ints, or None when it is dynamic."""
    shape = port.get_partial_shape()  # type: ignore[attr-defined]
    return [int(d) for d in shape.to_shape()] if shape.is_static else None


def _graph_output_name(names: set) -> str:
    """The export's own name of an output (OpenVINO also knows it by the name of the node that computes it)."""
    public = sorted(n for n in names if "/" not in n)
    return public[0] if public else sorted(names)[0]


class OnnxEncoder:
    """A verified ONNX export of one model's encoder, run by OpenVINO on CPU."""

    def __init__(self, model: OVSAM, path: Path, threads: Optional[int] = None) -> None:
        self.model = model
        self.path = Path(path)
        self.session = CompiledEncoder(self.path, threads)
        expected = model.encode_output_names()
        got = self.session.output_names
        if got != expected:
            raise ValueError(f"{self.path} has outputs {got}, the model needs {expected}")

    def outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The same list as `OVSAM.encode_outputs` for a normalised [1, 3, S, S] input."""
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return [torch.from_numpy(o) for o in self.session.run(arr)]

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        x, frame = self.model.preprocess(image)
        return self.model.features_from_outputs(self.outputs(x), frame)


class ImageEncoder:
    """The predictor's image side: eager `OVSAM.encode_image`, or an `OnnxEncoder` once one is installed."""

    def __init__(self, model: OVSAM) -> None:
        self.model = model
        self.onnx: Optional[OnnxEncoder] = None
        self.note = "torch"  # what serves and why, for logs and /health

    @property
    def runtime(self) -> str:
        return "onnx" if self.onnx is not None else "torch"

    def use_onnx(self, encoder: Optional[OnnxEncoder], note: str) -> None:
        self.onnx, self.note = encoder, note

    def _exported(self) -> Optional[OnnxEncoder]:
        """The export when it serves (CPU only); one read, so a concurrent switch never mixes runtimes in a call."""
        onnx = self.onnx
        return onnx if onnx is not None and self.model.device.type == "cpu" else None

    @property
    def batches(self) -> bool:
        """Whether `encode_images` encodes a batch in one call (eager); the export takes one image at a time."""
        return self._exported() is None

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        onnx = self._exported()
        return onnx.encode_image(image) if onnx is not None else self.model.encode_image(image)

    def encode_images(self, images: Sequence[np.ndarray]) -> List[ImageFeatures]:
        """One batch through eager PyTorch; the export (batch 1, on the CPU, where a batch does not pay) one by one."""
        onnx = self._exported()
        return [onnx.encode_image(im) for im in images] if onnx is not None else self.model.encode_images(images)


def load_onnx_encoder(model: OVSAM, artifact: Optional[Path] = None, export: bool = True,
                      cache_dir: Optional[Path] = None) -> tuple[Optional[OnnxEncoder], str]:
    """The model's verified ONNX encoder (exported now if `export` and not cached), or None and why not."""
    from .encoder_export import export_encoder, export_path

    if not export:
        path = export_path(model, artifact, cache_dir)
        if not path.is_file():
            return None, f"no ONNX export at {path} (`python -m ovsam export-onnx` makes one)"
        result_path, note = path, f"cached export {path}"
    else:
        result = export_encoder(model, artifact, cache_dir)
        if result.path is None:
            return None, f"ONNX export failed: {result.error}"
        result_path = result.path
        note = (f"cached export {result.path}" if result.cached else
                f"exported to {result.path} in {result.seconds:.1f} s, max relative difference to eager "
                f"{result.max_rel_diff:.2g}")
    try:
        return OnnxEncoder(model, result_path), note
    except Exception as exc:  # a damaged or foreign file: PyTorch serves
        return None, f"cannot load ONNX export {result_path}: {type(exc).__name__}: {exc}"


def configure_encoder(encoder: ImageEncoder, runtime: str, artifact: Optional[Path] = None, export: bool = True,
                      cache_dir: Optional[Path] = None) -> str:
    """Install the runtime `runtime` asks for on `encoder`; one log line says which serves and why."""
    model = encoder.model
    if not wants_onnx(runtime, model.device):
        why = "ENCODER_RUNTIME=torch" if parse_runtime(runtime) == "torch" else f"device {model.device}"
        encoder.use_onnx(None, f"torch ({why})")
        log.info("image encoder: PyTorch (%s)", why)
        return encoder.runtime
    onnx, note = load_onnx_encoder(model, artifact, export, cache_dir)
    encoder.use_onnx(onnx, f"{encoder.runtime}: {note}")
    if onnx is None:  # a failed export is worth a warning; a missing one that was not asked for is not
        log.log(logging.WARNING if export else logging.INFO, "image encoder: falling back to PyTorch (%s)", note)
    else:
        log.info("image encoder: OpenVINO on CPU (%s)", note)
    return encoder.runtime


def configure_in_background(encoder: ImageEncoder, runtime: str, artifact: Optional[Path] = None,
                            done: Optional[Callable[[str], None]] = None) -> Optional[threading.Thread]:
    """`configure_encoder` on its own thread (a first export may take tens of seconds); PyTorch serves meanwhile.

    Returns None (nothing to do) when PyTorch is the runtime asked for.
    """
    if not wants_onnx(runtime, encoder.model.device):
        configure_encoder(encoder, runtime, artifact)
        return None
    log.info("image encoder: PyTorch until the ONNX export of this model is loaded or made (a first export takes "
             "seconds for the demo model, about a minute for the official one), in the background")

    def work() -> None:
        try:
            result = configure_encoder(encoder, runtime, artifact)
        except Exception:  # never let the background thread kill serving
            log.exception("image encoder: ONNX set-up failed; PyTorch serves")
            result = "torch"
        if done is not None:
            done(result)

    # Not a daemon: killing it inside torch or OpenVINO at interpreter exit aborts the process.
    thread = threading.Thread(target=work, name="encoder-export", daemon=False)
    thread.start()
    return thread
