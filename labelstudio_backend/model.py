"""The ML backend model: ``setup`` / ``predict`` / ``fit`` as in Label Studio's ML backend examples.

``predict`` has two modes, chosen by the request:

* **Interactive** (``params.context.result`` present: a smart keypoint click or
  box): every smart region in the context becomes one prompt, and the answer is
  ONE region (brush RLE, polygon or rectangle, after the project's output
  control) labelled with the recognised class, its score, and the top-k
  alternatives in ``meta``. Bad input raises :class:`RequestError` (a 4xx).
* **Pre-annotation** (no context: "Retrieve Predictions" or opening a task):
  automatic mode over each image; every instance whose class confidence reaches
  ``PREANNOTATION_THRESHOLD`` becomes a region. One result per task, in task
  order. The task ``score`` ranks tasks for active learning: the LOWEST region
  score in the task (region score = mask stability x class probability), and 0
  when nothing was found, so the tasks a human should look at first sort first.
  A task whose image cannot be loaded gets an empty result, a warning and an
  entry in ``/metrics`` ``recent_errors``; the others are still predicted.
  Pre-annotating a task also leaves its image embedding in the cache, so the
  annotator's first click is fast.

A request is split into steps (:class:`PredictPlan`): checking it, waiting for
the project's text embeddings (built on their own thread), downloading a new
image, and model work. The server runs each on its own lane, so a click on an
embedded image never waits behind downloads, vocabulary builds or batches, and
a batch stops when Label Studio has gone. Model work is serialised per device,
with clicks ahead of background work (``lanes.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ovsam.cache import SizedLRU
from ovsam.model import ImageFeatures
from ovsam.predictor import OVSAMPredictor, image_key

from labelstudio_io.client import LabelStudioConflict
from labelstudio_io.images import ImageError, ImageLoader
from labelstudio_io.label_config import LabelConfigError, ProjectSchema, parse_label_config
from labelstudio_io.prompts import InteractivePrompt, PromptError, check_image_size, prompt_from_context
from labelstudio_io.results import schema_mask_result

from . import webhooks
from .bulk import BulkPredictions, post_prediction
from .config import Settings
from .jobs import JobManager, TrainingRunner
from .lanes import background_lane
from .metrics_log import Metrics
from .runtime import ModelLoadError, ModelRuntime, ServingModel

__all__ = ["OVSAMBackend", "PredictPlan", "RequestError", "project_id_of"]

log = logging.getLogger(__name__)

# Image identities (ImageLoader.source_key: URL with Label Studio's origin, local
# file with its size and mtime) whose content key is remembered, so a click on an
# embedded image skips download, decode and hashing.
_MAX_REMEMBERED_URLS = 4096
# Longer URLs (data: URIs carry the whole image) are not remembered: 4096 of them could be gigabytes.
_MAX_REMEMBERED_URL_CHARS = 4096
# Images loaded ahead of the model in pre-annotation (download overlaps inference).
_PREFETCH = 2


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"errors": messages}``."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.status = status
        self.messages = list(messages)


def project_id_of(value: Any) -> str | None:
    """Label Studio names a project ``"<id>.<created_at>"`` in /setup and /predict, or an object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    return text.split(".", 1)[0] or None


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _top_k_meta(top_k: Sequence[Any]) -> dict[str, Any]:
    alternatives = [
        {"label": str(_field(s, "label")), "probability": round(float(_field(s, "probability")), 4)} for s in top_k
    ]
    text = ", ".join(f"{a['label']} {a['probability']:.2f}" for a in alternatives)
    return {"top_k": alternatives, "text": [f"top-{len(alternatives)}: {text}"] if alternatives else []}


@dataclass
class LoadedImage:
    """A pre-annotation task's decoded image, its content key, and its features once a batch has encoded them."""

    source: str
    image: np.ndarray
    key: str
    features: ImageFeatures | None = None


