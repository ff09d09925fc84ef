"""Label vocabularies: names + synonyms -> unit-norm CLIP text prototypes [K, P, D], cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .text import TextEncoder

# ViLD's 14 prompt templates, as used by the reference's gen_cls.
VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def split_label(name: str) -> List[str]:
    """The reference's synonym splitting of dataset class names (keeps its quirk, docs/REFERENCE_NOTES.md B6)."""
    name = name.replace("_or_", ",").replace("/", ",").replace("_", " ").lower()
    return [s.strip() for s in name.split(",") if s.strip()]


def default_cache_dir() -> Path:
    return Path(os.environ.get("OVSAM_CACHE_DIR", Path.home() / ".cache" / "ovsam")) / "vocab"


@dataclass
class Vocabulary:
    """A label set the recogniser chooses from; `is_base` marks classes the head was trained on."""

    labels: List[str]
    synonyms: List[List[str]]
    embeddings: torch.Tensor  # [K, P, D] unit-norm
    is_base: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [K] bool
    # [K] bool: classes kept in the softmax but scored -1000 after the fusion, so never predicted (the
    # reference's COCO classes in neither the base nor the novel split).
    excluded: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if len(self.labels) == 0:
            raise ValueError("a vocabulary needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate labels in vocabulary: {self.labels}")
        if self.embeddings.shape[0] != len(self.labels):
            raise ValueError("one embedding row per label is required")
        norms = self.embeddings.float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError("vocabulary embeddings must be unit-norm")
        if self.is_base is None:
            self.is_base = torch.ones(len(self.labels), dtype=torch.bool)
        if self.excluded is None:
            self.excluded = torch.zeros(len(self.labels), dtype=torch.bool)
        if self.excluded.shape != (len(self.labels),):
            raise ValueError("one excluded flag per label is required")
        if bool(self.excluded.all()):
            raise ValueError("every label of the vocabulary is excluded")

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str) -> int:
        return self.labels.index(label)

    def with_base(self, base_labels: Sequence[str]) -> "Vocabulary":
        base = set(base_labels)
        mask = torch.tensor([l in base for l in self.labels], dtype=torch.bool)
        return Vocabulary(list(self.labels), [list(s) for s in self.synonyms], self.embeddings, mask, self.excluded.clone())

    def with_excluded(self, excluded_labels: Sequence[str]) -> "Vocabulary":
        excluded = set(excluded_labels)
        mask = torch.tensor([l in excluded for l in self.labels], dtype=torch.bool)
        return Vocabulary(list(self.labels), [list(s) for s in self.synonyms], self.embeddings, self.is_base.clone(), mask)

    def with_embeddings(self, embeddings: torch.Tensor) -> "Vocabulary":
        """The same labels with other rows (e.g. fitted to a project's objects); shape must match."""
        if embeddings.shape != self.embeddings.shape:
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match the vocabulary's {tuple(self.embeddings.shape)}")
        return Vocabulary(list(self.labels), [list(s) for s in self.synonyms], embeddings.to(self.embeddings.dtype),
                          self.is_base.clone(), self.excluded.clone())

    def subset(self, labels: Sequence[str]) -> "Vocabulary":
        idx = [self.index(l) for l in labels]
        return Vocabulary(list(labels), [self.synonyms[i] for i in idx], self.embeddings[idx], self.is_base[idx],
                          self.excluded[idx])


def normalise_synonyms(labels: Sequence[str], synonyms: Optional[Dict[str, Sequence[str]]] = None) -> List[List[str]]:
    """The label itself first, then its extra names, without duplicates."""
    out = []
    for label in labels:
        names = [label, *(synonyms or {}).get(label, [])]
        seen: List[str] = []
        for n in names:
            n = n.strip()
            if n and n not in seen:
                seen.append(n)
        out.append(seen)
    return out


