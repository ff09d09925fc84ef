"""Request metrics for ``GET /metrics`` and the server's logging set-up.

Latencies are kept as a bounded window of recent samples per endpoint, so
memory stays constant however long the server runs, and percentiles describe
current behaviour rather than the whole history.
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


@dataclass
class _Endpoint:
    count: int = 0
    client_errors: int = 0
    server_errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))


class Metrics:
    """Thread-safe request counters, latency windows and named counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._counters: dict[str, int] = {}
        self.started_at = time.time()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            ep = self._endpoints.setdefault(endpoint, _Endpoint())
            ep.count += 1
            ep.client_errors += 400 <= status < 500
            ep.server_errors += status >= 500
            ep.latencies.append(seconds)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            endpoints = {
                name: (ep.count, ep.client_errors, ep.server_errors, list(ep.latencies))
                for name, ep in self._endpoints.items()
            }
            counters = dict(self._counters)
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
            "process": {"rss_mb": current_rss_mb(), "peak_rss_mb": round(peak_rss_mb(), 1)},
        }
