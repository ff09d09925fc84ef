"""The backend's training job: Label Studio export -> fine-tune -> evaluate both models -> gate -> candidate.

`run_training_job` is what `python -m training job` (the backend's training subprocess) runs. It trains from
the given base model (the project's served model), evaluates the candidate and that model on the same held-out
tasks with the project's vocabulary, and asks the gate (`training.gate`) whether the candidate may replace it.
Everything the run writes goes to `work_dir` (the job's folder), including the candidate artifact. It never
touches a model registry: registering, loading (checksum verified) and serving the candidate is the backend's
move, after reading the outcome.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from training.gate import DEFAULT_TOLERANCE, decide

ProgressFn = Callable[[Dict[str, Any]], None]

# Defaults of a backend job; `options` of run_training_job overrides any FinetuneConfig field.
JOB_DEFAULTS: Dict[str, Any] = {
    "epochs": 12,
    "batch_size": 2,
    "val_fraction": 0.2,
    "progress": False,
}
CANDIDATE_NAME = "candidate.safetensors"


def _safe(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "project"


def version_namer(prefix: str, when: Optional[datetime] = None) -> Callable[[str], str]:
    """`<prefix>-<YYYYmmddTHHMMSS>-<first 8 hex of the weights' content hash>`: unique per content and second."""
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S")
    return lambda digest: f"{prefix}-{stamp}-{digest[:8]}"


def run_training_job(
    export_tasks: List[dict],
    label_config: str,
    base_artifact_path: str,
    work_dir: str,
    project_id: int | str,
    on_progress: Optional[ProgressFn] = None,
    *,
    options: Optional[Dict[str, Any]] = None,
    image_loader: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    version_prefix: Optional[str] = None,
) -> Dict[str, Any]:
    """Fine-tune on a project's annotations; the gate says whether the candidate may replace the served model.

    export_tasks: Label Studio's JSON export (task list); label_config: the project's XML (vocabulary
    and image key); base_artifact_path: the project's served model, trained from and compared with (artifact
    or official weights); work_dir: the job's folder (the candidate is written there). `image_loader` (anything
    with `.load(url) -> RGB array`) reads task images; by default one is configured from the environment.
    The version is `<version_prefix>-<UTC stamp>-<content hash>` (prefix default: the base's root name and
    `-p<project>`).

    Returns {"candidate" (= "artifact" = "artifact_path"), "promoted" (the gate's decision), "version",
    "metrics", "serving_metrics", "gate", ...}. Progress events are dicts with "stage" ('load', 'train',
    'evaluate', 'gate', 'done') and "progress" in [0, 1].
    """
    from ovsam.artifact import read_artifact_metadata, root_version, save_artifact
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
    namer = version_namer(version_prefix or f"{root_version(base.version)}-p{_safe(project_id)}")
    work = Path(work_dir)
    settings = {**JOB_DEFAULTS, **(options or {})}
    cfg = FinetuneConfig(base=str(base_artifact_path), out=str(work), version=namer("0" * 64),
                         command=f"run_training_job(project={project_id})", **settings)

    def on_train(event: Dict[str, Any]) -> None:
        if event["event"] == "step":
            notify({"stage": "train", "progress": 0.9 * event["step"] / max(1, event["total_steps"]),
                    **{k: event[k] for k in ("step", "total_steps", "epoch", "loss", "lr")}})
        elif event["event"] == "evaluate":
            notify({"stage": "evaluate", "progress": 0.9, "model": "candidate", "images": event["images"]})

    result = finetune(cfg, data=data, base=base, images=images, on_progress=on_train, save=False)
    candidate_metrics = result.metrics.get("val", {})

    serving_path = Path(base_artifact_path)
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
    candidate = save_artifact(work / CANDIDATE_NAME, result.model, result.vocabulary, namer,
                              provenance, metrics, text_encoder=base.text_encoder)
    version = read_artifact_metadata(candidate)["version"]
    out = {
        "artifact": str(candidate),
        "artifact_path": str(candidate),
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
