"""Our self-describing model artifact: one safetensors file with weights, configuration, vocabulary,
version, provenance and metrics. The backend, training and evaluation all load models through here."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import OVSAMConfig
from .model import OVSAM
from .text import TextEncoder, load_pretrained_text_encoder
from .vocabulary import Vocabulary

ARTIFACT_FORMAT = "ovsam-artifact/1"
CHECKSUM_ALGORITHM = "sha256"
# Weights of the image encoder (CLIP trunk + SAM2CLIP neck): their own checksum says whether two artifacts can share
# one loaded encoder and its image-embedding cache.
IMAGE_ENCODER_PREFIXES = ("model.trunk.", "model.neck.")


# A version a training job derived from another: `<root>-p<project>-<UTC stamp>-<8 hex of the weights>` (or the
# older `<root>-ft-<stamp>Z`). The project part holds no '-', so a root that contains "-p" is never cut.
_DERIVED_VERSION = re.compile(r"(-p[A-Za-z0-9_.]+-\d{8}T\d{6}-[0-9a-f]{8}(-\d+)?|-ft-\d{8}T\d{6}Z(-\d+)?)$")


def root_version(version: str) -> str:
    """The base model's name inside a derived version, so names do not grow with every round of training."""
    return _DERIVED_VERSION.sub("", version)

log = logging.getLogger(__name__)


class ArtifactIntegrityError(ValueError):
    """The weights in an artifact are not the ones it was saved with (torn or altered file)."""


def _tensor_group(key: str) -> str:
    return "image_encoder" if key.startswith(IMAGE_ENCODER_PREFIXES) else "rest"


