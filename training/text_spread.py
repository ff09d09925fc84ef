"""Give a randomly initialised text tower distinct embeddings for distinct names.

The demo model has no CLIP weights. A random open_clip text tower maps every prompt to nearly the same
direction (the shared template and end-of-text tokens dominate: cosine 0.9-0.99 between unrelated names),
so a cosine classifier against those embeddings can barely tell classes apart. This trains the tower for
a few hundred steps to push the template-averaged embeddings of random vocabulary words apart, which
generalises to names it never saw: a project's own labels then start as distinguishable, if
meaningless, targets that fine-tuning of CLIP2SAM attaches meaning to. It is not CLIP pretraining.
"""
from __future__ import annotations

import random
import re
from typing import List, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ovsam.text import TextEncoder
from ovsam.vocabulary import VILD_TEMPLATES

_WORD = re.compile(r"^[a-z]{3,12}</w>$")


def tokenizer_words(encoder: TextEncoder) -> List[str]:
    """Whole alphabetic words of the tower's own BPE vocabulary: a free, offline supply of names."""
    return sorted(w[:-4] for w in encoder.tokenizer.encoder if _WORD.match(w))


def _embed(encoder: TextEncoder, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Template-averaged, normalised embeddings with gradients (the vocabulary's recipe, `embed_synonyms`)."""
    texts = [t.format(n) for n in names for t in templates]
    tokens = encoder.tokenizer(texts)
    feats = F.normalize(encoder.text(tokens).float(), dim=-1).view(len(names), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def mean_abs_cosine(encoder: TextEncoder, names: Sequence[str], templates: Sequence[str] = VILD_TEMPLATES) -> float:
    """Mean |cosine| between the embeddings of different names (0 = orthogonal, 1 = identical)."""
    with torch.no_grad():
        e = _embed(encoder, names, templates)
    sim = e @ e.T
    off = ~torch.eye(len(names), dtype=torch.bool)
    return float(sim[off].abs().mean())


def spread_text_tower(
    encoder: TextEncoder, steps: int = 300, batch_names: int = 48, templates_per_step: int = 4,
    lr: float = 2e-3, seed: int = 0, progress: bool = True,
) -> dict:
    """Train `encoder` in place so different names get near-orthogonal embeddings; returns before/after figures.

    Loss: mean squared off-diagonal cosine over a batch of random words, each averaged over a random subset
    of the vocabulary templates (the full set at evaluation).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    words = tokenizer_words(encoder)
    rng.shuffle(words)
    held_out, train_words = words[:64], words[64:]
    before = mean_abs_cosine(encoder, held_out)
    encoder.train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    off = ~torch.eye(batch_names, dtype=torch.bool)
    for _ in tqdm(range(steps), desc="spread text tower", disable=not progress):
        names = rng.sample(train_words, batch_names)
        templates = rng.sample(list(VILD_TEMPLATES), templates_per_step)
        e = _embed(encoder, names, templates)
        loss = (e @ e.T)[off].pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval()
    return {"mean_abs_cosine_before": before, "mean_abs_cosine_after": mean_abs_cosine(encoder, held_out),
            "steps": steps, "held_out_words": len(held_out)}
