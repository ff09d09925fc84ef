"""The image encoder (trunk + neck + FPN + per-image CLIP/decoder maps) exported to ONNX, verified, cached on disk.

On CPU the encoder is nearly all of a first click and of every pre-annotation task; OpenVINO runs the same
graph faster than eager PyTorch. An export is only ever used after it matched eager on a fixed input, and it is
cached under a key of the model's weights, configuration and library versions, so a model is exported once.
A model whose export fails or differs gets a `.failed` note instead, so it is not re-exported on every load.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .model import OVSAM

log = logging.getLogger(__name__)

# Every output of the export is within this of eager, relative to that output's largest magnitude (fp32).
REL_TOLERANCE = 1e-4
OPSET = 17
# Bumped when the exported graph's inputs, outputs or meaning change, so old cached files are not reused.
GRAPH_VERSION = "1"
CACHE_ENV = "OVSAM_ENCODER_CACHE"
_EXPORT_LOCK = threading.Lock()


class EncoderGraph(nn.Module):
    """What is exported: normalised image [1, 3, S, S] -> the flat list of `OVSAM.encode_outputs`."""

    def __init__(self, model: OVSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(self.model.encode_outputs(x))


@dataclass(frozen=True)
class ExportResult:
    """A verified export on disk (path) or why there is none (error); max_rel_diff as measured at export."""

    path: Optional[Path]
    error: Optional[str] = None
    max_rel_diff: Optional[float] = None
    seconds: float = 0.0
    cached: bool = False


def runtime_versions() -> str:
    """The libraries whose numerics or file format the cached export depends on."""
    import openvino

    return f"torch={torch.__version__};openvino={openvino.__version__};graph={GRAPH_VERSION};opset={OPSET}"


def encoder_key(model: OVSAM) -> str:
    """Content key of an export: the model's weights, its configuration, the input side and library versions.

    Hashing the loaded weights (not a file) covers artifacts, official-weight directories and models that were
    changed in memory (another input side) alike.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(runtime_versions().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where exports go when the artifact's folder is not writable (or there is no artifact file)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ovsam" / "encoders"


def export_path(model: OVSAM, artifact: Optional[Path] = None, cache_dir: Optional[Path] = None,
                key: Optional[str] = None) -> Path:
    """`<artifact>.encoder-<key>.onnx` beside a writable artifact, else `<cache_dir>/<config>.encoder-<key>.onnx`."""
    key = key or encoder_key(model)
    if cache_dir is None and artifact is not None:
        artifact = Path(artifact)
        folder = artifact if artifact.is_dir() else artifact.parent
        if os.access(folder, os.W_OK):
            stem = "official" if artifact.is_dir() else artifact.name
            return folder / f"{stem}.encoder-{key[:20]}.onnx"
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{model.cfg.name}.encoder-{key[:20]}.onnx"


def failure_path(path: Path) -> Path:
    return path.with_suffix(".failed")


def reference_input(model: OVSAM, seed: int = 0) -> torch.Tensor:
    """The fixed input of the equality check: a normalised-image-like tensor at the model's input side."""
    s = model.cfg.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, s, s, generator=g)


def max_relative_diff(reference: Sequence[torch.Tensor], exported: Sequence[np.ndarray]) -> float:
    """Largest |exported - eager| over all outputs, each relative to its eager output's largest magnitude."""
    if len(reference) != len(exported):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, exported):
        r = ref.detach().float().cpu().numpy()
        if r.shape != tuple(out.shape):
            return float("inf")
        scale = max(float(np.abs(r).max()), 1e-12)
        worst = max(worst, float(np.abs(out.astype(np.float32) - r).max()) / scale)
    return worst


def export_bytes(model: OVSAM) -> bytes:
    """The encoder as an ONNX model (legacy TorchScript-based exporter: it handles every module here)."""
    graph = EncoderGraph(model).eval()
    x = reference_input(model)
    names = model.encode_output_names()
    buf = io.BytesIO()
    _silence_tracer()
    with torch.no_grad():
        torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=names, do_constant_folding=True)
    return buf.getvalue()


def _silence_tracer() -> None:
    """The tracer warns about every Python `if` on shapes (fixed here: an export is for one input side) and about
    being the legacy exporter. Process-wide filters: `catch_warnings` is not thread-safe and exports run on a
    background thread of the backend."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)


def verify(model: OVSAM, onnx_model: bytes | str | Path, threads: Optional[int] = None) -> float:
    """Max relative difference between eager and the OpenVINO-compiled export on the fixed input (see
    `max_relative_diff`)."""
    from .encoder_runtime import CompiledEncoder

    x = reference_input(model)
    with torch.no_grad():
        ref: List[torch.Tensor] = model.encode_outputs(x.to(model.device))
    out = CompiledEncoder(onnx_model, threads).run(np.ascontiguousarray(x.numpy()))
    return max_relative_diff(ref, out)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_failure(path: Path) -> Optional[str]:
    """The reason an earlier export of this key was refused, or None."""
    note = failure_path(path)
    if not note.is_file():
        return None
    try:
        return str(json.loads(note.read_text()).get("error", "unknown"))
    except (OSError, ValueError):
        return "unreadable failure note"


def export_encoder(model: OVSAM, artifact: Optional[Path] = None, cache_dir: Optional[Path] = None,
                   force: bool = False) -> ExportResult:
    """A verified export of `model`'s encoder: the cached one, or a new one (tens of seconds for official shapes).

    Never raises for a model that cannot be exported or differs: the result carries the error, and a note beside
    the would-be file remembers it (`force` retries).
    """
    start = time.perf_counter()
    path = export_path(model, artifact, cache_dir)
    # The legacy exporter is not reentrant (a process-wide "in export" flag): one export at a time, and a model
    # exported by another thread meanwhile is then found in the cache.
    with _EXPORT_LOCK:
        return _export_locked(model, path, force, start)


def _export_locked(model: OVSAM, path: Path, force: bool, start: float) -> ExportResult:
    if not force:
        if path.is_file():
            return ExportResult(path, cached=True)
        earlier = read_failure(path)
        if earlier is not None:
            return ExportResult(None, f"an earlier export failed ({earlier}); `python -m ovsam export-onnx --force` retries",
                                cached=True)
    model = model.eval()
    try:
        data = export_bytes(model)
        diff = verify(model, data)
    except Exception as exc:  # any exporter/runtime failure means: serve with PyTorch
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _remember_failure(path, error)
        return ExportResult(None, error, seconds=time.perf_counter() - start)
    if not diff <= REL_TOLERANCE:
        error = f"exported encoder differs from eager by {diff:.3g} (relative; limit {REL_TOLERANCE:g})"
        _remember_failure(path, error)
        return ExportResult(None, error, diff, time.perf_counter() - start)
    try:
        _write_atomic(path, data)
        failure_path(path).unlink(missing_ok=True)
    except OSError as exc:  # full disk, lost permission: not the model's fault, so nothing is remembered
        return ExportResult(None, f"cannot write {path}: {exc}", diff, time.perf_counter() - start)
    return ExportResult(path, None, diff, time.perf_counter() - start)


def _remember_failure(path: Path, error: str) -> None:
    try:
        _write_atomic(failure_path(path), json.dumps({"error": error, "versions": runtime_versions()}).encode())
    except OSError as exc:  # a read-only place only costs a retry at the next load
        log.debug("cannot write %s: %s", failure_path(path), exc)
