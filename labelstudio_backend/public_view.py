"""What ``/health`` and ``/metrics`` show a caller who has not authenticated.

Without ``BASIC_AUTH_*`` anyone who reaches the port can read these endpoints,
so they must not map the server's filesystem: file paths become file names
(the model file's name still says which model is served), and absolute paths
quoted in error messages keep only their last part. Label Studio's own URL
paths (``/data/upload/...``, ``/data/local-files/...``) are not filesystem
paths and stay whole, as they are what a user needs to find the task.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

__all__ = ["without_paths"]

# Keys whose values are server file paths.
_PATH_KEYS = frozenset({"path", "artifact"})
# Free-text fields that may quote a path (errors, job messages).
_TEXT_KEYS = frozenset({"message"})
# A quoted absolute path, as ``repr`` or an f-string with !r writes it.
_QUOTED_PATH = re.compile(r"""(['"])(/(?!data/(?:upload|local-files)\b)[^'"\n]*/)([^'"/\n]*)\1""")


def _hide_in_text(text: str) -> str:
    return _QUOTED_PATH.sub(lambda m: f"{m.group(1)}.../{m.group(3)}{m.group(1)}", text)


def without_paths(payload: Any) -> Any:
    """A copy of a JSON-like ``payload`` with file paths reduced to names."""
    if isinstance(payload, dict):
        out: dict[Any, Any] = {}
        for key, value in payload.items():
            if key in _PATH_KEYS and isinstance(value, str):
                out[key] = PurePath(value).name
            elif key in _TEXT_KEYS and isinstance(value, str):
                out[key] = _hide_in_text(value)
            else:
                out[key] = without_paths(value)
        return out
    if isinstance(payload, list):
        return [without_paths(v) for v in payload]
    return payload
