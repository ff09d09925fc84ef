"""The served models: the shared base, each project's own version, their predictors, and hot swap.

A :class:`ServingModel` is one loaded version with everything derived from it.
:class:`ModelRuntime` holds the base model (``OVSAM_CHECKPOINT``, the shipped
demo, or an older global ``MODEL_DIR/current``) and, per project with a
promoted version, that project's model, loaded on first use and kept in a
bounded LRU (``MAX_LOADED_PROJECT_MODELS``). A project model whose image
encoder has the base's checksum shares the base's trunk, neck and
image-embedding cache, so it costs only its head. A request takes its
project's reference once and uses it to the end, so swapping in a newly
trained model never disturbs requests in flight, and ``/setup`` reads the
project's version from the registry without loading anything.

A project's version that cannot be loaded (torn file, flipped bytes) is set
aside: the project falls back to its previous good version, or the base, its
pointer is repaired, and ``/health`` reports the reason (``problems``).

All predictors on one device share one lock, so model work stays serialised
per device even while an old and a new model briefly coexist during a swap.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovsam.artifact import ModelArtifact, load_artifact, read_artifact_metadata, save_artifact
from ovsam.cache import SizedLRU
from ovsam.checkpoint import load_model
from ovsam.encoder_runtime import configure_in_background
from ovsam.predictor import OVSAMPredictor
from ovsam.vocabulary import Vocabulary, VocabularyBuilder, resolve_vocabulary

from .config import Settings
from .lanes import PriorityLock, background_lane
from .openmp import frees_thread_pool
from .registry import ModelRegistry, ProjectModels, VersionInfo

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
        return _device_locks.setdefault(key, PriorityLock(free_thread_pools=torch.device(device).type == "cpu"))


class ModelLoadError(RuntimeError):
    """A model could not be loaded (message says which and why)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from.

    ``kind`` is ``promoted`` (the older global ``MODEL_DIR/current``: the base of
    every project), ``checkpoint`` (``OVSAM_CHECKPOINT``), ``default-demo`` (the
    shipped offline model), ``untrained-tiny`` (random weights; only so the
    server starts anywhere), or ``project`` (a project's own trained version).
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


def _vocabulary_bytes(view: OVSAMPredictor) -> int:
    """A view's share of the budget: its embeddings' bytes, and at least 1/_MAX_VOCABULARIES of it (a count bound)."""
    embeddings = view.vocabulary.embeddings
    return max(embeddings.numel() * embeddings.element_size(), _MAX_VOCABULARY_BYTES // _MAX_VOCABULARIES)


def build_untrained_tiny() -> ModelArtifact:
    """A tiny model with fixed random weights: answers with valid but meaningless masks."""
    from ovsam.random_model import build_random

    return build_random("tiny", ["object"], 0, UNTRAINED_VERSION,
                        {"note": "random weights, built at start-up because no model is configured"})


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
        self.owns_cache = True  # False: the embedding cache is the base model's (shared image encoder)
        self.encoder_setup: threading.Thread | None = None  # the ONNX encoder's export/load in the background
        # One predictor per label set, bounded by the bytes of their text embeddings and in number (a set over the
        # whole budget is used but not kept).
        self._views: SizedLRU[OVSAMPredictor] = SizedLRU(_MAX_VOCABULARY_BYTES, _vocabulary_bytes)
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

    @frees_thread_pool
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
                self._views.put(key, view)
            return view
        finally:
            with self._views_lock:
                self._building.pop(key, None)
                self._progress.pop(key, None)

    def _vocabulary(
        self,
        labels: Sequence[str],
        synonyms: Mapping[str, Sequence[str]],
        before_batch: Callable[[int, int], None] | None = None,
    ) -> Vocabulary:
        """The project's labels as `resolve_vocabulary` gives them for this artifact (the text tower's are cached)."""

        def builder() -> VocabularyBuilder:
            with self._builder_lock:
                if self._builder is None:
                    self._builder = VocabularyBuilder(self.artifact.get_text_encoder())
                return self._builder

        names = {label: list(s) for label, s in synonyms.items()}
        return resolve_vocabulary(self.artifact.vocabulary, labels, builder, names, before_batch=before_batch)

    def known_label_sets(self) -> list[tuple[list[str], dict[str, list[str]]]]:
        with self._views_lock:
            keys = self._views.keys()
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
            "shares_base_image_encoder": not self.owns_cache,
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
    """The base model and each project's own model; swaps a project's model without a restart."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._serving: ServingModel | None = None  # the base model
        # Loaded project models, least recently used unloaded first (MAX_LOADED_PROJECT_MODELS).
        self._projects: SizedLRU[ServingModel] = SizedLRU(settings.max_loaded_project_models, lambda _: 1,
                                                          on_evict=self._unloaded)
        self._projects_lock = threading.Lock()
        self._project_load_locks: dict[str, threading.Lock] = {}
        self._swap_lock = threading.Lock()
        self._version_names: dict[tuple[str, float], str] = {}  # (path, mtime) -> version, read from headers
        self.problems: dict[str, str] = {}  # project -> why its pointer had to be repaired (/health)
        # One thread builds text embeddings for new label sets, for every served model.
        self.vocabulary_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocabulary")
        # One thread loads project models ahead of their first prediction (/setup asks for it).
        self._preload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")

    @property
    def current(self) -> ServingModel:
        """The base model (what a project without a trained version serves)."""
        serving = self._serving
        if serving is None:
            raise ModelLoadError("no model is loaded yet")
        return serving

    base = current

    @frees_thread_pool
    def load(self, source: ModelSource) -> ServingModel:
        """Load a source onto the configured device (slow: call it off the event loop)."""
        start = time.perf_counter()
        artifact = load_model_artifact(source)
        serving = self._serving_model(artifact, source, self.settings.embedding_cache_bytes)
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

    def _serving_model(self, artifact: ModelArtifact, source: ModelSource, cache_bytes: int) -> ServingModel:
        try:
            serving = ServingModel(artifact, source, self.settings.device, cache_bytes, self.vocabulary_executor)
        except (RuntimeError, ValueError, AssertionError) as exc:  # e.g. DEVICE=cuda without CUDA
            raise ModelLoadError(f"cannot place the model on device {self.settings.device!r}: {exc}") from exc
        serving.predictor.use_autocast &= self.settings.precision == "bf16"  # PRECISION=fp32: no autocast
        # ENCODER_RUNTIME: an ONNX encoder on CPU, loaded or exported in the background (never on a request's path).
        # Per model: its features include the recognition head's FPN maps, which fine-tuning trains.
        serving.encoder_setup = configure_in_background(serving.predictor.image_encoder,
                                                        self.settings.encoder_runtime, serving.path)
        return serving

    def start(self) -> ServingModel:
        """Load the base model, then the most recently trained projects' models (repairing broken pointers)."""
        source = ModelSource.resolve(self.settings, self.registry)
        if source.kind == "promoted":
            log.info("the older global registry %s names %s: it is the base model of every project "
                     "(projects' own versions live in %s)", self.registry.pointer_path, source.path.name,
                     self.registry.root / "projects")
        try:
            serving = self.load(source)
        except ModelLoadError as exc:
            if source.kind != "promoted":
                raise
            log.exception("the promoted model cannot be loaded; falling back to the base model")
            why = str(exc).replace(str(source.path), source.path.name)  # for /health: no paths
            self.problems["*"] = f"the global MODEL_DIR/current model cannot be loaded ({why}); serving the base model"
            serving = self.load(ModelSource.resolve(self.settings, self.registry, promoted=False))
        self._serving = serving
        projects = [p for p in self.registry.project_ids() if self.registry.project(p).pointer()]
        projects.sort(key=lambda p: _mtime(self.registry.project(p).pointer_path), reverse=True)
        for project in projects[: self.settings.max_loaded_project_models]:
            self.for_project(project)
        for project in projects[self.settings.max_loaded_project_models:]:
            self._check_pointer(project)
        return serving

    # -- projects ----------------------------------------------------------
    def loaded(self, project: str | None) -> ServingModel | None:
        """The project's model if it is loaded (or it serves the base): never loads anything."""
        if project is None:
            return self.current
        with self._projects_lock:
            serving = self._projects.get(project)
            if serving is not None:
                return serving
        return self.current if self._models(project) is None or self._models(project).pointer() is None else None

    def for_project(self, project: str | None) -> ServingModel:
        """The model a project serves: its promoted version (loaded now if needed), or the base."""
        serving = self.loaded(project)
        if serving is not None:
            return serving
        assert project is not None
        with self._projects_lock:
            lock = self._project_load_locks.setdefault(project, threading.Lock())
        with lock:  # one load per project, however many requests ask
            serving = self.loaded(project)
            if serving is None:
                serving = self._load_project(project)
                self._remember(project, serving)
        return serving

    def preload(self, project: str | None) -> None:
        """Load the project's model in the background (returns at once; /setup must not wait)."""
        if project is not None and self.loaded(project) is None:
            self._preload_executor.submit(self._preload, project)

    def _preload(self, project: str) -> None:
        try:
            self.for_project(project)
        except Exception:  # the first prediction reports it
            log.exception("could not load project %s's model", project)

    def project_version(self, project: str | None, load_unreadable: bool = True) -> str:
        """The model_version the project serves, from the registry's header, without loading any weights.

        A header that cannot be read means the version is broken: with ``load_unreadable`` the project's model is
        loaded now (which repairs its pointer); without, the pointer's file name is answered.
        """
        serving = self.loaded(project)
        if serving is not None:
            return serving.version
        assert project is not None
        path = self.registry.project(project).current()
        try:
            key = (str(path), path.stat().st_mtime)  # type: ignore[union-attr]
            name = self._version_names.get(key)
            if name is None:
                name = self._version_names[key] = VersionInfo.read(path).version  # type: ignore[arg-type]
            return name
        except (OSError, ValueError, KeyError, AttributeError):
            if not load_unreadable:
                return path.name if path is not None else self.current.version
            return self.for_project(project).version  # unreadable header: load, which repairs the pointer

    def _models(self, project: str) -> ProjectModels | None:
        try:
            return self.registry.project(project)
        except ValueError:
            return None

    def _remember(self, project: str, serving: ServingModel) -> None:
        if serving is self.current:
            return
        with self._projects_lock:
            self._projects.put(project, serving)

    def _unloaded(self, project: str, old: ServingModel) -> None:
        log.info("unloaded project %s's model %s (MAX_LOADED_PROJECT_MODELS=%d)",
                 project, old.version, self.settings.max_loaded_project_models)

    @frees_thread_pool
    def load_project_artifact(self, path: Path) -> ServingModel:
        """Load a project's artifact (checksum verified), sharing the base's image encoder when it is the same."""
        base = self.current
        try:
            expected = (read_artifact_metadata(path).get("checksum") or {}).get("image_encoder")
            base_sum = (base.artifact.checksum or {}).get("image_encoder")
            share = (expected is not None and expected == base_sum
                     and not base.artifact.config.decoder_high_res)  # high-res maps come from the head
            artifact = load_artifact(path, device="cpu", shared_image_encoder=base.artifact.model if share else None)
        except Exception as exc:  # torn file, flipped bytes, not an artifact
            why = str(exc).replace(str(path), path.name)  # the reason goes to /health: a file name, not a path
            raise ModelLoadError(f"cannot load project model {path.name!r}: {why}") from exc
        serving = self._serving_model(artifact, ModelSource("project", path), 0 if share else
                                      self.settings.embedding_cache_bytes)
        if share:  # one byte budget for both; entries keyed apart (the FPN maps in the features are each model's own)
            serving.predictor.cache, serving.owns_cache = base.predictor.cache, False
            serving.predictor.cache_namespace = serving.version
        log.info("loaded project model %s (%s)", serving.version,
                 "sharing the base's image encoder" if share else "with its own image encoder")
        return serving

    def _check_pointer(self, project: str) -> None:
        """A pointer naming a missing file is repaired at start-up (loading the rest waits for their first use)."""
        models = self.registry.project(project)
        path = models.current()
        if path is not None and not path.is_file():
            self._load_project(project)

    def _load_project(self, project: str) -> ServingModel:
        """Load the project's version; on failure set it aside and fall back to the previous good one, or the base."""
        models = self.registry.project(project)
        path = models.current()
        if path is None:
            return self.current
        try:
            return self.load_project_artifact(path) if path.is_file() else _missing(path)
        except ModelLoadError as exc:
            reason = f"project {project}: its model {path.name} cannot be loaded ({exc})"
        log.error("%s; setting it aside", reason)
        models.set_aside(path)
        for older in models.version_paths():
            try:
                serving = self.load_project_artifact(older)
            except ModelLoadError as exc:
                log.error("project %s: %s; setting it aside", project, exc)
                models.set_aside(older)
                continue
            models.point_to(older)
            self.problems[project] = f"{reason}; repaired: now serving its previous version {serving.version}"
            log.error("%s", self.problems[project])
            return serving
        models.point_to(None)
        self.problems[project] = f"{reason}; repaired: now serving the base model {self.current.version}"
        log.error("%s", self.problems[project])
        return self.current

    def install_for_project(self, project: str, new: ServingModel) -> None:
        """Switch the project's served model; its requests in flight finish on the old one."""
        with self._swap_lock:
            with self._projects_lock:
                old = self._projects.get(project)
            self._remember(project, new)
            self.problems.pop(project, None)
        if old is not None and old is not new and old.owns_cache:
            old.predictor.cache.clear()  # in-flight requests keep their own feature references
        log.info("project %s now serves model version %s (was %s)", project, new.version,
                 old.version if old else self.current.version)

    def loaded_projects(self) -> dict[str, dict[str, Any]]:
        """Projects whose own model is loaded now (for /health): version and whether it shares the base's encoder."""
        with self._projects_lock:
            items = self._projects.items()
        return {p: {"version": m.version, "shares_base_image_encoder": not m.owns_cache} for p, m in items}

    def served_versions(self) -> dict[str, str]:
        """Every project with its own version -> that version's name (headers only)."""
        out: dict[str, str] = {}
        for project in self.registry.project_ids():
            if self.registry.project(project).pointer():
                out[project] = self.project_version(project, load_unreadable=False)
        return out

    def versions(self, project: str | None = None) -> list[VersionInfo]:
        """What this backend can serve: the base model and every stored version (of one project, or of all)."""
        infos: list[VersionInfo] = []
        base = self.current
        infos.append(VersionInfo(base.version, base.path, base.loaded_at, base.artifact.metrics,
                                 base.artifact.provenance))
        infos += self.registry.list_versions()
        projects = [project] if project is not None else self.registry.project_ids()
        for p in projects:
            infos += self.registry.project(p).list_versions()
        unique: dict[str, VersionInfo] = {}
        for info in infos:
            unique.setdefault(info.version, info)
        return list(unique.values())

    def load_for_swap(self, path: Path, project: str) -> ServingModel:
        """Load ``path`` for a project and prepare the vocabularies its served model already uses (slow)."""
        new = self.load_project_artifact(path)
        old = self.loaded(project)
        for labels, synonyms in old.known_label_sets() if old is not None else []:
            try:
                new.predictor_for(labels, synonyms)
            except Exception as exc:  # the vocabulary is then built on first use instead
                log.warning("could not prepare vocabulary %s for the new model: %s", labels, exc)
        return new

    def close(self) -> None:
        """Stop the vocabulary and loading threads (work in progress is abandoned)."""
        self.vocabulary_executor.shutdown(wait=False, cancel_futures=True)
        self._preload_executor.shutdown(wait=False, cancel_futures=True)

    def install(self, new: ServingModel) -> None:
        """Switch the base model; requests in flight finish on the old one."""
        with self._swap_lock:
            old, self._serving = self._serving, new
        if old is not None and old is not new:
            old.predictor.cache.clear()  # in-flight requests keep their own feature references
        log.info("now serving model version %s (was %s)", new.version, old.version if old else None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _missing(path: Path) -> ServingModel:
    raise ModelLoadError(f"{path.name} does not exist")