def weights_checksums(tensors: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 per group ("image_encoder", "rest") over each tensor's name, dtype, shape and bytes, keys sorted.

    The bytes are those stored in the file, so a check after loading needs the tensors exactly as read.
    """
    digests = {"image_encoder": hashlib.sha256(), "rest": hashlib.sha256()}
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h = digests[_tensor_group(key)]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {group: h.hexdigest() for group, h in digests.items()}


def content_hash(checksums: Mapping[str, str]) -> str:
    """One digest of the per-group checksums (names carry its first characters)."""
    return hashlib.sha256("".join(f"{k}={checksums[k]};" for k in sorted(checksums)).encode()).hexdigest()


@dataclass
class ModelArtifact:
    model: OVSAM
    vocabulary: Vocabulary
    version: str
    provenance: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    text_encoder: Optional[TextEncoder] = None
    path: Optional[Path] = None
    checksum: Optional[Dict[str, str]] = None  # as saved (None: an older artifact, or weights not from an artifact)

    @property
    def config(self) -> OVSAMConfig:
        return self.model.cfg

    def get_text_encoder(self) -> TextEncoder:
        """The artifact's own text tower, or the pretrained open_clip one named by the config."""
        if self.text_encoder is None:
            self.text_encoder = load_pretrained_text_encoder(self.config)
        return self.text_encoder


def _check_finite(state: Dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights: {bad[:5]}")


def save_artifact(
    path: str | os.PathLike,
    model: OVSAM,
    vocabulary: Vocabulary,
    version: str | Callable[[str], str],
    provenance: Optional[Dict[str, Any]] = None,
    metrics: Optional[Dict[str, Any]] = None,
    text_encoder: Optional[TextEncoder] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half an artifact.

    The weights' checksums go into the metadata and are checked by :func:`load_artifact`. ``version`` may be a
    function of the weights' content hash, so a version name can carry it (unique per content).
    """
    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v
    if text_encoder is not None:
        for k, v in text_encoder.text.state_dict().items():
            if k != "attn_mask":
                tensors[f"text.{k}"] = v
    tensors["vocab.embeddings"] = vocabulary.embeddings.float()
    tensors["vocab.is_base"] = vocabulary.is_base.to(torch.uint8)
    if vocabulary.excluded.any():
        tensors["vocab.excluded"] = vocabulary.excluded.to(torch.uint8)
    _check_finite(tensors)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and not k.startswith("vocab."):
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    checksums = weights_checksums(out)
    if callable(version):
        version = version(content_hash(checksums))
    meta = {
        "format": ARTIFACT_FORMAT,
        "config": json.dumps(model.cfg.to_dict()),
        "vocabulary": json.dumps({"labels": vocabulary.labels, "synonyms": vocabulary.synonyms}),
        "version": version,
        "provenance": json.dumps(provenance or {}, default=str),
        "metrics": json.dumps(metrics or {}, default=str),
        "text_model": json.dumps({"name": text_encoder.model_name, "text_cfg": text_encoder.text_cfg} if text_encoder else None),
        "checksum": json.dumps({"algorithm": CHECKSUM_ALGORITHM, **checksums}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_artifact_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """Configuration, vocabulary, version, provenance and metrics without loading any weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not an OVSAM model artifact: {exc}") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path} is not an OVSAM model artifact (format={meta.get('format')!r})")
    return {
        "config": json.loads(meta["config"]),
        "vocabulary": json.loads(meta["vocabulary"]),
        "version": meta["version"],
        "provenance": json.loads(meta.get("provenance", "{}")),
        "metrics": json.loads(meta.get("metrics", "{}")),
        "text_model": json.loads(meta.get("text_model", "null")),
        "checksum": json.loads(meta["checksum"]) if meta.get("checksum") else None,
    }


def verify_checksums(path: str | os.PathLike, expected: Optional[Mapping[str, str]],
                     tensors: Mapping[str, torch.Tensor], groups: tuple[str, ...] = ("image_encoder", "rest")) -> None:
    """Compare the weights as read with the checksums saved with them (only ``groups``, e.g. the part that is used).

    Artifacts without checksums (saved before they existed) load with a log line.
    """
    if not expected:
        log.info("%s carries no weights checksum (saved by an older version): loading it unchecked", path)
        return
    if expected.get("algorithm", CHECKSUM_ALGORITHM) != CHECKSUM_ALGORITHM:
        raise ArtifactIntegrityError(f"{path}: unknown checksum algorithm {expected.get('algorithm')!r}")
    got = weights_checksums(tensors)
    bad = [g for g in groups if g in expected and got[g] != expected[g]]
    if bad:
        raise ArtifactIntegrityError(
            f"{path}: the weights do not match their checksum ({', '.join(bad)}): the file is damaged or was altered")


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu",
                  shared_image_encoder: Optional[OVSAM] = None) -> ModelArtifact:
    """One call: model (strict keys), vocabulary, text tower if shipped, and the metadata.

    The weights are checked against the checksums saved with them (:class:`ArtifactIntegrityError`). With
    ``shared_image_encoder`` (a loaded model whose trunk and neck have this artifact's image-encoder checksum), the
    new model uses that model's trunk and neck modules instead of a copy of its own: per-project models of one base
    then hold one encoder between them.
    """
    meta = read_artifact_metadata(path)
    cfg = OVSAMConfig.from_dict(meta["config"])
    share = shared_image_encoder is not None
    raw: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if share and key.startswith(IMAGE_ENCODER_PREFIXES):
                continue
            raw[key] = f.get_tensor(key)
    verify_checksums(path, meta["checksum"], raw, ("rest",) if share else ("image_encoder", "rest"))
    model_state = {k[6:]: v.float() for k, v in raw.items() if k.startswith("model.")}
    text_state = {k[5:]: v.float() for k, v in raw.items() if k.startswith("text.")}
    embeddings = raw["vocab.embeddings"].float()
    is_base = raw["vocab.is_base"].bool()
    excluded = raw["vocab.excluded"].bool() if "vocab.excluded" in raw else None
    del raw
    model = OVSAM(cfg)
    if share:
        model.trunk, model.neck = shared_image_encoder.trunk, shared_image_encoder.neck
        model_state.update({f"trunk.{k}": v for k, v in model.trunk.state_dict().items()})
        model_state.update({f"neck.{k}": v for k, v in model.neck.state_dict().items()})
    model.load_state_dict(model_state, strict=True)
    model.to(device).eval()
    text_encoder = None
    if text_state:
        tm = meta["text_model"] or {}
        text_encoder = TextEncoder(tm.get("name", cfg.text_model), cfg.clip_embed_dim, tm.get("text_cfg") or cfg.text_cfg)
        text_encoder.load_open_clip_state(text_state)
        text_encoder.eval()
    vocab = meta["vocabulary"]
    vocabulary = Vocabulary(vocab["labels"], vocab["synonyms"], embeddings, is_base, excluded)
    return ModelArtifact(model, vocabulary, meta["version"], meta["provenance"], meta["metrics"], text_encoder, Path(path),
                         meta["checksum"])
