"""The backend's training job: Label Studio export -> fine-tune -> evaluate both models -> gate -> registry.

`run_training_job` is what the backend's job runner calls (never inside a request). It trains from the
given base model, evaluates the candidate and the model MODEL_DIR currently serves on the same
held-out tasks with the project's vocabulary, and promotes the candidate only if the gate
(`training.gate`) allows it. Everything the run writes goes to
MODEL_DIR/jobs/project-<id>/<version>/ (checkpoints, logs, the candidate artifact); a candidate that
passes the gate is copied into MODEL_DIR/versions/ through the backend's `ModelRegistry`. Pointing
MODEL_DIR/current at it is the backend's move (it loads the model first, then promotes and swaps it
in); pass `registrar=training.gate.registry_promote` to do both here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from training.gate import DEFAULT_TOLERANCE, Registrar, decide, register, registry_add, serving_artifact

ProgressFn = Callable[[Dict[str, Any]], None]

# Defaults of a backend job; `options` of run_training_job overrides any FinetuneConfig field.
JOB_DEFAULTS: Dict[str, Any] = {
    "epochs": 12,
    "batch_size": 2,
    "val_fraction": 0.2,
    "progress": False,
}


def _safe(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "project"


def _job_dir(model_dir: Path, project_id: int | str, version: str) -> Path:
    return model_dir / "jobs" / f"project-{_safe(project_id)}" / _safe(version)


def _unique_version(version: str, model_dir: Path, project_id: int | str) -> str:
    """Two jobs started within the same second must not share a version (or overwrite each other)."""
    candidate, n = version, 1
    while (model_dir / "versions" / f"{_safe(candidate)}.safetensors").exists() or \
            _job_dir(model_dir, project_id, candidate).exists():
        n += 1
        candidate = f"{version}-{n}"
    return candidate


def run_training_job(
    export_tasks: List[dict],
    label_config: str,
    base_artifact_path: str,
    model_dir: str,
    project_id: int | str,
    on_progress: Optional[ProgressFn] = None,
    *,
    options: Optional[Dict[str, Any]] = None,
    image_loader: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    registrar: Registrar = registry_add,
) -> Dict[str, Any]:
    """Fine-tune on a project's annotations and promote the result if it is not worse than what is served.

    export_tasks: Label Studio's JSON export (task list); label_config: the project's XML (vocabulary
    and image key); base_artifact_path: the model to fine-tune from (artifact or official weights);
    model_dir: the registry root (MODEL_DIR). `image_loader` (anything with `.load(url) -> RGB array`,
    e.g. the backend's ImageLoader, which knows Label Studio's address and token) reads task images;
    by default one is configured from the environment.

    Returns {"artifact" (= "artifact_path"), "promoted", "version", "metrics", "serving_metrics", "gate",
    ...}; the artifact is the registered path in MODEL_DIR/versions when promoted, else the candidate in
    the job folder. Progress events are
    dicts with "stage" ('load', 'train', 'evaluate', 'gate', 'done') and "progress" in [0, 1].
    """
    from ovsam.artifact import save_artifact
    from training.dataset import keep_loadable, load_training_data, make_image_source
    from training.evaluate import evaluate_model
    from training.classifier import classifier_vocabulary, reference_classifier
    from training.finetune import finetune
    from training.finetune_config import FinetuneConfig
    from training.provenance import make_version
    from training.vocab_cli import load_model_any

    notify = on_progress or (lambda event: None)
    notify({"stage": "load", "progress": 0.0})
    data = load_training_data(export_tasks, label_config)
    images = make_image_source(None, image_loader)
    keep_loadable(data, images)
    if not data.samples:
        raise ValueError(f"no usable annotations in the export ({data.report.summary()})")
    base = load_model_any(base_artifact_path, device="cpu")
    version = _unique_version(make_version(base.version), Path(model_dir), project_id)
    work = _job_dir(Path(model_dir), project_id, version)
    settings = {**JOB_DEFAULTS, **(options or {})}
    cfg = FinetuneConfig(base=str(base_artifact_path), out=str(work), version=version,
                         command=f"run_training_job(project={project_id})", **settings)

    def on_train(event: Dict[str, Any]) -> None:
        if event["event"] == "step":
            notify({"stage": "train", "progress": 0.9 * event["step"] / max(1, event["total_steps"]),
                    **{k: event[k] for k in ("step", "total_steps", "epoch", "loss", "lr")}})
        elif event["event"] == "evaluate":
            notify({"stage": "evaluate", "progress": 0.9, "model": "candidate", "images": event["images"]})

    result = finetune(cfg, data=data, base=base, images=images, on_progress=on_train, save=False)
    candidate_metrics = result.metrics.get("val", {})

    serving_path = serving_artifact(Path(model_dir)) or Path(base_artifact_path)
    notify({"stage": "evaluate", "progress": 0.95, "model": "serving", "path": str(serving_path)})
    serving = load_model_any(serving_path, device="cpu")  # fresh copy: the base was trained in place
    # The candidate's classifier (the project's labels, or a larger one the job options name), from the serving
    # model's text tower: both models are scored against the same labels.
    serving_vocab = classifier_vocabulary(serving, cfg, data, reference_classifier(cfg))
    serving_metrics = evaluate_model(serving.model, serving_vocab, result.eval_samples, images,
                                     device=result.model.device, modes=tuple(cfg.eval_prompts), max_examples=0).metrics
    del serving

    decision = decide(candidate_metrics, serving_metrics, tolerance)
    notify({"stage": "gate", "progress": 0.98, **decision.to_dict()})
    provenance = {**result.provenance, "project_id": project_id, "gate": decision.to_dict(),
                  "serving_model": str(serving_path), "serving_score": decision.serving_score}
    metrics = {**result.metrics, "serving": serving_metrics, "gate": decision.to_dict()}
    candidate = save_artifact(work / f"{_safe(version)}.safetensors", result.model, result.vocabulary, version,
                              provenance, metrics, text_encoder=base.text_encoder)
    registered = register(model_dir, candidate, decision, registrar)
    out = {
        "artifact": str(registered or candidate),
        "artifact_path": str(registered or candidate),
        "candidate": str(candidate),
        "promoted": decision.promote,
        "version": version,
        "metrics": candidate_metrics,
        "serving_metrics": serving_metrics,
        "gate": decision.to_dict(),
        "work_dir": str(work),
        "train_images": provenance.get("train_images"),
        "val_images": provenance.get("val_images"),
        "eval_split": result.metrics.get("eval_split"),
        "skipped": data.report.as_dict(),
        "steps": provenance.get("steps"),
    }
    notify({"stage": "done", "progress": 1.0, "version": version, "promoted": decision.promote})
    return out
