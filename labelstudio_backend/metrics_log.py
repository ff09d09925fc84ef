"""Request metrics for ``GET /metrics`` and the server's logging set-up.

Latencies are kept as a bounded window of recent samples per endpoint, so
memory stays constant however long the server runs, and percentiles describe
current behaviour rather than the whole history. Named counters and the ring
of recent errors are bounded too (in number and in characters), because their
names and messages can carry what clients sent.

The recent errors exist so that a failure Label Studio does not show (a task
pre-annotated with an empty result because its image could not be loaded: the
action still says "Retrieved N predictions") reaches the user through
``/metrics`` and ``/health``, not only the log.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Metrics", "configure_logging", "peak_rss_mb"]

_WINDOW = 2048
# Named counters kept; further names are counted together under _OTHER.
_MAX_COUNTERS = 256
_MAX_NAME_CHARS = 64
_OTHER = "other"
# Recent errors kept, and how much of each.
_MAX_ERRORS = 50
_MAX_ERROR_CHARS = 300
_MAX_FIELD_CHARS = 64


def configure_logging(level: str) -> None:
    """One format for our loggers and uvicorn's, at LOG_LEVEL."""
    root = logging.getLogger()
    if not any(getattr(h, "_ovsam", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._ovsam = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(level)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / (1024 * 1024)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(value: Any) -> str | None:
    return None if value is None else _short(str(value), _MAX_FIELD_CHARS)


@dataclass
class _Endpoint:
    count: int = 0
    client_errors: int = 0
    server_errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))


class Metrics:
    """Thread-safe request counters, latency windows, named counters and recent errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._counters: dict[str, int] = {}
        self._errors: deque[dict[str, Any]] = deque(maxlen=_MAX_ERRORS)
        self._errors_total = 0
        self.started_at = time.time()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            ep = self._endpoints.setdefault(endpoint, _Endpoint())
            ep.count += 1
            ep.client_errors += 400 <= status < 500
            ep.server_errors += status >= 500
            ep.latencies.append(seconds)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (callers pass fixed names; the bounds are a second line)."""
        name = _short(name, _MAX_NAME_CHARS)
        with self._lock:
            if name not in self._counters and len(self._counters) >= _MAX_COUNTERS:
                name = _OTHER
            self._counters[name] = self._counters.get(name, 0) + n

    def record_error(self, message: str, *, task: Any = None, project: Any = None) -> None:
        """Remember a failure the answer does not show (the last few, each cut short)."""
        entry = {"time": round(time.time(), 3), "task": _field(task), "project": _field(project),
                 "message": _short(str(message), _MAX_ERROR_CHARS)}
        with self._lock:
            self._errors.append(entry)
            self._errors_total += 1

    def errors_summary(self) -> dict[str, Any]:
        """For /health: how many errors were recorded, and the latest."""
        with self._lock:
            latest = dict(self._errors[-1]) if self._errors else None
            return {"count": self._errors_total, "latest": latest}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            endpoints = {
                name: (ep.count, ep.client_errors, ep.server_errors, list(ep.latencies))
                for name, ep in self._endpoints.items()
            }
            counters = dict(self._counters)
            errors = [dict(e) for e in self._errors]
            errors_total = self._errors_total
        requests: dict[str, Any] = {}
        for name, (count, c4, c5, lat) in sorted(endpoints.items()):
            ms = np.asarray(lat, dtype=np.float64) * 1000.0
            p50, p95, p99 = (np.percentile(ms, [50, 95, 99]) if ms.size else (0.0, 0.0, 0.0))
            requests[name] = {
                "count": count,
                "client_errors": c4,
                "server_errors": c5,
                "latency_ms": {
                    "window": int(ms.size),
                    "p50": round(float(p50), 3),
                    "p95": round(float(p95), 3),
                    "p99": round(float(p99), 3),
                    "max": round(float(ms.max()), 3) if ms.size else 0.0,
                },
            }
        return {
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests": requests,
            "counters": counters,
            "errors_total": errors_total,
            "recent_errors": errors,
            "process": {"rss_mb": current_rss_mb(), "peak_rss_mb": round(peak_rss_mb(), 1)},
        }
