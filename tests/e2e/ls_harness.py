"""Harness for the end-to-end tests: a real Label Studio 1.23.2 and our backend, as subprocesses.

- `install_label_studio()` runs `scripts/labelstudio_env.sh`, which keeps Label Studio in its own
  venv outside the repository (never in the project's venv), and returns its `label-studio`.
- `LabelStudioServer` starts it on a free loopback port with a fresh data dir and the settings
  from shared/label_studio_protocol.md ("Running a real Label Studio for tests"), waits for it,
  notices when it silently moved to another port, and stops its whole process group.
- `BackendServer` starts `python -m labelstudio_backend` the same way.
- `LabelStudioAPI` is a small REST client that sends `Authorization: Token <legacy token>`, as
  the editor's API calls do.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_START_TIMEOUT_S = 180.0  # first start runs the migrations (~25 s; slower on a busy machine)
BACKEND_START_TIMEOUT_S = 120.0


# What the run checked and how long things took: printed at the end of the run (conftest).
SUMMARY: list[str] = []
TIMINGS: dict[str, float] = {}


def note(line: str) -> None:
    """A line for the summary printed at the end of the run."""
    SUMMARY.append(line)


@dataclass
class SynthImage:
    """An uploaded test image and its ground-truth objects (from `python -m training synth`)."""

    name: str
    path: Path
    width: int
    height: int
    objects: list[tuple[str, Any]]  # (label, visible bool mask H x W)


class LabelStudioUnavailable(RuntimeError):
    """Label Studio could not be installed (the only reason the e2e tests skip)."""


_INSTALL_FAILURE: LabelStudioUnavailable | None = None


def install_label_studio(timeout_s: float = 900.0) -> tuple[Path, float]:
    """Install (or reuse) Label Studio in its own venv; returns (label-studio path, seconds).

    A failure is remembered, so a run without a registry tries (and waits) only once.
    """
    global _INSTALL_FAILURE
    if _INSTALL_FAILURE is not None:
        raise _INSTALL_FAILURE
    try:
        return _install(timeout_s)
    except LabelStudioUnavailable as exc:
        _INSTALL_FAILURE = exc
        raise


def _install(timeout_s: float) -> tuple[Path, float]:
    script = REPO / "scripts" / "labelstudio_env.sh"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ, LS_VERSION=LS_VERSION)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabelStudioUnavailable(f"{script.name} did not finish: {exc}") from exc
    seconds = time.monotonic() - t0
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored: it is neither" not in line)[-2000:]
        raise LabelStudioUnavailable(f"{script.name} exited {proc.returncode}:\n{tail}")
    exe = Path(lines[-1])
    if not os.access(exe, os.X_OK):
        raise LabelStudioUnavailable(f"{script.name} printed {exe}, which is not an executable")
    return exe, seconds


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the OS picks it, so parallel runs differ)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_busy(port: int) -> bool:
    for host in ("127.0.0.1", "localhost"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            try:
                if s.connect_ex((host, port)) == 0:
                    return True
            except OSError:
                pass
    return False


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


@dataclass
class _Process:
    """A subprocess in its own process group, logging to a file."""

    name: str
    log_path: Path
    proc: subprocess.Popen | None = None

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() ends it and every child it started
            )
        finally:
            log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, n: int = 4000) -> str:
        return _tail(self.log_path, n)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children that outlived the leader (same group) get the last signal too
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_LS_MOVED = re.compile(r"Trying to start at (\d+)")
_LS_STARTED = re.compile(r"Starting development server at https?://[^:/\s]+:(\d+)/")


@dataclass
class LabelStudioServer:
    """A real Label Studio with a fresh data dir; `url`, `token`, `username` once started."""

    exe: Path
    data_dir: Path
    username: str = "e2e@example.com"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    token: str = field(default_factory=lambda: secrets.token_hex(20))  # rest_framework keys are <= 40 chars
    port: int = 0
    start_seconds: float = 0.0
    moved_from: int | None = None
    template: Path | None = None  # the migrated db this data dir was seeded from, if any
    process: _Process | None = None
    _requested: int = 0
    _t0: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV"))}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # else "Token <key>" gets 401
            ML_BLOCK_LOCAL_IP="false",  # else POST /api/ml to 127.0.0.1 gets 403
            SSRF_PROTECTION_ENABLED="false",  # else the webhook registration gets 403
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",  # no registry query at start
            PYTHONUNBUFFERED="1",  # so the "moved to port N" lines reach the log at once
        )
        env["PATH"] = f"{self.exe.parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def seed_database(self, template: Path) -> None:
        """Start from a copy of a migrated, user-free database (see `migrated_db_template`)."""
        import shutil

        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, self.data_dir / _DB_NAME)
        self.template = template

    def spawn(self) -> "LabelStudioServer":
        """Start the process and return at once (boot it while other fixtures work); see wait_ready()."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self._requested = free_port()
        self.process = _Process("label-studio", self.data_dir.parent / "label-studio.log")
        self._t0 = time.monotonic()
        self.process.spawn(
            [str(self.exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), cwd=self.data_dir,
        )
        return self

    def wait_ready(self, timeout_s: float = LS_START_TIMEOUT_S) -> "LabelStudioServer":
        """Wait until the API answers, on whichever port Label Studio really took."""
        assert self.process is not None, "spawn() first"
        requested = self._requested
        deadline = self._t0 + timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"label-studio exited with {self.process.proc.returncode}:\n{self.process.log()}")
            log = self.process.log(200_000)
            # A busy port makes Label Studio move on silently ("Trying to start at N"); Django's
            # "Starting development server at http://127.0.0.1:N/" names the port it really bound.
            started = _LS_STARTED.findall(log)
            moved = _LS_MOVED.findall(log)
            actual = int(started[-1]) if started else int(moved[-1]) if moved else requested
            self.moved_from = requested if actual != requested else None
            self.port = actual
            if started and self._answers():
                self.start_seconds = time.monotonic() - self._t0
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"label-studio did not answer on {self.url} within {timeout_s:.0f} s:\n{self.process.log()}")

    def start(self, timeout_s: float = LS_START_TIMEOUT_S) -> "LabelStudioServer":
        return self.spawn().wait_ready(timeout_s)

    def _answers(self) -> bool:
        try:
            r = requests.get(f"{self.url}/api/version", timeout=2)
            return r.status_code == 200
        except requests.RequestException:
            return False

    def version(self) -> dict:
        return requests.get(f"{self.url}/api/version", timeout=5).json()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class BackendServer:
    """`python -m labelstudio_backend` on a free loopback port."""

    work_dir: Path
    env_overrides: dict[str, str]
    python: str = sys.executable
    port: int = 0
    start_seconds: float = 0.0
    process: _Process | None = None
    health: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = BACKEND_START_TIMEOUT_S, attempts: int = 3) -> "BackendServer":
        env = dict(os.environ)
        env.pop("OVSAM_CHECKPOINT", None)
        env.update(self.env_overrides)
        env["PYTHONUNBUFFERED"] = "1"
        last = ""
        for attempt in range(attempts):
            self.port = free_port()
            self.process = _Process("backend", self.work_dir / f"backend-{attempt}.log")
            t0 = time.monotonic()
            self.process.spawn(
                [self.python, "-m", "labelstudio_backend", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, cwd=REPO,
            )
            deadline = t0 + timeout_s
            while time.monotonic() < deadline and self.process.alive():
                try:
                    r = requests.get(f"{self.url}/health", timeout=2)
                    if r.status_code == 200:
                        self.health = r.json()
                        self.start_seconds = time.monotonic() - t0
                        return self
                except (requests.RequestException, ValueError):
                    pass
                time.sleep(0.3)
            last = self.process.log()
            self.process.stop()
            if "address already in use" not in last.lower():  # only a lost port race is worth a retry
                break
        raise RuntimeError(f"the backend did not answer /health on {self.url}:\n{last}")

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kw.pop("timeout", 10), **kw)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class LabelStudioAPI:
    """The REST calls the editor makes, with the legacy token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, expect: int | tuple[int, ...] | None = 200, timeout: float = 120, **kw: Any) -> requests.Response:
        r = self.session.request(method, f"{self.url}{path}", timeout=timeout, **kw)
        if expect is not None:
            ok = (expect,) if isinstance(expect, int) else expect
            assert r.status_code in ok, f"{method} {path} -> {r.status_code} (wanted {ok}): {r.text[:2000]}"
        return r

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        if body is not None:
            kw["json"] = body
        return self.request("POST", path, **kw)

    # ---- the calls the project flow uses
    def create_project(self, title: str, label_config: str) -> dict:
        return self.post("/api/projects", {"title": title, "label_config": label_config}, expect=201).json()

    def import_files(self, project_id: int, paths: list[Path]) -> dict:
        # One form field per file: Label Studio reads request.FILES.items(), so a repeated field name
        # ("file" twice) silently imports only the last file.
        files = [(p.name, (p.name, p.read_bytes(), "image/png")) for p in paths]
        return self.post(f"/api/projects/{project_id}/import", files=files, expect=201).json()

    def tasks(self, project_id: int) -> list[dict]:
        out = self.get(f"/api/tasks?project={project_id}&page_size=1000")
        return out["tasks"] if isinstance(out, dict) else out

    def connect_backend(self, project_id: int, url: str, title: str = "OVSAM e2e") -> requests.Response:
        return self.post("/api/ml", {"url": url, "project": project_id, "is_interactive": True, "title": title}, expect=None)

    def retrieve_predictions(self, project_id: int) -> dict:
        return self.post(
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
            {"selectedItems": {"all": True, "excluded": []}},
        ).json()

    def predictions(self, task_id: int) -> list[dict]:
        out = self.get(f"/api/predictions?task={task_id}")
        return out["results"] if isinstance(out, dict) and "results" in out else out

    def interactive(self, ml_id: int, task_id: int, result: list[dict]) -> dict:
        r = self.post(f"/api/ml/{ml_id}/interactive-annotating", {"task": task_id, "context": {"result": result}})
        return r.json()


def dump(obj: Any, limit: int = 600) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ----------------------------------------------------------------------------- database template

_DB_NAME = "label_studio.sqlite3"


def migrated_db_template(exe: Path, timeout_s: float = 600.0) -> Path | None:
    """A migrated, user-free Label Studio database, made once per install and kept in its venv.

    A fresh data dir spends most of Label Studio's first start (about a minute on two cores) in
    Django migrations. `label-studio version` runs the migrations and exits without creating a
    user or starting a server, so its database is a pristine empty instance: each test run
    copies it into its own fresh data dir, and the user, organisation and legacy token are
    still created by that run's `label-studio start`. Returns None if it cannot be made (the
    run then migrates from scratch).
    """
    import fcntl
    import shutil
    import tempfile

    venv = exe.resolve().parent.parent
    template = venv / f"ovsam-e2e-db-{LS_VERSION}.sqlite3"
    if template.is_file():
        return template
    with open(venv / ".ovsam-e2e-db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.is_file():
            return template
        work = Path(tempfile.mkdtemp(prefix="ls-template-", dir=venv))
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
            env.update(LABEL_STUDIO_BASE_DATA_DIR=str(work), COLLECT_ANALYTICS="false", LATEST_VERSION_CHECK="false")
            proc = subprocess.run([str(exe), "version"], env=env, cwd=str(work), capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
            db = work / _DB_NAME
            if proc.returncode != 0 or not db.is_file():
                sys.stderr.write(f"ls_harness: no db template (label-studio version exited {proc.returncode}):\n"
                                 f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}\n")
                return None
            os.replace(db, template)
            return template
        except (OSError, subprocess.TimeoutExpired) as exc:
            sys.stderr.write(f"ls_harness: no db template: {exc}\n")
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
