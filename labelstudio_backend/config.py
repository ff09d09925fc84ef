"""Backend settings, read once from the environment.

Label Studio ML backends are configured through environment variables (a
container or a compose file sets them), so every knob lives here with its
default and is validated at start-up: a typo fails loudly instead of serving
with a silent default.

Environment variables (see also ``images.ImageLoaderConfig`` for image download
limits and the outbound policy: ``IMAGE_MAX_BYTES``, ``IMAGE_MAX_PIXELS``,
``IMAGE_TIMEOUT_S``, ``IMAGE_CACHE_BYTES``, ``IMAGE_MAX_DOWNLOADS``,
``ALLOWED_IMAGE_HOSTS``, ``LOCAL_FILES_DOCUMENT_ROOT``):

==========================  ==============================================================
``LABEL_STUDIO_URL``        Label Studio's address (alias ``LABEL_STUDIO_HOST``), for
                            ``/data/upload/...`` images and the training export. Unset:
                            the first ``/setup`` hostname (warned at start-up).
``LABEL_STUDIO_API_KEY``    legacy token or personal access token (alias
                            ``LABEL_STUDIO_ACCESS_TOKEN``); sent only to ``LABEL_STUDIO_URL``.
``MODEL_DIR``               model registry: ``projects/<id>/versions`` + ``current`` per project,
                            job records in ``jobs/`` (default ``./models``).
``OVSAM_CHECKPOINT``        base model: an artifact file or official weights (file or dir).
                            Served unless ``MODEL_DIR/current`` names a promoted version.
``DEVICE``                  ``cuda``, ``cuda:1``, ``cpu`` (default: ``cuda`` if available).
``PRECISION``               ``bf16`` (default: bfloat16 autocast on CUDA, faster) or ``fp32``
                            (the reference's numerics); the CPU always computes in fp32.
``ENCODER_RUNTIME``         ``auto`` (default: the ONNX export run by OpenVINO on CPU once the model's image encoder
                            is exported and verified equal to PyTorch, PyTorch on GPU),
                            ``torch`` or ``onnx``. The export runs in the background at
                            start-up (seconds for the demo model, about a minute for the
                            official one; cached beside the model) while PyTorch serves.
``BASIC_AUTH_USER``/``_PASS``  HTTP basic auth on every endpoint (both or neither).
``LOG_LEVEL``               ``DEBUG``/``INFO``/``WARNING``/... (default ``INFO``).
``TRAINING_OPTIONS``        JSON object of fine-tuning overrides for START_TRAINING jobs,
                            e.g. ``{"epochs": 4, "batch_size": 1}`` (FinetuneConfig fields;
                            ``gate_tolerance`` sets the promotion gate's tolerance).
``MAX_TRAINING_JOBS``       training processes running at once (default 1); more jobs queue.
``TRAINING_TIMEOUT_S``      a training process still running after this is killed and its job
                            fails (default 21600).
``JOBS_KEEP``               job folders kept per project (default 5); older ones are deleted
                            with their unpromoted candidates (job records are kept).
``MAX_LOADED_PROJECT_MODELS``  projects' own trained models kept loaded (default 4; least
                            recently used first out); they share the base's image encoder.
``RECOGNISED_LABEL_WINS``   ``true`` (default): a click's region gets the recognised class
                            even when the annotator picked another label on the smart
                            tool; ``false``: the annotator's label wins.
``PREANNOTATION_THRESHOLD`` minimum class confidence of an automatic-mode instance to
                            become a pre-annotation region (default 0.7, tuned with the demo model
                            on synthetic data, bench/README.md; lower it for a model whose
                            class probabilities spread over many labels).
``PREANNOTATION_MAX_REGIONS``  most regions per task in pre-annotation (default 100).
``AUTO_POINTS_PER_SIDE``    point grid of automatic mode (default 16).
``AUTO_STABILITY_THRESHOLD``  minimum mask stability of an automatic-mode instance (as SAM's
                            ``stability_score_thresh``; default 0.7, tuned with the demo model,
                            whose masks are softer than SAM's; SAM itself uses 0.95).
``AUTO_MIN_SUPPORT``        share of the grid prompts inside a mask that must give the same mask
                            for it to become a region (default 0.6; 0 turns the vote off).
``EMBEDDING_CACHE_MB``      image-embedding cache size (default 1024).
``TOP_K``                   alternatives reported in a region's ``meta`` (default 5).
``PREDICT_WORKERS``         threads for interactive clicks (default 8); model work in
                            them is still serialised per device, and a click gets the
                            device before any waiting background work.
``PREANNOTATE_WORKERS``     pre-annotation (batch) requests run at once (default 2), on
                            threads of their own; more wait without holding a thread.
``IMAGE_DOWNLOAD_WORKERS``  threads downloading images for clicks on images not embedded
                            yet (default 4); clicks on embedded images never wait for them.
``PREDICT_BATCH_BUDGET_S``  a pre-annotation request answers what it computed within this
                            time (default 60; Label Studio waits 100 s) and, when Label
                            Studio's URL and key are known, posts the rest from a
                            background job (``/jobs``) through its API; 0 = no budget.
``PREDICT_BATCH_IMAGES``    images encoded in one batch by pre-annotation (requests, jobs and the
                            ``preannotate`` command); default 4 on a GPU, 1 on the CPU, where a batch
                            does not pay (the exported encoder takes one image at a time).
``LEGACY_TRAIN``            ``true`` enables ``POST /train``, Label Studio's training call when
                            its START_TRAINING webhook flag is off, whose body carries the
                            annotations to train on; off by default (404): anyone reaching the
                            backend could otherwise train and promote a model on annotations
                            of their own. START_TRAINING exports them from Label Studio.
``MAX_LABELS``              most labels a project may have (default 2000); more is a 422
                            at /setup and /predict instead of minutes of text embedding.
``MAX_LABEL_CONFIG_KB``     largest label config accepted (default 1024).
``VOCABULARY_WAIT_S``       how long a request waits for its project's text embeddings
                            being built before it gets a 503 with the progress (default 20).
``MAX_REQUEST_MB``          largest request body accepted (default 64), chunked or not:
                            reading stops at the limit with 413.
``REQUEST_BODY_TIMEOUT_S``  the whole request body must arrive within this time (default
                            30), or the request gets 408 and the connection is closed: a
                            client announcing more than it sends cannot hold a worker.
``LABEL_CONFIG_CACHE_MB``   parsed label configs kept, in MB of XML (default 16); a config
                            larger than a quarter of it is parsed on every request instead.
==========================  ==============================================================
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Settings", "SettingsError"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}


class SettingsError(ValueError):
    """An environment variable has an unusable value (message names it)."""


def _get(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def _number(env: Mapping[str, str], name: str, default: float, *, low: float, high: float | None = None) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a number") from exc
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise SettingsError(f"{name}={raw!r} must be {bound}")
    return value


def _json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    raw = _get(env, name)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SettingsError(f"{name} must be a JSON object")
    return value


def _precision(env: Mapping[str, str]) -> str:
    value = (_get(env, "PRECISION") or "bf16").lower()
    if value not in ("bf16", "fp32"):
        raise SettingsError(f"PRECISION={value!r} is not bf16 or fp32")
    return value


def _encoder_runtime(env: Mapping[str, str]) -> str:
    value = (_get(env, "ENCODER_RUNTIME") or "auto").lower()
    if value not in ("auto", "torch", "onnx"):
        raise SettingsError(f"ENCODER_RUNTIME={value!r} is not auto, torch or onnx")
    return value


def _default_device() -> str:
    import torch  # deferred: settings are read before anything heavy is needed

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from the environment (see the module docstring)."""

    model_dir: Path = Path("models")
    checkpoint: str | None = None
    device: str = "cpu"
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    log_level: str = "INFO"
    recognised_label_wins: bool = True
    preannotation_threshold: float = 0.7
    preannotation_max_regions: int = 100
    auto_points_per_side: int = 16
    auto_stability_threshold: float = 0.7
    auto_min_support: float = 0.6
    embedding_cache_mb: float = 1024.0
    top_k: int = 5
    predict_workers: int = 8
    preannotate_workers: int = 2
    image_download_workers: int = 4
    predict_batch_budget_s: float = 60.0
    predict_batch_images: int = 0  # 0: the device's default (`batch_images`)
    legacy_train: bool = False
    max_labels: int = 2000
    max_label_config_kb: float = 1024.0
    vocabulary_wait_s: float = 20.0
    max_request_mb: float = 64.0
    request_body_timeout_s: float = 30.0
    label_config_cache_mb: float = 16.0
    precision: str = "bf16"
    training_options: dict[str, Any] = field(default_factory=dict)
    max_training_jobs: int = 1
    training_timeout_s: float = 21600.0
    jobs_keep: int = 5
    max_loaded_project_models: int = 4
    encoder_runtime: str = "auto"

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user is None:
            return None
        return self.basic_auth_user, self.basic_auth_pass or ""

    @property
    def batch_images(self) -> int:
        """Images a pre-annotation batch encodes at once: PREDICT_BATCH_IMAGES, else 4 on a GPU and 1 on the CPU."""
        if self.predict_batch_images:
            return self.predict_batch_images
        return 4 if self.device.startswith("cuda") else 1

    @property
    def embedding_cache_bytes(self) -> int:
        return int(self.embedding_cache_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def label_config_cache_bytes(self) -> int:
        return int(self.label_config_cache_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        user = _get(env, "BASIC_AUTH_USER")
        password = _get(env, "BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        level = (_get(env, "LOG_LEVEL") or "INFO").upper()
        if level not in _LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL={level!r} is not one of {sorted(_LOG_LEVELS)}")
        return cls(
            model_dir=Path(_get(env, "MODEL_DIR") or "models"),
            checkpoint=_get(env, "OVSAM_CHECKPOINT"),
            device=_get(env, "DEVICE") or _default_device(),
            basic_auth_user=user,
            basic_auth_pass=password,
            log_level=level,
            recognised_label_wins=_bool(env, "RECOGNISED_LABEL_WINS", True),
            preannotation_threshold=_number(env, "PREANNOTATION_THRESHOLD", 0.7, low=0.0, high=1.0),
            preannotation_max_regions=int(_number(env, "PREANNOTATION_MAX_REGIONS", 100, low=1)),
            auto_points_per_side=int(_number(env, "AUTO_POINTS_PER_SIDE", 16, low=1, high=128)),
            auto_stability_threshold=_number(env, "AUTO_STABILITY_THRESHOLD", 0.7, low=0.0, high=1.0),
            auto_min_support=_number(env, "AUTO_MIN_SUPPORT", 0.6, low=0.0, high=100.0),
            embedding_cache_mb=_number(env, "EMBEDDING_CACHE_MB", 1024.0, low=0.0),
            top_k=int(_number(env, "TOP_K", 5, low=1, high=100)),
            predict_workers=int(_number(env, "PREDICT_WORKERS", 8, low=1, high=256)),
            preannotate_workers=int(_number(env, "PREANNOTATE_WORKERS", 2, low=1, high=64)),
            image_download_workers=int(_number(env, "IMAGE_DOWNLOAD_WORKERS", 4, low=1, high=64)),
            predict_batch_budget_s=_number(env, "PREDICT_BATCH_BUDGET_S", 60.0, low=0.0),
            predict_batch_images=int(_number(env, "PREDICT_BATCH_IMAGES", 0, low=0, high=64)),
            legacy_train=_bool(env, "LEGACY_TRAIN", False),
            max_labels=int(_number(env, "MAX_LABELS", 2000, low=1)),
            max_label_config_kb=_number(env, "MAX_LABEL_CONFIG_KB", 1024.0, low=1.0),
            vocabulary_wait_s=_number(env, "VOCABULARY_WAIT_S", 20.0, low=0.0),
            max_request_mb=_number(env, "MAX_REQUEST_MB", 64.0, low=0.001),
            request_body_timeout_s=_number(env, "REQUEST_BODY_TIMEOUT_S", 30.0, low=0.1, high=3600.0),
            label_config_cache_mb=_number(env, "LABEL_CONFIG_CACHE_MB", 16.0, low=0.0),
            precision=_precision(env),
            training_options=_json_object(env, "TRAINING_OPTIONS"),
            max_training_jobs=int(_number(env, "MAX_TRAINING_JOBS", 1, low=1, high=64)),
            training_timeout_s=_number(env, "TRAINING_TIMEOUT_S", 21600.0, low=1.0),
            jobs_keep=int(_number(env, "JOBS_KEEP", 5, low=1)),
            max_loaded_project_models=int(_number(env, "MAX_LOADED_PROJECT_MODELS", 4, low=1, high=1024)),
            encoder_runtime=_encoder_runtime(env),
        )


def settings_or_report() -> Settings | None:
    """The environment's settings, or None after printing why they are wrong (the commands then exit 2)."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return None
