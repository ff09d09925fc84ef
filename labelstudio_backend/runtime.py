"""The served model: which one to load, its predictor, per-project vocabularies, and hot swap.

A :class:`ServingModel` is one loaded version with everything derived from it.
:class:`ModelRuntime` holds the current one behind a single reference: a
request takes that reference once and uses it to the end, so swapping in a
newly trained model never disturbs requests in flight (they finish on the old
one) and never makes ``/health`` or ``/setup`` wait (reading a reference takes
no lock).

All predictors on one device share one lock, so model work stays serialised
per device even while an old and a new model briefly coexist during a swap.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovsam.artifact import ModelArtifact, save_artifact
from ovsam.checkpoint import load_model
from ovsam.encoder_runtime import configure_in_background
from ovsam.predictor import OVSAMPredictor
from ovsam.vocabulary import Vocabulary, VocabularyBuilder, normalise_synonyms

from .config import Settings
from .lanes import PriorityLock, background_lane
from .registry import ModelRegistry, VersionInfo

__all__ = [
    "DEFAULT_MODEL_PATH",
    "ModelLoadError",
    "ModelRuntime",
    "ModelSource",
    "ServingModel",
    "build_untrained_tiny",
    "device_lock",
]

log = logging.getLogger(__name__)

# The offline default model shipped with the package (trained by the project on synthetic data).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "default_model" / "ovsam_demo.safetensors"
UNTRAINED_VERSION = "untrained-tiny"
# Vocabularies kept per served model (one per distinct label set seen), and their embeddings' bytes.
_MAX_VOCABULARIES = 64
_MAX_VOCABULARY_BYTES = 512 * 1024 * 1024

_device_locks: dict[str, PriorityLock] = {}
_device_locks_guard = threading.Lock()


def device_lock(device: torch.device) -> PriorityLock:
    """The one model lock of a device, shared by every predictor placed on it (clicks go first)."""
    key = str(device)
    with _device_locks_guard:
        return _device_locks.setdefault(key, PriorityLock())


class ModelLoadError(RuntimeError):
    """A model could not be loaded (message says which and why)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from.

    ``kind`` is ``promoted`` (``MODEL_DIR/current``), ``checkpoint``
    (``OVSAM_CHECKPOINT``), ``default-demo`` (the shipped offline model) or
    ``untrained-tiny`` (random weights; only so the server starts anywhere).
    """

    kind: str
    path: Path | None

    @classmethod
    def resolve(cls, settings: Settings, registry: ModelRegistry, promoted: bool = True) -> "ModelSource":
        """Promoted version, else OVSAM_CHECKPOINT, else the shipped demo, else untrained tiny."""
        current = registry.current() if promoted else None
        if current is not None:
            return cls("promoted", current)
        if settings.checkpoint:
            return cls("checkpoint", Path(settings.checkpoint).expanduser())
        if DEFAULT_MODEL_PATH.is_file():
            return cls("default-demo", DEFAULT_MODEL_PATH)
        return cls("untrained-tiny", None)


def build_untrained_tiny() -> ModelArtifact:
    """A tiny model with fixed random weights: answers with valid but meaningless masks."""
    from ovsam.config import get_config
    from ovsam.model import OVSAM
    from ovsam.text import TextEncoder

    cfg = get_config("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OVSAM(cfg).eval()
        text = TextEncoder.from_config(cfg).eval()
    vocabulary = VocabularyBuilder(text).build(["object"])
    provenance = {"note": "random weights, built at start-up because no model is configured"}
    return ModelArtifact(model, vocabulary, UNTRAINED_VERSION, provenance, {}, text, None)


def load_model_artifact(source: ModelSource) -> ModelArtifact:
    """Load a source on the CPU: an artifact file or a directory of official weights."""
    if source.path is None:
        return build_untrained_tiny()
    if not source.path.exists():
        raise ModelLoadError(f"{source.kind} model {str(source.path)!r} does not exist")
    try:
        return load_model(source.path, "cpu")
    except Exception as exc:  # any loader failure becomes one clear start-up message
        raise ModelLoadError(f"cannot load {source.kind} model {str(source.path)!r}: {exc}") from exc


class ServingModel:
    """One loaded model version: predictor (shared embedding cache) and per-project vocabularies."""

    def __init__(
        self,
        artifact: ModelArtifact,
        source: ModelSource,
        device: str | torch.device,
        cache_bytes: int,
        vocabulary_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.artifact = artifact
        self.kind = source.kind
        self.path = artifact.path if artifact.path is not None else source.path
        self.version = artifact.version
        self.loaded_at = time.time()
        self.predictor = OVSAMPredictor(artifact.model, artifact.vocabulary, cache_bytes=cache_bytes, device=device)
        self.predictor.model_lock = device_lock(self.predictor.device)
        self._views: OrderedDict[tuple[Any, ...], OVSAMPredictor] = OrderedDict()
        self._building: dict[tuple[Any, ...], Future[OVSAMPredictor]] = {}
        self._progress: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._views_lock = threading.Lock()
        self._executor = vocabulary_executor
        self._builder: VocabularyBuilder | None = None
        self._builder_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    # -- vocabularies ------------------------------------------------------
    @staticmethod
    def _label_key(labels: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> tuple[Any, ...]:
        return (tuple(labels), tuple(tuple(synonyms.get(label, ())) for label in labels))

    def vocabulary_future(
        self, labels: Sequence[str], synonyms: Mapping[str, Sequence[str]]
    ) -> Future[OVSAMPredictor]:
        """The predictor for these labels, now or when its text embeddings are built.

        Builds run one at a time on the vocabulary thread (one build per label
        set, however many requests ask), so a project with thousands of new
        labels never occupies the workers that serve other projects' clicks.
        """
        key = self._label_key(labels, synonyms)
        with self._views_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
                done: Future[OVSAMPredictor] = Future()
                done.set_result(view)
                return done
            pending = self._building.get(key)
            if pending is not None:
                return pending
            if self._executor is None:
                pending = Future()
                pending.set_running_or_notify_cancel()
            else:
                pending = self._executor.submit(self._build_view, key, list(labels), dict(synonyms))
            self._building[key] = pending
        if self._executor is None:  # no vocabulary thread (tests, tools): build in the caller's thread
            try:
                pending.set_result(self._build_view(key, list(labels), dict(synonyms)))
            except BaseException as exc:
                pending.set_exception(exc)
        return pending

    def predictor_for(self, labels: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> OVSAMPredictor:
        """A predictor that recognises exactly these labels (waits for their embeddings).

        The predictor keeps its vocabulary as state; concurrent projects need
        different ones, so each label set gets a shallow copy sharing the
        model, the embedding cache and the device lock.
        """
        return self.vocabulary_future(labels, synonyms).result()

    def vocabulary_progress(self, labels: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> tuple[int, int] | None:
        """(texts embedded, texts in all) of a build in progress, or None."""
        return self._progress.get(self._label_key(labels, synonyms))

    def _build_view(
        self, key: tuple[Any, ...], labels: list[str], synonyms: dict[str, Sequence[str]]
    ) -> OVSAMPredictor:
        lock = self.predictor.model_lock

        def before_batch(done: int, total: int) -> None:
            self._progress[key] = (done, total)
            if isinstance(lock, PriorityLock):
                lock.yield_to_interactive()

        try:
            with background_lane():
                vocabulary = self._vocabulary(labels, synonyms, before_batch)
            view = copy.copy(self.predictor)
            view.vocabulary = vocabulary
            with self._views_lock:
                self._views[key] = view
                while len(self._views) > _MAX_VOCABULARIES or (
                    len(self._views) > 1 and self._views_bytes() > _MAX_VOCABULARY_BYTES
                ):
                    self._views.popitem(last=False)
            return view
        finally:
            with self._views_lock:
                self._building.pop(key, None)
                self._progress.pop(key, None)

    def _views_bytes(self) -> int:
        return sum(v.vocabulary.embeddings.numel() * v.vocabulary.embeddings.element_size() for v in self._views.values())

    def _vocabulary(
        self,
        labels: Sequence[str],
        synonyms: Mapping[str, Sequence[str]],
        before_batch: Callable[[int, int], None] | None = None,
    ) -> Vocabulary:
        """The artifact's own embeddings when the labels and synonyms match; else the text tower's (cached)."""
        base = self.artifact.vocabulary
        names = {label: list(s) for label, s in synonyms.items()}
        known = dict(zip(base.labels, base.synonyms))
        if all(known.get(label) == group for label, group in zip(labels, normalise_synonyms(labels, names))):
            return base.subset(labels)
        with self._builder_lock:
            if self._builder is None:
                self._builder = VocabularyBuilder(self.artifact.get_text_encoder())
        return self._builder.build(list(labels), names, base_labels=base.labels, before_batch=before_batch)

    def known_label_sets(self) -> list[tuple[list[str], dict[str, list[str]]]]:
        with self._views_lock:
            keys = list(self._views)
        return [(list(labels), {l: list(s) for l, s in zip(labels, syns)}) for labels, syns in keys]

    # -- bookkeeping -------------------------------------------------------
    def ensure_artifact_file(self, directory: Path) -> Path:
        """A file holding this model (the untrained one has none until training needs it)."""
        if self.path is not None:
            return self.path
        path = directory / f"{self.version}.safetensors"
        if not path.is_file():
            save_artifact(
                path,
                self.artifact.model,
                self.artifact.vocabulary,
                self.version,
                provenance=self.artifact.provenance,
                text_encoder=self.artifact.text_encoder,
            )
        self.path = path
        return path

    def _vocabularies_state(self) -> dict[str, Any]:
        with self._views_lock:
            ready = len(self._views)
            building = [
                {"labels": len(key[0]), "texts_done": done, "texts": total}
                for key, (done, total) in list(self._progress.items())
            ]
            queued = len(self._building) - len(building)
        return {"ready": ready, "building": building, "queued": max(queued, 0)}

    def describe(self) -> dict[str, Any]:
        """For /health: never takes a lock that model work holds."""
        cache = self.predictor.cache
        return {
            "kind": self.kind,
            "version": self.version,
            "path": str(self.path) if self.path is not None else None,
            "config": self.artifact.config.name,
            "device": str(self.device),
            "image_encoder": self.predictor.image_encoder.runtime,
            "labels": len(self.artifact.vocabulary),
            "loaded_at": self.loaded_at,
            "trained": self.kind != "untrained-tiny",
            "vocabularies": self._vocabularies_state(),
            "embedding_cache": {
                "entries": len(cache),
                "bytes": cache.nbytes,
                "max_bytes": cache.max_bytes,
                "hits": cache.hits,
                "misses": cache.misses,
            },
        }


class ModelRuntime:
    """Holds the served model and swaps it for a newly promoted one without a restart."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._serving: ServingModel | None = None
        self._swap_lock = threading.Lock()
        # One thread builds text embeddings for new label sets, for every served model.
        self.vocabulary_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocabulary")

    @property
    def current(self) -> ServingModel:
        serving = self._serving
        if serving is None:
            raise ModelLoadError("no model is loaded yet")
        return serving

    def load(self, source: ModelSource) -> ServingModel:
        """Load a source onto the configured device (slow: call it off the event loop)."""
        start = time.perf_counter()
        artifact = load_model_artifact(source)
        try:
            serving = ServingModel(
                artifact, source, self.settings.device, self.settings.embedding_cache_bytes, self.vocabulary_executor
            )
        except (RuntimeError, ValueError, AssertionError) as exc:  # e.g. DEVICE=cuda without CUDA
            raise ModelLoadError(f"cannot place the model on device {self.settings.device!r}: {exc}") from exc
        serving.predictor.use_autocast &= self.settings.precision == "bf16"  # PRECISION=fp32: no autocast
        # ENCODER_RUNTIME: an ONNX encoder on CPU, loaded or exported in the background (never on a request's path).
        serving.encoder_setup = configure_in_background(serving.predictor.image_encoder,
                                                        self.settings.encoder_runtime, serving.path)
        log.info(
            "loaded model %s (%s, %s) on %s in %.2f s",
            serving.version, source.kind, serving.path or "built in memory", serving.device,
            time.perf_counter() - start,
        )
        if source.kind == "default-demo":
            log.info(
                "serving the shipped offline DEMO model %s: trained from scratch on synthetic shapes (%s), no CLIP "
                "knowledge; set OVSAM_CHECKPOINT for real OVSAM weights",
                serving.version, ", ".join(serving.artifact.vocabulary.labels),
            )
        if source.kind == "untrained-tiny":
            log.warning(
                "no model configured (OVSAM_CHECKPOINT unset, nothing promoted in %s, no shipped demo model at %s): "
                "serving an UNTRAINED tiny model; its masks and labels are meaningless",
                self.registry.root, DEFAULT_MODEL_PATH,
            )
        return serving

    def start(self) -> ServingModel:
        """Load the model to serve at start-up (see :meth:`ModelSource.resolve`)."""
        source = ModelSource.resolve(self.settings, self.registry)
        try:
            serving = self.load(source)
        except ModelLoadError:
            if source.kind != "promoted":
                raise
            log.exception("the promoted model cannot be loaded; falling back to the base model")
            serving = self.load(ModelSource.resolve(self.settings, self.registry, promoted=False))
        self._serving = serving
        return serving

    def versions(self) -> list[VersionInfo]:
        """What this backend can serve: the base model, every stored version, and the served one."""
        infos: list[VersionInfo] = []
        base = Path(self.settings.checkpoint) if self.settings.checkpoint else DEFAULT_MODEL_PATH
        if base.is_file():
            try:
                infos.append(VersionInfo.read(base))
            except (OSError, ValueError):
                pass  # official weights: their version is known once loaded (the served one below)
        infos += self.registry.list_versions()
        serving = self.current
        infos.append(VersionInfo(serving.version, serving.path, serving.loaded_at, serving.artifact.metrics,
                                 serving.artifact.provenance))
        unique: dict[str, VersionInfo] = {}
        for info in infos:
            unique.setdefault(info.version, info)
        return list(unique.values())

    def load_for_swap(self, path: Path) -> ServingModel:
        """Load ``path`` and prepare the vocabularies the served model already uses (slow)."""
        new = self.load(ModelSource("promoted", path))
        old = self._serving
        for labels, synonyms in old.known_label_sets() if old is not None else []:
            try:
                new.predictor_for(labels, synonyms)
            except Exception as exc:  # the vocabulary is then built on first use instead
                log.warning("could not prepare vocabulary %s for the new model: %s", labels, exc)
        return new

    def close(self) -> None:
        """Stop the vocabulary thread (builds in progress are abandoned)."""
        self.vocabulary_executor.shutdown(wait=False, cancel_futures=True)

    def install(self, new: ServingModel) -> None:
        """Switch the served model; requests in flight finish on the old one."""
        with self._swap_lock:
            old, self._serving = self._serving, new
        if old is not None and old is not new:
            old.predictor.cache.clear()  # in-flight requests keep their own feature references
        log.info("now serving model version %s (was %s)", new.version, old.version if old else None)
