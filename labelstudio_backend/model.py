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
  A task whose image cannot be loaded gets an empty result and a warning; the
  others are still predicted. Pre-annotating a task also leaves its image
  embedding in the cache, so the annotator's first click is fast.

Model work runs in the caller's thread (the server uses a worker pool); the
predictor serialises it per device.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from ovsam.model import ImageFeatures
from ovsam.predictor import OVSAMPredictor, image_key

from .config import Settings
from .images import ImageError, ImageLoader, LabelStudioConflict
from .jobs import JobManager, TrainingRunner
from .label_config import LabelConfigError, ProjectSchema, parse_label_config
from .metrics_log import Metrics
from .prompts import InteractivePrompt, PromptError, prompt_from_context
from .results import schema_mask_result
from .runtime import ModelRuntime, ServingModel

__all__ = ["OVSAMBackend", "RequestError", "project_id_of"]

log = logging.getLogger(__name__)

# Image identities (ImageLoader.source_key: URL with Label Studio's origin, local
# file with its size and mtime) whose content key is remembered, so a click on an
# embedded image skips download, decode and hashing.
_MAX_REMEMBERED_URLS = 4096
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
        self.training = TrainingRunner(runtime, runtime.registry, images)
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-io")
        self._url_keys: OrderedDict[str, str] = OrderedDict()
        self._url_lock = threading.Lock()
        self._generator_cls: type | None | bool = False  # False = not looked up yet

    @property
    def model_version(self) -> str:
        return self.runtime.current.version

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- setup ---------------------------------------------------------------
    def setup(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Label Studio's connect / pre-prediction check: must answer in well under 3 s."""
        hostname, token = body.get("hostname"), body.get("access_token")
        try:
            self.images.update_from_setup(
                hostname if isinstance(hostname, str) else None, token if isinstance(token, str) else None
            )
        except LabelStudioConflict as exc:
            raise RequestError(409, str(exc)) from exc
        out: dict[str, Any] = {"model_version": self.model_version, "status": "ok"}
        xml = body.get("schema")
        if xml is not None:
            schema = self.schema(xml)
            out["labels"] = schema.labels
            out["output"] = schema.output.type
        return out

    def warm_vocabulary(self, xml: Any) -> None:
        """Build the project's vocabulary ahead of its first prediction (bad configs are left to /predict)."""
        try:
            self._predictor(self.runtime.current, self.schema(xml))
        except RequestError as exc:
            log.debug("vocabulary not prepared: %s", exc)

    @staticmethod
    def schema(xml: Any) -> ProjectSchema:
        if not isinstance(xml, str):
            raise RequestError(422, "label config is missing (expected the project's XML as a string)")
        try:
            return parse_label_config(xml)
        except LabelConfigError as exc:
            raise RequestError(422, f"label config cannot be used: {exc}") from exc

    @staticmethod
    def _predictor(serving: ServingModel, schema: ProjectSchema) -> OVSAMPredictor:
        """The predictor for the project's labels; a text-tower failure is the server's, not the request's."""
        try:
            return serving.predictor_for(schema.labels, schema.synonyms)
        except Exception as exc:  # e.g. official weights without a text tower and no network
            log.exception("cannot build the vocabulary %s", schema.labels)
            raise RequestError(503, f"cannot build text embeddings for the labels {schema.labels}: {exc}") from exc

    # -- predict -------------------------------------------------------------
    def predict(
        self, tasks: Sequence[Mapping[str, Any]], label_config: str, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Label Studio's ``/predict`` answer for already shape-checked input."""
        schema = self.schema(label_config)
        serving = self.runtime.current  # one model for the whole request, even if a swap happens
        if context is not None and "result" in context:
            if len(tasks) != 1:
                raise RequestError(422, f"an interactive request needs exactly one task, got {len(tasks)}")
            results = [self._interactive(serving, schema, tasks[0], context)]
            self.metrics.count("interactive_predictions")
        else:
            results = self._preannotate(serving, schema, tasks)
        return {"results": results, "model_version": serving.version}

    def _interactive(
        self, serving: ServingModel, schema: ProjectSchema, task: Mapping[str, Any], context: Mapping[str, Any]
    ) -> dict[str, Any]:
        try:
            prompt = prompt_from_context(context, from_names=schema.prompt_controls or None)
        except PromptError as exc:
            raise RequestError(422, str(exc)) from exc
        chosen = self._chosen_label(schema, prompt)
        predictor = self._predictor(serving, schema)
        try:
            features = self._features(serving, task, schema)
        except (ImageError, ValueError) as exc:
            raise RequestError(422, f"task {task.get('id')}: {exc}") from exc
        height, width = features.frame.original_size
        points, box = _scaled_prompt(prompt, width, height)
        try:
            pred = predictor.predict(
                points=points,
                point_labels=prompt.point_labels if points is not None else None,
                box=box,
                top_k=self.settings.top_k,
                features=features,
            )
        except ValueError as exc:
            raise RequestError(422, f"prompt cannot be used: {exc}") from exc
        label = chosen or pred.label
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

    def _preannotate(
        self, serving: ServingModel, schema: ProjectSchema, tasks: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        generator = self._generator(self._predictor(serving, schema))
        results: list[dict[str, Any]] = []
        loads = _prefetch(tasks, lambda t: self._load_image(t, schema), self._io, _PREFETCH)
        for task, future in zip(tasks, loads):
            empty = {"result": [], "score": 0.0, "model_version": serving.version}
            try:
                image = future.result()
                key = image_key(image)
                self._remember(task, schema, key)
                features = serving.predictor.set_image(image, key=key)
            except (ImageError, ValueError) as exc:  # this task's image; the others go on
                log.warning("task %s: no prediction: %s", task.get("id"), exc)
                self.metrics.count("tasks_failed")
                results.append(empty)
                continue
            instances = generator.generate(features) if generator is not None else []
            regions, scores = self._regions(schema, instances)
            results.append({"result": regions, "score": min(scores) if scores else 0.0, "model_version": serving.version})
            self.metrics.count("tasks_predicted")
        return results

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

    def _load_image(self, task: Mapping[str, Any], schema: ProjectSchema) -> np.ndarray:
        return self.images.load(self._image_url(task, schema))

    def _remember(self, task: Mapping[str, Any], schema: ProjectSchema, key: str) -> None:
        source = self.images.source_key(self._image_url(task, schema))  # changes when the image does
        with self._url_lock:
            self._url_keys[source] = key
            self._url_keys.move_to_end(source)
            while len(self._url_keys) > _MAX_REMEMBERED_URLS:
                self._url_keys.popitem(last=False)

    def _features(self, serving: ServingModel, task: Mapping[str, Any], schema: ProjectSchema) -> ImageFeatures:
        """The task image's embedding: from the cache when this image (``source_key``) was embedded before."""
        url = self._image_url(task, schema)
        source = self.images.source_key(url)
        with self._url_lock:
            key = self._url_keys.get(source)
        if key is not None:
            cached = serving.predictor.cache.get(key)
            if cached is not None:
                return cached
        image = self.images.load(url)
        key = image_key(image)
        self._remember(task, schema, key)
        return serving.predictor.set_image(image, key=key)

    # -- fit -----------------------------------------------------------------
    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Webhook events: START_TRAINING starts a background job; everything else is acknowledged."""
        if event != "START_TRAINING":
            self.metrics.count(f"webhook_{event.lower()}" if event else "webhook_unknown")
            return {"status": "ignored", "action": event}
        project = data.get("project")
        project_id = project_id_of(project)
        xml = project.get("label_config") if isinstance(project, Mapping) else None
        if project_id is None:
            raise RequestError(400, "START_TRAINING needs 'project' with an 'id'")
        return self.start_training(project_id, xml, None)

    def start_training(self, project_id: str, xml: Any, tasks: list[Any] | None) -> dict[str, Any]:
        self.schema(xml)  # a config the backend cannot use cannot be trained on either
        job, started = self.jobs.start(project_id, self.training.job(project_id, xml, tasks))
        if not started:
            return {
                "status": "already_running",
                "job": job.id,
                "message": f"training job {job.id} is already running for project {project_id}",
            }
        return {"status": "ok", "job": job.id}


def _scaled_prompt(prompt: InteractivePrompt, width: int, height: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The prompt in pixels of the loaded image (Label Studio's size can differ, e.g. a re-encoded file)."""
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
    upcoming = iter(tasks)
    for task in upcoming:
        pending.append(pool.submit(load, task))
        if len(pending) > window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