def embed_synonyms(
    encoder: TextEncoder,
    synonyms: List[List[str]],
    templates: Sequence[str] = VILD_TEMPLATES,
    before_batch: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Normalise each (synonym, template) feature, average over templates, normalise, pad by the first synonym."""
    flat = [s for group in synonyms for s in group]
    texts = [t.format(s) for s in flat for t in templates]
    feats = F.normalize(encoder.encode(texts, before_batch=before_batch), dim=-1).view(len(flat), len(templates), -1)
    per_name = F.normalize(feats.mean(dim=1), dim=-1)
    p = max(len(g) for g in synonyms)
    rows, i = [], 0
    for group in synonyms:
        block = per_name[i : i + len(group)]
        i += len(group)
        if len(group) < p:
            block = torch.cat([block, block[:1].expand(p - len(group), -1)])
        rows.append(block)
    return torch.stack(rows)


class VocabularyBuilder:
    """Builds vocabularies with one text encoder and caches their embeddings on disk per (text model, label set)."""

    def __init__(self, encoder: TextEncoder, cache_dir: Optional[Path] = None) -> None:
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._lock = threading.Lock()
        self._memory: Dict[str, torch.Tensor] = {}
        self._encoder_id: Optional[str] = None

    def cache_key(self, synonyms: List[List[str]], templates: Sequence[str]) -> str:
        if self._encoder_id is None:
            self._encoder_id = self.encoder.identity()
        payload = json.dumps({"model": self.encoder.model_name, "weights": self._encoder_id,
                              "synonyms": synonyms, "templates": list(templates)})
        return f"{self.encoder.model_name}_{hashlib.sha1(payload.encode()).hexdigest()[:20]}"

    def build(
        self,
        labels: Sequence[str],
        synonyms: Optional[Dict[str, Sequence[str]]] = None,
        base_labels: Optional[Sequence[str]] = None,
        templates: Sequence[str] = VILD_TEMPLATES,
        before_batch: Optional[Callable[[int, int], None]] = None,
        texts: Optional[Dict[str, Sequence[str]]] = None,
        excluded_labels: Optional[Sequence[str]] = None,
    ) -> Vocabulary:
        """The label set's vocabulary (embeddings from memory, the disk cache, or the text tower).

        ``texts`` gives a label's exact texts, one prototype each, instead of its name plus ``synonyms`` (the
        reference's class texts, `ovsam.class_texts`). ``before_batch(done, total)`` is passed to
        :meth:`TextEncoder.encode` when the text tower runs.
        """
        groups = normalise_synonyms(labels, synonyms)
        if texts is not None:
            groups = [list(texts[l]) if l in texts else g for l, g in zip(labels, groups)]
            if any(not g for g in groups):
                raise ValueError("every label needs at least one text")
        key = self.cache_key(groups, templates)
        with self._lock:
            emb = self._memory.get(key)
            if emb is None:
                emb = self._load(key)
            if emb is None:
                emb = embed_synonyms(self.encoder, groups, templates, before_batch=before_batch)
                self._save(key, emb)
            self._memory[key] = emb
        vocab = Vocabulary(list(labels), groups, emb)
        vocab = vocab.with_base(base_labels) if base_labels is not None else vocab
        return vocab.with_excluded(excluded_labels) if excluded_labels else vocab

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.pt"

    def _load(self, key: str) -> Optional[torch.Tensor]:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file is rebuilt, never trusted
            return None

    def _save(self, key: str, emb: torch.Tensor) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path(key).with_suffix(f".tmp{os.getpid()}")
            torch.save(emb, tmp)
            os.replace(tmp, self._path(key))
        except OSError:
            pass  # a read-only cache only costs recomputation


def resolve_vocabulary(
    stored: Optional[Vocabulary],
    labels: Sequence[str],
    make_builder: Callable[[], VocabularyBuilder],
    synonyms: Optional[Dict[str, Sequence[str]]] = None,
    texts: Optional[Dict[str, Sequence[str]]] = None,
    excluded_labels: Sequence[str] = (),
    before_batch: Optional[Callable[[int, int], None]] = None,
) -> Vocabulary:
    """`labels` (in that order) as a model whose artifact stores `stored` recognises them: the one rule the backend,
    the CLI, evaluation, fine-tuning's classifier and the promotion gate share (docs/ARCHITECTURE.md).

    is_base: a label is base iff `stored` holds it marked base (the classes the model was trained on: official
    COCO weights the 48 base classes, LVIS the common and frequent ones, a fine-tuned artifact its training
    labels); a label `stored` does not hold is novel. Excluded: the labels `stored` excludes, plus
    `excluded_labels`. Rows: `stored`'s when it holds every label with the same texts (fitted rows, offline
    official weights), else all from the text tower of `make_builder()` (called only then).
    """
    labels = list(labels)
    groups = normalise_synonyms(labels, synonyms)
    if texts is not None:
        groups = [list(texts[l]) if l in texts else g for l, g in zip(labels, groups)]
    known = {} if stored is None else {l: i for i, l in enumerate(stored.labels)}
    base = [l for l in labels if l in known and bool(stored.is_base[known[l]])]
    excluded = {*excluded_labels, *(l for l in labels if l in known and bool(stored.excluded[known[l]]))}
    if stored is not None and all(l in known and stored.synonyms[known[l]] == g for l, g in zip(labels, groups)):
        vocab = stored.subset(labels)
    else:
        vocab = make_builder().build(labels, synonyms, texts=texts, before_batch=before_batch)
    return vocab.with_base(base).with_excluded(sorted(excluded))


def artifact_vocabulary(artifact: Any, labels: Sequence[str], synonyms: Optional[Dict[str, Sequence[str]]] = None,
                        cache_dir: Optional[Path] = None, texts: Optional[Dict[str, Sequence[str]]] = None,
                        excluded_labels: Sequence[str] = ()) -> Vocabulary:
    """`resolve_vocabulary` for a loaded `ModelArtifact` (its stored vocabulary and its text tower)."""
    return resolve_vocabulary(artifact.vocabulary, labels, lambda: VocabularyBuilder(artifact.get_text_encoder(), cache_dir),
                              synonyms, texts=texts, excluded_labels=excluded_labels)
