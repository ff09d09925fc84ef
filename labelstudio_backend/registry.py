"""The model registry in ``MODEL_DIR``: every project's model versions, and which one each project serves.

Layout::

    MODEL_DIR/projects/<id>/versions/<version>.safetensors   the project's trained versions (stored once)
    MODEL_DIR/projects/<id>/current                          file name (in versions/) of the one it serves
    MODEL_DIR/projects/<id>/versions/<file>.broken           a version that failed to load (set aside)
    MODEL_DIR/versions/, MODEL_DIR/current                   the older global registry: when ``current``
                                                             names a version, it is every project's base

A project without ``current`` serves the shared base model (``OVSAM_CHECKPOINT``,
or the shipped demo). Every pointer is written with a temporary file and
``os.replace``, so a reader (this server after a restart, or another replica
sharing the volume) sees the old or the new version, never half a pointer.
Versions are never overwritten: a name already stored is refused.
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

__all__ = ["ModelRegistry", "ProjectModels", "VersionInfo", "check_project_id"]

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
_BROKEN = ".broken"
_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_project_id(project_id: str) -> str:
    """Label Studio's project ids are numbers; anything that is not a plain name cannot name a folder."""
    if not isinstance(project_id, str) or not _PROJECT_ID.fullmatch(project_id):
        raise ValueError(f"project id {project_id!r} is not a plain name (letters, digits, _ and -)")
    return project_id


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


class ProjectModels:
    """One project's versions and its ``current`` pointer (``MODEL_DIR/projects/<id>/``)."""

    def __init__(self, root: Path, project_id: str) -> None:
        self.project_id = check_project_id(project_id)
        self.root = root / "projects" / project_id
        self.versions_dir = self.root / "versions"
        self.pointer_path = self.root / "current"
        self._lock = threading.Lock()

    def pointer(self) -> str | None:
        """The file name ``current`` holds (None: the project serves the base model)."""
        try:
            name = self.pointer_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return Path(name).name or None

    def current(self) -> Path | None:
        """The served version's file, or None (no pointer; a dangling one is the caller's to repair)."""
        name = self.pointer()
        return self.versions_dir / name if name else None

    def version_paths(self) -> list[Path]:
        """Stored versions, newest first (by the time they were written)."""
        if not self.versions_dir.is_dir():
            return []
        paths = [p for p in self.versions_dir.glob(f"*{_SUFFIX}") if p.is_file()]
        return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)

    def list_versions(self) -> list[VersionInfo]:
        out: list[VersionInfo] = []
        for path in reversed(self.version_paths()):
            try:
                out.append(VersionInfo.read(path))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("model registry: skipping %s: %s", path, exc)
        return out

    def store(self, candidate: Path, version: str) -> Path:
        """Move a candidate artifact into ``versions/`` (stored once, never over another version)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        dest = self.versions_dir / _safe_name(version)
        with self._lock:
            if dest.exists() or dest.with_name(dest.name + _BROKEN).exists():
                raise FileExistsError(f"project {self.project_id} already has a version {version!r}")
            os.replace(candidate, dest)
        return dest

    def point_to(self, path: Path | None) -> None:
        """Serve ``path`` (a file in ``versions/``), or the base model with None; atomic."""
        with self._lock:
            if path is None:
                self.pointer_path.unlink(missing_ok=True)
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(self.pointer_path, path.name + "\n")
        log.info("model registry: project %s now points at %s", self.project_id, path.name if path else "the base model")

    def set_aside(self, path: Path) -> None:
        """Rename a version that cannot be loaded to ``*.broken`` (kept for inspection, never chosen again)."""
        try:
            os.replace(path, path.with_name(path.name + _BROKEN))
        except FileNotFoundError:
            pass



class ModelRegistry:
    """The registry root: per-project models (:meth:`project`) and the older global layout; thread-safe.

    ``list_versions``/``current``/``add``/``promote`` read and write the global layout, whose ``current`` is
    used as every project's base model.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.pointer_path = self.root / "current"
        self._lock = threading.Lock()
        self._projects: dict[str, ProjectModels] = {}

    def project(self, project_id: str) -> ProjectModels:
        """One project's models (ValueError for an id that is not a plain name)."""
        with self._lock:
            models = self._projects.get(project_id)
            if models is None:
                models = self._projects[project_id] = ProjectModels(self.root, project_id)
            return models

    def project_ids(self) -> list[str]:
        """Projects with a folder in the registry (trained at least once)."""
        folder = self.root / "projects"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _PROJECT_ID.fullmatch(p.name))

    def list_versions(self) -> list[VersionInfo]:
        """All readable versions of the global layout, oldest first; unreadable files are skipped with a warning."""
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

