"""The open_clip text tower that turns label names into CLIP text embeddings."""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, List, Optional, Sequence

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

from .config import OVSAMConfig


class TextEncoder(nn.Module):
    """A standalone open_clip TextTransformer; key names equal the text keys of an open_clip CLIP model."""

    def __init__(self, model_name: str, embed_dim: int, text_cfg: Dict, quick_gelu: bool = True) -> None:
        super().__init__()
        self.model_name = model_name
        self.text_cfg = dict(text_cfg)
        self.text = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))

    @classmethod
    def from_config(cls, cfg: OVSAMConfig) -> "TextEncoder":
        """The tower named by the config; custom towers (`text_cfg`) are random until weights are loaded."""
        if cfg.text_cfg is not None:
            return cls(cfg.text_model, cfg.clip_embed_dim, cfg.text_cfg, quick_gelu=True)
        model_cfg = open_clip.get_model_config(cfg.text_model)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model configuration named {cfg.text_model!r}")
        return cls(cfg.text_model, model_cfg["embed_dim"], model_cfg["text_cfg"], model_cfg.get("quick_gelu", False))

    def identity(self) -> str:
        """A key that changes whenever the text features would: model name plus a hash of the weights' shapes/sums."""
        h = hashlib.sha1(self.model_name.encode())
        for name, t in sorted(self.text.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(f"{float(t.float().sum()):.6e}".encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], batch_size: int = 256, before_batch: Optional[Callable[[int, int], None]] = None
    ) -> torch.Tensor:
        """[len(texts), D] raw (unnormalised) text features, as CLIP's encode_text(normalize=False).

        ``before_batch(done, total)`` runs before each batch: a server reports progress and lets
        interactive work go first there.
        """
        device = next(self.text.parameters()).device
        out: List[torch.Tensor] = []
        for i in range(0, len(texts), batch_size):
            if before_batch is not None:
                before_batch(i, len(texts))
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(device)
            out.append(self.text(tokens).float())
        return torch.cat(out) if out else torch.zeros(0, self.text.text_projection.shape[-1])

    def load_open_clip_state(self, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load the text keys of an open_clip CLIP state dict (visual.* and logit_* are ignored)."""
        text_state = {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_scale", "logit_bias"))}
        missing, unexpected = self.text.load_state_dict(text_state, strict=False)
        missing = [k for k in missing if k != "attn_mask"]
        if strict and (missing or unexpected):
            raise KeyError(f"text tower keys do not match: missing={missing} unexpected={unexpected}")


def load_pretrained_text_encoder(cfg: OVSAMConfig, pretrained: Optional[str] = None) -> TextEncoder:
    """Text tower with open_clip pretrained weights (a tag such as 'openai', or a local file path)."""
    tag = pretrained or cfg.text_pretrained
    encoder = TextEncoder.from_config(cfg)
    if tag is None:
        return encoder
    clip = open_clip.create_model(cfg.text_model, pretrained=tag)
    encoder.load_open_clip_state(clip.state_dict())
    return encoder


def describe(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
