"""Runs one training job as a child process (``python -m training job``) and reads its typed outcome.

The server never imports training code: a job's exported tasks and label config
go into files in the job folder with a ``request.json``; Label Studio's address
and key go into the child's environment (never argv, never files). The child
prints one JSON progress object per line on stdout, logs to ``train.log`` and
writes ``outcome.json``. A crash, an out-of-memory kill, a ``SIGKILL`` or a
timeout of the child fails the job and nothing else; a cancel terminates it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainingOutcome", "TrainingProcessError", "child_environment", "run_training_process", "write_request"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUEST_FILE = "request.json"
OUTCOME_FILE = "outcome.json"
LOG_FILE = "train.log"
_POLL_S = 0.2
_TERMINATE_GRACE_S = 10.0
# Variables the child must not inherit from the server: it gets Label Studio's address and key explicitly.
_CREDENTIAL_VARIABLES = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                         "BASIC_AUTH_USER", "BASIC_AUTH_PASS")


class TrainingProcessError(RuntimeError):
    """The child failed, was killed, timed out, or wrote an outcome that does not fit the contract."""


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished child reports (``outcome.json``), checked field by field."""

    candidate: Path
    version: str
    promote: bool
    gate: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    serving_metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, job_dir: Path) -> "TrainingOutcome":
        """Parse the outcome; the candidate must be a file inside the job folder."""
        try:
            data = json.loads((job_dir / OUTCOME_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingProcessError("the training process wrote no outcome") from None
        except (OSError, ValueError) as exc:
            raise TrainingProcessError(f"the training outcome cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise TrainingProcessError("the training outcome is not a JSON object")
        if data.get("status") != "ok":
            raise TrainingProcessError(str(data.get("error") or f"training failed (status {data.get('status')!r})"))
        candidate, version, promote = data.get("candidate"), data.get("version"), data.get("promote")
        if not isinstance(candidate, str) or not isinstance(version, str) or not version or not isinstance(promote, bool):
            raise TrainingProcessError(f"the training outcome lacks candidate/version/promote: {sorted(data)}")
        path = Path(candidate).resolve()
        if path.parent != job_dir.resolve() or not path.is_file():
            raise TrainingProcessError(f"the training outcome names a candidate outside its job folder: {candidate}")
        dicts = {k: data.get(k) if isinstance(data.get(k), dict) else {} for k in ("gate", "metrics", "serving_metrics")}
        return cls(path, version, promote, **dicts)


def write_request(job_dir: Path, tasks: list[Any], label_config: str, request: Mapping[str, Any]) -> None:
    """The child's input files (no credentials in them)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "tasks.json").write_text(json.dumps(tasks), encoding="utf-8")
    (job_dir / "label_config.xml").write_text(label_config, encoding="utf-8")
    body = {**request, "tasks": "tasks.json", "label_config": "label_config.xml"}
    (job_dir / REQUEST_FILE).write_text(json.dumps(body, default=str), encoding="utf-8")


def child_environment(base: Mapping[str, str], label_studio: Mapping[str, str | None],
                      images: Mapping[str, str]) -> dict[str, str]:
    """The server's environment without credentials, plus Label Studio's address/key and the image settings."""
    env = {k: v for k, v in base.items() if k not in _CREDENTIAL_VARIABLES}
    env.update({k: v for k, v in label_studio.items() if v})
    env.update(images)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [base.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_training_process(
    job_dir: Path,
    env: Mapping[str, str],
    timeout_s: float,
    on_progress: Callable[[dict[str, Any]], None],
    on_start: Callable[[int], None],
    cancelled: Callable[[], bool],
) -> TrainingOutcome | None:
    """Run the child to its end; the outcome, None when cancelled, or :class:`TrainingProcessError`."""
    (job_dir / OUTCOME_FILE).unlink(missing_ok=True)
    with open(job_dir / LOG_FILE, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training", "job", "--job-dir", str(job_dir)],
            cwd=str(REPO_ROOT), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
            start_new_session=True,  # a signal to the server's process group never reaches it, and vice versa
        )
    on_start(proc.pid)
    reader = threading.Thread(target=_read_progress, args=(proc, on_progress), name=f"progress-{proc.pid}", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    stopped = ""
    while proc.poll() is None:
        if cancelled():
            stopped = "cancelled"
        elif time.monotonic() > deadline:
            stopped = f"timed out after {timeout_s:g} s (TRAINING_TIMEOUT_S)"
        if stopped:
            _stop(proc)
            break
        time.sleep(_POLL_S)
    code = proc.wait()
    reader.join(timeout=5)
    if stopped == "cancelled":
        return None
    if stopped:
        raise TrainingProcessError(f"the training process {stopped}; it was stopped")
    if code != 0:
        try:
            outcome = TrainingOutcome.read(job_dir)  # exit 1 with a reason in the outcome
        except TrainingProcessError as exc:
            if code < 0 or not (job_dir / OUTCOME_FILE).exists():
                raise TrainingProcessError(_exit_reason(code)) from None
            raise exc
        raise TrainingProcessError(f"{_exit_reason(code)} after writing an outcome for {outcome.version}")
    return TrainingOutcome.read(job_dir)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory, or by someone)" if -code == signal.SIGKILL else ""
        return f"the training process was ended by {name}{hint}"
    return f"the training process exited with code {code} (see its train.log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    proc.terminate()
    try:
        proc.wait(timeout=_TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def _read_progress(proc: subprocess.Popen[bytes], on_progress: Callable[[dict[str, Any]], None]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            event = json.loads(raw)
        except ValueError:
            log.debug("training process %d printed a non-JSON line: %r", proc.pid, raw[:200])
            continue
        if isinstance(event, dict):
            try:
                on_progress(event)
            except Exception:  # progress is informative; the job goes on
                log.exception("could not record training progress")
