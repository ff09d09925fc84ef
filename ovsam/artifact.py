"""Our self-describing model artifact: one safetensors file with weights, configuration, vocabulary,
version, provenance and metrics. The backend, training and evaluation all load models through here."""
from __future__ import annotations

import json
import os
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


@dataclass
class ModelArtifact:
    model: OVSAM
    vocabulary: Vocabulary
    version: str
    provenance: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    text_encoder: Optional[TextEncoder] = None
    path: Optional[Path] = None

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
    version: str,
    provenance: Optional[Dict[str, Any]] = None,
    metrics: Optional[Dict[str, Any]] = None,
    text_encoder: Optional[TextEncoder] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half an artifact."""
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
    meta = {
        "format": ARTIFACT_FORMAT,
        "config": json.dumps(model.cfg.to_dict()),
        "vocabulary": json.dumps({"labels": vocabulary.labels, "synonyms": vocabulary.synonyms}),
        "version": version,
        "provenance": json.dumps(provenance or {}, default=str),
        "metrics": json.dumps(metrics or {}, default=str),
        "text_model": json.dumps({"name": text_encoder.model_name, "text_cfg": text_encoder.text_cfg} if text_encoder else None),
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
    }


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelArtifact:
    """One call: model (strict keys), vocabulary, text tower if shipped, and the metadata."""
    meta = read_artifact_metadata(path)
    cfg = OVSAMConfig.from_dict(meta["config"])
    model_state: Dict[str, torch.Tensor] = {}
    text_state: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model."):
                model_state[key[6:]] = f.get_tensor(key).float()
            elif key.startswith("text."):
                text_state[key[5:]] = f.get_tensor(key).float()
        embeddings = f.get_tensor("vocab.embeddings").float()
        is_base = f.get_tensor("vocab.is_base").bool()
        excluded = f.get_tensor("vocab.excluded").bool() if "vocab.excluded" in f.keys() else None
    model = OVSAM(cfg)
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
    return ModelArtifact(model, vocabulary, meta["version"], meta["provenance"], meta["metrics"], text_encoder, Path(path))
