"""The model registry in ``MODEL_DIR``: every model version, and which one is served.

Layout::

    MODEL_DIR/versions/<version>.safetensors   one model artifact per version
    MODEL_DIR/current                          file name (in versions/) of the served one

Promotion writes ``current`` with a temporary file and ``os.replace``, so a
reader (this server after a restart, or another replica sharing the volume)
sees either the old or the new version, never half a pointer. Artifacts are
themselves written atomically by ``ovsam.artifact.save_artifact``; artifacts
placed here from elsewhere are copied the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovsam.artifact import read_artifact_metadata

__all__ = ["ModelRegistry", "VersionInfo"]

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class VersionInfo:
    """One stored version (read from the artifact's header, no weights loaded)."""

    version: str
    path: Path | None
    modified: float
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "VersionInfo":
        """From an artifact's header; ValueError/OSError if it is not one."""
        meta = read_artifact_metadata(path)
        return cls(meta["version"], path, path.stat().st_mtime, meta["metrics"], meta["provenance"])

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.path) if self.path is not None else None,
            "modified": self.modified,
            "metrics": self.metrics,
            "base": self.provenance.get("base_model") or self.provenance.get("base"),
        }


def _safe_name(version: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", version).strip("._") or "model"
    return name + _SUFFIX


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ModelRegistry:
    """Versions on disk and the ``current`` pointer; safe to share between threads."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.pointer_path = self.root / "current"
        self._lock = threading.Lock()

    def list_versions(self) -> list[VersionInfo]:
        """All readable versions, oldest first; unreadable files are skipped with a warning."""
        if not self.versions_dir.is_dir():
            return []
        out: list[VersionInfo] = []
        for path in self.versions_dir.glob(f"*{_SUFFIX}"):
            try:
                out.append(VersionInfo.read(path))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("model registry: skipping %s: %s", path, exc)
        out.sort(key=lambda v: (v.modified, v.version))
        return out

    def current(self) -> Path | None:
        """The promoted artifact, or None when nothing was promoted (or the pointer dangles)."""
        try:
            name = self.pointer_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("model registry: cannot read %s: %s", self.pointer_path, exc)
            return None
        path = self.versions_dir / Path(name).name
        if not name or not path.is_file():
            log.warning("model registry: %s names %r, which does not exist; ignoring it", self.pointer_path, name)
            return None
        return path

    def add(self, artifact: str | os.PathLike[str]) -> Path:
        """Place an artifact in ``versions/`` (copied atomically unless it is already there)."""
        src = Path(artifact).resolve()
        meta = read_artifact_metadata(src)  # refuse anything that is not an artifact
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if src.parent == self.versions_dir.resolve():
            return src
        dest = self.versions_dir / _safe_name(meta["version"])
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def promote(self, artifact: str | os.PathLike[str]) -> Path:
        """Make ``artifact`` the served version; returns its path inside the registry."""
        with self._lock:
            path = self.add(artifact)
            _atomic_write_text(self.pointer_path, path.name + "\n")
        log.info("model registry: promoted %s", path)
        return path