@dataclass
class PredictPlan:
    """A checked ``/predict`` request and what it still needs: vocabulary, image, model work.

    ``prompt`` is None for pre-annotation. ``features`` is set when the clicked
    image is already embedded, so the click needs no download.
    """

    serving: ServingModel
    schema: ProjectSchema
    tasks: list[Mapping[str, Any]]
    prompt: InteractivePrompt | None = None
    chosen_label: str | None = None
    url: str | None = None
    source: str = ""
    features: ImageFeatures | None = None
    image: np.ndarray | None = None
    predictor: OVSAMPredictor | None = None

    @property
    def interactive(self) -> bool:
        return self.prompt is not None

    @property
    def needs_image(self) -> bool:
        return self.interactive and self.features is None and self.image is None


class OVSAMBackend:
    """Label Studio ML backend around the OVSAM predictor."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        images: ImageLoader,
        jobs: JobManager,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.images = images
        self.jobs = jobs
        self.metrics = metrics
        self.training = TrainingRunner(settings, runtime, runtime.registry, images, jobs)
        self.bulk = BulkPredictions(jobs, self.iter_predictions, lambda task_id, p: post_prediction(images, task_id, p),
                                    metrics)
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-io")
        self._url_keys: SizedLRU[str] = SizedLRU(_MAX_REMEMBERED_URLS, lambda _: 1)  # source -> content key
        self._generator_cls: type | None | bool = False  # False = not looked up yet

    @property
    def model_version(self) -> str:
        """The base model's version (what a project without its own trained model serves)."""
        return self.runtime.current.version

    def project_version(self, project: str | None) -> str:
        """The model_version a project sees: its own promoted version, or the base's (no weights loaded)."""
        return self.runtime.project_version(project)

    def close(self) -> None:
        self.training.close()
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- setup ---------------------------------------------------------------
    def setup(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Label Studio's connect / pre-prediction check: must answer in well under 3 s.

        The project's text embeddings are only queued here (see :meth:`warm_vocabulary`).
        """
        hostname, token = body.get("hostname"), body.get("access_token")
        try:
            self.images.client.update_from_setup(
                hostname if isinstance(hostname, str) else None, token if isinstance(token, str) else None
            )
        except LabelStudioConflict as exc:
            raise RequestError(409, str(exc)) from exc
        project = project_id_of(body.get("project"))
        out: dict[str, Any] = {"model_version": self.project_version(project), "status": "ok"}
        self.runtime.preload(project)  # the project's own model, in the background
        xml = body.get("schema")
        if xml is not None:
            schema = self.schema(xml)
            out["labels"] = schema.labels
            out["output"] = schema.output.type
            self.warm_vocabulary(schema, project)
        return out

    def warm_vocabulary(self, schema: ProjectSchema, project: str | None = None) -> None:
        """Queue the project's text embeddings ahead of its first prediction (returns at once).

        On the project's model when it is loaded; else on the base, whose text tower it shares unless trained.
        """
        serving = self.runtime.loaded(project) or self.runtime.current
        future = serving.vocabulary_future(schema.labels, schema.synonyms)
        future.add_done_callback(_log_vocabulary_failure)

    def schema(self, xml: Any) -> ProjectSchema:
        """The project's label config, parsed; configs the backend cannot serve are a 4xx."""
        if not isinstance(xml, str):
            raise RequestError(422, "label config is missing (expected the project's XML as a string)")
        limit = int(self.settings.max_label_config_kb * 1024)
        if len(xml) > limit:
            raise RequestError(
                413, f"label config is {len(xml)} characters, more than the limit of {limit} (MAX_LABEL_CONFIG_KB)"
            )
        try:
            schema = parse_label_config(xml)
        except LabelConfigError as exc:
            raise RequestError(422, f"label config cannot be used: {exc}") from exc
        if len(schema.labels) > self.settings.max_labels:
            raise RequestError(
                422,
                f"the project has {len(schema.labels)} labels; this backend serves at most "
                f"{self.settings.max_labels} (MAX_LABELS): each label's text embedding is computed once, "
                "and more would keep the project waiting for minutes",
            )
        return schema

    # -- predict -------------------------------------------------------------
    def predict(
        self, tasks: Sequence[Mapping[str, Any]], label_config: str, context: Mapping[str, Any] | None = None,
        project: Any = None,
    ) -> dict[str, Any]:
        """Label Studio's ``/predict`` answer for already shape-checked input, in the caller's thread.

        The server runs the same steps (:meth:`plan`, :meth:`vocabulary_future` /
        :meth:`use_vocabulary`, :meth:`load_image`, :meth:`run`) on separate lanes.
        """
        plan = self.plan(tasks, label_config, context, project)
        future = self.vocabulary_future(plan)
        wait([future])
        self.use_vocabulary(plan, future)
        if plan.needs_image:
            self.load_image(plan)
        return self.run(plan)

    def plan(
        self, tasks: Sequence[Mapping[str, Any]], label_config: str, context: Mapping[str, Any] | None = None,
        project: Any = None,
    ) -> PredictPlan:
        """Check a request and find what it needs (no model work, no download; a project's model may load).

        The model is the request's project's (``project``, else its first task's): one for the whole request,
        even if a swap happens meanwhile.
        """
        schema = self.schema(label_config)
        serving = self._serving_for(project, tasks)
        if context is None or "result" not in context:
            return PredictPlan(serving, schema, list(tasks))
        if len(tasks) != 1:
            raise RequestError(422, f"an interactive request needs exactly one task, got {len(tasks)}")
        try:
            prompt = prompt_from_context(context, from_names=schema.prompt_controls or None)
        except PromptError as exc:
            raise RequestError(422, str(exc)) from exc
        plan = PredictPlan(serving, schema, list(tasks), prompt, self._chosen_label(schema, prompt))
        try:
            plan.url = self._image_url(tasks[0], schema)
            plan.source = self.images.source_key(plan.url)  # before any download: see _load_image
            plan.features = self._cached_features(serving, plan.source)
        except (ImageError, ValueError) as exc:
            raise RequestError(422, f"task {tasks[0].get('id')}: {exc}") from exc
        return plan

    def vocabulary_future(self, plan: PredictPlan) -> Future[OVSAMPredictor]:
        """The project's predictor, now or once its text embeddings are built (on the vocabulary thread)."""
        return plan.serving.vocabulary_future(plan.schema.labels, plan.schema.synonyms)

    def vocabulary_pending(self, plan: PredictPlan) -> RequestError:
        """The 503 for a request whose project's text embeddings are still being built."""
        progress = plan.serving.vocabulary_progress(plan.schema.labels, plan.schema.synonyms)
        done = f" ({progress[0]}/{progress[1]} label texts done)" if progress else " (queued behind another project)"
        return RequestError(
            503,
            f"the text embeddings of this project's {len(plan.schema.labels)} labels are being built{done}; "
            "try again in a moment",
        )

    @staticmethod
    def use_vocabulary(plan: PredictPlan, future: Future[OVSAMPredictor]) -> None:
        """Take the finished vocabulary; a text-tower failure is the server's, not the request's."""
        try:
            plan.predictor = future.result(timeout=0)
        except Exception as exc:  # e.g. official weights without a text tower and no network
            log.error("cannot build the vocabulary %s: %s", plan.schema.labels, exc)
            raise RequestError(
                503, f"cannot build text embeddings for the labels {plan.schema.labels}: {exc}"
            ) from exc

    def load_image(self, plan: PredictPlan) -> None:
        """Download and decode the clicked task's image (the one step that waits on the network)."""
        assert plan.url is not None
        try:
            plan.image = self.images.load(plan.url)
        except (ImageError, ValueError) as exc:
            raise RequestError(422, f"task {plan.tasks[0].get('id')}: {exc}") from exc

    def run(
        self, plan: PredictPlan, cancelled: Callable[[], bool] | None = None, deadline: float | None = None
    ) -> dict[str, Any]:
        """The model work of a planned request.

        A batch stops early when ``cancelled()`` turns true (its client is gone); with a ``deadline``
        (``time.monotonic()``) it answers what it computed by then and defers the rest (:meth:`_batch`).
        """
        if plan.predictor is None:
            raise RuntimeError("run() needs the plan's vocabulary (use_vocabulary) first")
        if plan.prompt is not None:
            result = self._interactive(plan)
            self.metrics.count("interactive_predictions")
            results: list[Any] = [result]
        else:
            results = self._batch(plan, cancelled or (lambda: False), deadline)
        return {"results": results, "model_version": plan.serving.version}

    def _interactive(self, plan: PredictPlan) -> dict[str, Any]:
        serving, schema, task, prompt = plan.serving, plan.schema, plan.tasks[0], plan.prompt
        assert prompt is not None and plan.predictor is not None
        features = plan.features
        if features is None:
            if plan.image is None:
                self.load_image(plan)
            assert plan.image is not None and plan.url is not None
            key = image_key(plan.image)
            self._remember(plan.source, key)
            try:
                features = serving.predictor.set_image(plan.image, key=key)
            except ValueError as exc:
                raise RequestError(422, f"task {task.get('id')}: {exc}") from exc
        height, width = features.frame.original_size
        points, box = _scaled_prompt(prompt, width, height)
        try:
            pred = plan.predictor.predict(
                points=points,
                point_labels=prompt.point_labels if points is not None else None,
                box=box,
                top_k=self.settings.top_k,
                features=features,
            )
        except ValueError as exc:
            raise RequestError(422, f"prompt cannot be used: {exc}") from exc
        label = plan.chosen_label or pred.label
        mask = _resize_mask(pred.mask, prompt.width, prompt.height)
        meta = {**_top_k_meta(pred.top_k), "recognised_label": pred.label, "probability": round(pred.probability, 4)}
        region = schema_mask_result(schema, mask, label, pred.score, meta)
        if region is None:
            log.info("task %s: the prompt gave an empty mask; answering no region", task.get("id"))
            return {"result": [], "score": 0.0, "model_version": serving.version}
        region["id"] = _region_id()
        return {"result": [region], "score": float(pred.score), "model_version": serving.version}

    def _chosen_label(self, schema: ProjectSchema, prompt: InteractivePrompt) -> str | None:
        """The annotator's label when RECOGNISED_LABEL_WINS=false, checked against the vocabulary."""
        if self.settings.recognised_label_wins or prompt.chosen_label is None:
            return None
        if prompt.chosen_label not in schema.labels:
            raise RequestError(
                422,
                f"label {prompt.chosen_label!r} picked on the smart tool is not one of the labels of "
                f"{schema.output.name!r} {schema.labels}; give the smart tools the same labels",
            )
        return prompt.chosen_label

    def _batch(self, plan: PredictPlan, cancelled: Callable[[], bool], deadline: float | None) -> list[Any]:
        """Pre-annotation: one answer per task, in order.

        Tasks not computed by ``deadline`` go to the project's background job,
        which posts their predictions to Label Studio (``bulk.py``); so do none
        when Label Studio's address and key are unknown. Their answer, and that
        of tasks a job already holds, is an empty list: Label Studio stores no
        prediction for it (no empty placeholder that would count as predicted).
        """
        project = project_id_of(plan.tasks[0].get("project"))
        can_defer = deadline is not None and project is not None and bool(self.images.client.label_studio_url and self.images.client.api_key)
        held = self.bulk.queued(project) if project is not None else set()
        todo = [i for i, task in enumerate(plan.tasks) if task.get("id") is None or task.get("id") not in held]
        with background_lane():
            done = self._preannotate(plan, [plan.tasks[i] for i in todo], cancelled, deadline if can_defer else None)
        answers: list[Any] = [[] for _ in plan.tasks]
        for i, result in zip(todo, done):
            answers[i] = result
        rest = [plan.tasks[i] for i in todo[len(done):]]
        if rest and not cancelled() and project is not None:
            job = self.bulk.defer(project, plan.schema, rest)
            log.info("batch of %d tasks: %d answered now, %d handed to job %s", len(plan.tasks), len(done), len(rest), job.id)
            self.metrics.count("tasks_deferred", len(rest))
        return answers

    def _preannotate(
        self,
        plan: PredictPlan,
        tasks: Sequence[Mapping[str, Any]],
        cancelled: Callable[[], bool],
        deadline: float | None,
    ) -> list[dict[str, Any]]:
        """Answers for the first tasks, up to the end, ``cancelled()`` or ``deadline``."""
        serving, schema = plan.serving, plan.schema
        assert plan.predictor is not None
        generator = self._generator(plan.predictor)
        results: list[dict[str, Any]] = []
        def stop() -> bool:  # past the deadline, at least one task is still answered: every request makes progress
            return cancelled() or (deadline is not None and len(results) > 0 and time.monotonic() >= deadline)

        with contextlib.closing(self._loaded(serving, schema, tasks, _PREFETCH, stop)) as loaded:
            for task, item in loaded:
                if stop():
                    break  # closing `loaded` cancels the downloads nobody will use
                try:
                    if isinstance(item, Exception):
                        raise item
                    results.append(self._predict_image(serving, schema, generator, item))
                except (ImageError, ValueError) as exc:  # this task's image; the others go on
                    log.warning("task %s: no prediction: %s", task.get("id"), exc)
                    self.metrics.count("tasks_failed")
                    self.metrics.record_error(f"no prediction: {exc}", task=task.get("id"), project=task.get("project"))
                    results.append({"result": [], "score": 0.0, "model_version": serving.version})
        if len(results) < len(tasks) and cancelled():  # Label Studio gave up on this request: nobody gets the rest
            log.warning("batch of %d tasks abandoned by its client after %d; stopping", len(tasks), len(results))
            self.metrics.count("batches_abandoned")
        return results

    def _serving_for(self, project: Any, tasks: Sequence[Mapping[str, Any]]) -> ServingModel:
        pid = project_id_of(project) or (project_id_of(tasks[0].get("project")) if tasks else None)
        try:
            return self.runtime.for_project(pid)
        except ModelLoadError as exc:
            raise RequestError(503, f"project {pid}'s model cannot be loaded: {exc}") from exc

    def iter_predictions(
        self, tasks: Sequence[Mapping[str, Any]], schema: ProjectSchema, prefetch: int = 4, project: Any = None
    ) -> Iterator[tuple[Mapping[str, Any], dict[str, Any] | Exception]]:
        """Each task's pre-annotation (or why it failed) with the project's model served now, in task order.

        Images of the next ``prefetch`` tasks download and decode while the model works (bulk command).
        """
        serving = self._serving_for(project, tasks)
        generator = self._generator(serving.predictor_for(schema.labels, schema.synonyms))
        with contextlib.closing(self._loaded(serving, schema, tasks, prefetch)) as loaded:
            for task, item in loaded:
                try:
                    if isinstance(item, Exception):
                        raise item
                    yield task, self._predict_image(serving, schema, generator, item)
                except (ImageError, ValueError) as exc:
                    self.metrics.count("tasks_failed")
                    yield task, exc

    def _loaded(
        self, serving: ServingModel, schema: ProjectSchema, tasks: Sequence[Mapping[str, Any]], prefetch: int,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[Mapping[str, Any], LoadedImage | Exception]]:
        """Each task's image (or why it has none), in task order, downloading ahead of the model.

        With ``PREDICT_BATCH_IMAGES`` > 1 (a GPU's default) the images of each group of that many tasks are encoded
        in one batch before the first of them is predicted; on the CPU one by one, as the predictions need them.
        ``stop()`` is asked before each group is waited for (a request past its deadline, or given up by Label
        Studio, does not wait for another download); closing the iterator cancels the downloads nobody will use.
        """
        size = max(self.settings.batch_images, 1)
        loads = _prefetch(tasks, lambda t: self._load_image(t, schema), self._io, max(prefetch, size))
        pairs = zip(tasks, loads)
        try:
            while not stop() and (group := list(itertools.islice(pairs, size))):
                items: list[tuple[Mapping[str, Any], LoadedImage | Exception]] = []
                for task, future in group:
                    try:
                        source, image = future.result()
                        items.append((task, LoadedImage(source, image, image_key(image))))
                    except (ImageError, ValueError) as exc:
                        items.append((task, exc))
                if size > 1:
                    self._encode_group(serving, [item for _, item in items if isinstance(item, LoadedImage)])
                yield from items
        finally:
            loads.close()

    def _encode_group(self, serving: ServingModel, group: list[LoadedImage]) -> None:
        """One batch for the group's images; if it fails, each task encodes its own image and fails alone."""
        if not group:
            return
        try:
            features = serving.predictor.set_images([i.image for i in group], [i.key for i in group])
        except Exception as exc:  # noqa: BLE001 - the per-task path reports each task's own error
            log.warning("encoding %d images in one batch failed (%s: %s); encoding them one by one",
                        len(group), type(exc).__name__, exc)
            return
        for item, feats in zip(group, features):
            item.features = feats

    def _predict_image(
        self, serving: ServingModel, schema: ProjectSchema, generator: Any, loaded: LoadedImage
    ) -> dict[str, Any]:
        self._remember(loaded.source, loaded.key)
        # also makes the annotator's first click fast: the features stay in the embedding cache
        features = loaded.features or serving.predictor.set_image(loaded.image, key=loaded.key)
        instances = generator.generate(features) if generator is not None else []
        regions, scores = self._regions(schema, instances)
        self.metrics.count("tasks_predicted")
        return {"result": regions, "score": min(scores) if scores else 0.0, "model_version": serving.version}

    def _regions(self, schema: ProjectSchema, instances: Sequence[Any]) -> tuple[list[dict[str, Any]], list[float]]:
        regions: list[dict[str, Any]] = []
        scores: list[float] = []
        threshold = self.settings.preannotation_threshold
        for inst in instances[: self.settings.preannotation_max_regions]:
            probability = float(_field(inst, "probability", 0.0))
            if probability < threshold:
                continue
            score = float(_field(inst, "score", probability))
            meta = {**_top_k_meta(_field(inst, "top_k", []) or []), "probability": round(probability, 4)}
            region = schema_mask_result(schema, _field(inst, "mask"), str(_field(inst, "label")), score, meta)
            if region is not None:
                region["id"] = _region_id()
                regions.append(region)
                scores.append(score)
        return regions, scores

    def _generator(self, predictor: OVSAMPredictor) -> Any:
        """ovsam.automatic's generator for this predictor, or None (logged once) if unavailable."""
        if self._generator_cls is False:
            try:
                from ovsam.automatic import AutomaticMaskGenerator

                self._generator_cls = AutomaticMaskGenerator
            except ImportError as exc:
                log.warning("automatic mode is unavailable (%s): pre-annotations will be empty", exc)
                self._generator_cls = None
        if self._generator_cls is None:
            return None
        return self._generator_cls(predictor, self._automatic_config())

    def _automatic_config(self) -> Any:
        try:
            from ovsam.automatic import AutomaticConfig
        except ImportError:
            return None
        wanted = {
            "confidence_threshold": self.settings.preannotation_threshold,
            "max_instances": self.settings.preannotation_max_regions,
            "points_per_side": self.settings.auto_points_per_side,
            "stability_threshold": self.settings.auto_stability_threshold,
            "min_support": self.settings.auto_min_support,
            "top_k": self.settings.top_k,
        }
        names = {f.name for f in dataclasses.fields(AutomaticConfig)}
        return AutomaticConfig(**{k: v for k, v in wanted.items() if k in names})

    # -- images and embeddings ------------------------------------------------
    def _image_url(self, task: Mapping[str, Any], schema: ProjectSchema) -> str:
        data = task.get("data")
        url = data.get(schema.image_value_key) if isinstance(data, Mapping) else None
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {task.get('id')} has no image in data[{schema.image_value_key!r}]")
        return url

    def _load_image(self, task: Mapping[str, Any], schema: ProjectSchema) -> tuple[str, np.ndarray]:
        """The task's image and its identity, taken before loading (a file replaced meanwhile is then a miss)."""
        url = self._image_url(task, schema)
        source = self.images.source_key(url)
        return source, self.images.load(url)

    def _remember(self, source: str, key: str) -> None:
        """Remember that the image identified by ``source`` (``ImageLoader.source_key``) has content ``key``."""
        if len(source) > _MAX_REMEMBERED_URL_CHARS:
            return
        self._url_keys.put(source, key)

    def _cached_features(self, serving: ServingModel, source: str) -> ImageFeatures | None:
        """The embedding of the image ``source`` names, if it was embedded before and is still cached."""
        key = self._url_keys.get(source)
        return serving.predictor.cached_features(key) if key is not None else None

    # -- fit -----------------------------------------------------------------
    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Webhook events: START_TRAINING starts a background job; everything else is acknowledged."""
        if event != "START_TRAINING":
            self.metrics.count(webhooks.counter_name(event))
            return {"status": "ignored", "action": webhooks.echo(event)}
        project = data.get("project")
        project_id = project_id_of(project)
        xml = project.get("label_config") if isinstance(project, Mapping) else None
        if project_id is None:
            raise RequestError(400, "START_TRAINING needs 'project' with an 'id'")
        return self.start_training(project_id, xml, None)

    def start_training(self, project_id: str, xml: Any, tasks: list[Any] | None) -> dict[str, Any]:
        """Queue a training job for this project only; a busy project answers with its job's state at once."""
        self.schema(xml)  # a config the backend cannot use cannot be trained on either
        try:
            job, started = self.training.start(project_id, xml, tasks)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from exc
        if not started:
            return {
                "status": f"already_{job.status}",
                "job": job.id,
                "state": job.status,
                "message": f"training job {job.id} is already {job.status} for project {project_id}",
            }
        return {"status": "ok", "job": job.id, "state": job.status}


def _log_vocabulary_failure(future: Future[OVSAMPredictor]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not build a project's text embeddings: %s", future.exception())


def _scaled_prompt(prompt: InteractivePrompt, width: int, height: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The prompt in pixels of the loaded image (Label Studio's size can differ, e.g. a re-encoded file).

    A claimed size the image cannot explain is a 422: the answer is drawn at the claimed size.
    """
    try:
        check_image_size(prompt.width, prompt.height, width, height)
    except PromptError as exc:
        raise RequestError(422, str(exc)) from exc
    sx, sy = width / prompt.width, height / prompt.height
    if (sx, sy) != (1.0, 1.0):
        log.warning(
            "prompt drawn on %dx%d but the image is %dx%d; scaling the prompt",
            prompt.width, prompt.height, width, height,
        )
    points = prompt.points * [sx, sy] if prompt.has_points else None
    box = prompt.box * [sx, sy, sx, sy] if prompt.box is not None else None
    return points, box


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """The mask at Label Studio's ``original_width`` x ``original_height`` (it decodes RLE at that size)."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def _prefetch(
    tasks: Sequence[Mapping[str, Any]],
    load: Callable[[Mapping[str, Any]], np.ndarray],
    pool: ThreadPoolExecutor,
    window: int,
) -> Iterator[Future[np.ndarray]]:
    """Futures of ``load(task)`` in task order, at most ``window`` running ahead of the consumer."""
    pending: deque[Future[np.ndarray]] = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(load, task))
            if len(pending) > window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # the consumer stopped early: loads nobody will use are not started
        for future in pending:
            future.cancel()
