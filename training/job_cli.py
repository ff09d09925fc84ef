"""`python -m training job --job-dir DIR`: one backend training job, run as its own process.

The backend starts this command so that a crash, an out-of-memory kill or a hung run of training never
touches the server. The contract, all in the job folder (`DIR`):

* in ``request.json``: ``{"project", "base" (the project's served model), "tasks" (file of Label Studio's
  JSON export), "label_config" (file of the project's XML), "options" (FinetuneConfig overrides),
  "tolerance" (gate; null = default), "version_prefix" (null = from the base and project)}``;
* Label Studio's address and key come in the environment (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``),
  never in argv or files;
* progress: one JSON object per line on stdout (``{"stage", "progress", ...}``);
* the result: ``outcome.json``, written atomically when the run ends: ``{"status": "ok", "candidate",
  "version", "promote" (the gate's decision), "gate", "metrics", "serving_metrics", ...}`` or
  ``{"status": "failed", "error"}`` (exit code 1).

This module imports no torch until the arguments parse (``--help`` is instant).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REQUEST_FILE = "request.json"
OUTCOME_FILE = "outcome.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training job",
                                     description="Run one backend training job from its job folder "
                                                 "(request.json in, progress on stdout, outcome.json out).")
    parser.add_argument("--job-dir", required=True, type=Path, help="the job folder holding request.json")
    return parser


def write_json_atomic(path: Path, payload: Dict[str, Any]) -> None:
    """Write a file readers see whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, default=str, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _emit(event: Dict[str, Any]) -> None:
    line = json.dumps({k: v for k, v in event.items() if isinstance(v, (int, float, str, bool, type(None)))},
                      allow_nan=False, default=str)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that is NaN becomes null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_job(job_dir: Path) -> Dict[str, Any]:
    """Read the request, train, and return the outcome (exceptions propagate)."""
    from training.gate import DEFAULT_TOLERANCE
    from training.pipeline import run_training_job

    request = json.loads((job_dir / REQUEST_FILE).read_text(encoding="utf-8"))
    tasks = json.loads((job_dir / request["tasks"]).read_text(encoding="utf-8"))
    label_config = (job_dir / request["label_config"]).read_text(encoding="utf-8")
    tolerance: Optional[float] = request.get("tolerance")
    out = run_training_job(tasks, label_config, request["base"], str(job_dir), request["project"], _emit,
                           options=request.get("options") or {},
                           tolerance=DEFAULT_TOLERANCE if tolerance is None else float(tolerance),
                           version_prefix=request.get("version_prefix"))
    return _finite({"status": "ok", "candidate": out["candidate"], "version": out["version"],
                    "promote": bool(out["promoted"]), "gate": out["gate"], "metrics": out["metrics"],
                    "serving_metrics": out["serving_metrics"], "train_images": out.get("train_images"),
                    "val_images": out.get("val_images"), "skipped": out.get("skipped"), "steps": out.get("steps")})


def _exit_with_parent(interval_s: float = 2.0) -> None:
    """End this process when the backend that started it is gone (killed with -9, say): nobody would read the result."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        sys.stderr.write("the backend that started this job is gone; stopping\n")
        sys.stderr.flush()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main_job(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_with_parent()
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_dir = args.job_dir
    try:
        outcome = run_job(job_dir)
    except Exception as exc:  # every failure ends in the outcome file, with the reason
        traceback.print_exc(file=sys.stderr)
        write_json_atomic(job_dir / OUTCOME_FILE, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    write_json_atomic(job_dir / OUTCOME_FILE, outcome)
    return 0
