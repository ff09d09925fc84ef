"""LabelStudioClient without a server: what it refuses before any request (the HTTP paths run in test_images.py,
test_security_outbound.py and the backend's training tests)."""
from __future__ import annotations

import pytest

from labelstudio_io.client import ClientError, LabelStudioClient, redact_url


def test_export_needs_label_studio_url() -> None:
    with pytest.raises(ClientError, match="cannot export annotations: LABEL_STUDIO_URL is not set"):
        LabelStudioClient().export_tasks("3")


def test_api_request_needs_label_studio_url() -> None:
    with pytest.raises(ClientError, match="LABEL_STUDIO_URL is not set"):
        LabelStudioClient().get("/api/tasks/")


def test_unusable_label_studio_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL=.*cannot be used"):
        LabelStudioClient("http://user@ls:8080")


def test_environment_key_goes_only_with_the_environment_url() -> None:
    assert LabelStudioClient(None, "key").api_key is None
    assert LabelStudioClient("http://ls:8080/", "key").label_studio_url == "http://ls:8080"
    assert LabelStudioClient("http://ls:8080", "key").api_key == "key"


def test_redact_url_drops_the_query_but_keeps_local_files() -> None:
    assert redact_url("https://bucket/x.png?X-Amz-Signature=secret") == "https://bucket/x.png"
    assert redact_url("/data/local-files/?d=a/b.png") == "/data/local-files/?d=a/b.png"
