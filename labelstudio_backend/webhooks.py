"""Names under which ``/webhook`` actions are counted and echoed.

The ``action`` string is the caller's choice. Counting every distinct string
under its own name let a client grow the metrics without bound, so only the
actions Label Studio sends are counted by name (its ``WebhookAction`` model,
the Enterprise review events, and the ML backend's ``START_TRAINING``); any
other action is counted as ``webhook_unknown`` and echoed only as a short
prefix.
"""

from __future__ import annotations

__all__ = ["KNOWN_ACTIONS", "counter_name", "echo"]

KNOWN_ACTIONS: frozenset[str] = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED",
    "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
    "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",  # Label Studio Enterprise
    "START_TRAINING",  # sent by /api/ml/<id>/train
})

# Longest part of an unknown action given back in the answer.
ECHO_CHARS = 64


def counter_name(action: str) -> str:
    """The metrics counter for ``action``: one per known action, one for all others."""
    return f"webhook_{action.lower()}" if action in KNOWN_ACTIONS else "webhook_unknown"


def echo(action: str) -> str:
    """``action`` as it may appear in the answer: known ones whole, others cut to a short prefix."""
    if action in KNOWN_ACTIONS or len(action) <= ECHO_CHARS:
        return action
    return action[:ECHO_CHARS] + "..."
