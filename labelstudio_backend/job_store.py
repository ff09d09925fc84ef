"""Training job records on disk (``MODEL_DIR/jobs/<job id>.json``), so job history survives a restart.

One small JSON file per job, written atomically (temporary file + ``os.replace``)
whenever its state changes. A record found ``queued`` or ``running`` at
start-up belongs to a server that stopped mid-job: it is marked
``interrupted``. Job folders (``MODEL_DIR/jobs/<job id>/``: the exported
tasks, the training log, the outcome and any unpromoted candidate) are kept
for the last ``JOBS_KEEP`` jobs of each project; records are kept longer
(``MAX_RECORDS``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

__all__ = ["JobStore"]

log = logging.getLogger(__name__)

MAX_RECORDS = 500
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class JobStore:
    """Reads and writes job records and job folders under ``MODEL_DIR/jobs``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "jobs"
        self._lock = threading.Lock()

    def folder(self, job_id: str) -> Path:
        if not _ID.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} cannot name a folder")
        return self.root / job_id

    def save(self, record: dict[str, Any]) -> None:
        """Write one job's record atomically (a failure is logged: a job never fails for its record)."""
        try:
            path = self.root / f"{record['id']}.json"
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock:
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(record, default=str), encoding="utf-8")
                os.replace(tmp, path)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cannot write the record of job %s: %s", record.get("id"), exc)

    def load(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first; active ones become ``interrupted`` (and are rewritten)."""
        if not self.root.is_dir():
            return []
        records: list[dict[str, Any]] = []
        for path in self.root.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable job record %s: %s", path, exc)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                continue
            if record.get("status") in ("queued", "running"):
                was = record["status"]
                record["status"] = "interrupted"
                record["message"] = f"interrupted: the backend stopped while the job was {was}" + (
                    f" ({record['message']})" if record.get("message") else "")
                record["finished_at"] = record.get("finished_at") or path.stat().st_mtime
                self.save(record)
                log.warning("job %s was interrupted by a restart of the backend", record["id"])
            records.append(record)
        records.sort(key=lambda r: (r.get("created_at") or 0, r["id"]))
        for old in records[: max(0, len(records) - MAX_RECORDS)]:
            (self.root / f"{old['id']}.json").unlink(missing_ok=True)
        return records[-MAX_RECORDS:]

    def clean(self, project: str, records: list[dict[str, Any]], keep: int) -> list[str]:
        """Delete the folders of a project's finished jobs beyond the newest ``keep``; returns their ids."""
        mine = [r for r in records if r.get("project") == project and r.get("kind", "train") == "train"
                and self.folder(r["id"]).exists()]
        mine.sort(key=lambda r: (r.get("created_at") or 0, r["id"]))
        removed = []
        for record in mine[: max(0, len(mine) - keep)]:
            if record.get("status") in ("queued", "running"):
                continue
            shutil.rmtree(self.folder(record["id"]), ignore_errors=True)
            removed.append(record["id"])
        if removed:
            log.info("project %s: removed job folders %s (JOBS_KEEP=%d)", project, removed, keep)
        return removed
