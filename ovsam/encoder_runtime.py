"""Which runtime computes a predictor's image features: eager PyTorch, or a verified ONNX export on CPU.

`ImageEncoder` is shared by a predictor and its per-vocabulary copies, so switching it to ONNX once an export
is ready (in the background, at start-up) switches every copy. `ENCODER_RUNTIME` = auto | torch | onnx:
auto uses ONNX Runtime on CPU when an export verifies equal, PyTorch on GPU.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional

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


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def wants_onnx(runtime: str, device: torch.device | str) -> bool:
    """auto: ONNX on CPU (if onnxruntime is installed); torch: never; onnx: on CPU (GPU keeps PyTorch)."""
    runtime = parse_runtime(runtime)
    if runtime == "torch" or torch.device(device).type != "cpu":
        return False
    return runtime == "onnx" or onnxruntime_available()


def make_session(onnx_model: bytes | str | Path, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session using as many threads as torch does (the same share of the machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads must not spin: the PyTorch decoder runs right after, on the same cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Denormals cost orders of magnitude more cycles and change nothing at the 1e-4 the export is held to.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """A verified ONNX export of one model's encoder, run by ONNX Runtime on CPU."""

    def __init__(self, model: OVSAM, path: Path, threads: Optional[int] = None) -> None:
        self.model = model
        self.path = Path(path)
        self.session = make_session(self.path, threads)
        expected = model.encode_output_names()
        got = [o.name for o in self.session.get_outputs()]
        if got != expected:
            raise ValueError(f"{self.path} has outputs {got}, the model needs {expected}")

    def outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The same list as `OVSAM.encode_outputs` for a normalised [1, 3, S, S] input."""
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return [torch.from_numpy(o) for o in self.session.run(None, {"image": arr})]

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

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        onnx = self.onnx  # one read: a concurrent switch never mixes runtimes within an image
        if onnx is not None and self.model.device.type == "cpu":
            return onnx.encode_image(image)
        return self.model.encode_image(image)


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
        log.info("image encoder: ONNX Runtime on CPU (%s)", note)
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

    # Not a daemon: killing it inside torch or onnxruntime at interpreter exit aborts the process.
    thread = threading.Thread(target=work, name="encoder-export", daemon=False)
    thread.start()
    return thread
