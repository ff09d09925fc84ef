"""The one client for Label Studio and for every other outbound request: address, token, refresh, export.

Label Studio's address and its token are a pair: the environment's key goes only to ``LABEL_STUDIO_URL``, and
a ``/setup`` token only to the ``/setup`` hostname it came with (see :meth:`LabelStudioClient.update_from_setup`).
A legacy key is sent as ``Token <key>``; a personal access token (a JWT refresh token) is exchanged at
``/api/token/refresh/`` for a short-lived access token sent as ``Bearer``. A header is attached only when the
prepared request's scheme, host and port equal Label Studio's origin, on every redirect hop. Every request goes
through :mod:`.outbound`'s guarded session: ambiguous URLs are refused, and the address actually contacted is
checked against the outbound policy (``ALLOWED_IMAGE_HOSTS``) at connect time.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests

from . import outbound
from .outbound import OutboundRefused

__all__ = ["ClientError", "LabelStudioClient", "LabelStudioConflict", "is_jwt", "redact_url"]

log = logging.getLogger(__name__)

# Refresh a Bearer access token this many seconds before it expires.
_TOKEN_MARGIN_S = 30.0
# Lifetime assumed for an access token whose expiry cannot be read (Label Studio's is 5 min).
_DEFAULT_TOKEN_LIFETIME_S = 240.0
# (connect, read) of an export: Label Studio builds the whole JSON before it answers.
_EXPORT_TIMEOUT_S = (10.0, 600.0)


class ClientError(ValueError):
    """A request to Label Studio, or through the guarded session, failed or was refused (message says why)."""


class LabelStudioConflict(Exception):
    """A ``/setup`` names another Label Studio than the one this backend is bound to."""


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def is_jwt(token: str) -> bool:
    """True for a JWT (three base64url parts, the first a JSON header); legacy keys are hex."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return False
    try:
        header = json.loads(_b64url_decode(parts[0]))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict)


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified: we only need to know when to refresh)."""
    try:
        payload = json.loads(_b64url_decode(token.split(".")[1]))
        exp = payload.get("exp")
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    except (ValueError, IndexError, binascii.Error, AttributeError):
        return None


@dataclass
class _Token:
    value: str
    expires_at: float


class LabelStudioClient:
    """Label Studio's address and credentials, and the guarded session all outbound requests use; thread-safe.

    ``timeout_s`` is the request timeout when no :func:`outbound.deadline` is running (``IMAGE_TIMEOUT_S``).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        allowed_hosts: Sequence[str] = (),
        user_agent: str = "ovsam-labelstudio-backend",
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self._env_url = url
        self._env_key = api_key
        self.timeout_s = timeout_s
        self._env_origin: outbound.Origin | None = None
        if url:
            try:
                self._env_origin = outbound.check_url(url)
            except OutboundRefused as exc:
                raise ValueError(f"LABEL_STUDIO_URL={url!r} cannot be used: {exc}") from exc
        self._setup_url: str | None = None
        self._setup_key: str | None = None
        self._setup_lock = threading.Lock()
        self._warned_setup_host = False
        self.policy = outbound.AddressPolicy(tuple(allowed_hosts), label_studio=self.origin)
        self._session = outbound.guard_session(session or requests.Session(), self.policy)
        self._session.headers["User-Agent"] = user_agent
        self._token: _Token | None = None
        self._token_lock = threading.Lock()

    # -- address and credentials ---------------------------------------
    @property
    def label_studio_url(self) -> str | None:
        url = self._env_url or self._setup_url
        return url.rstrip("/") if url else None

    @property
    def api_key(self) -> str | None:
        """The key for :attr:`label_studio_url`: the environment's only with LABEL_STUDIO_URL."""
        if self._env_url:
            return self._env_key or self._setup_key
        return self._setup_key

    def origin(self) -> outbound.Origin | None:
        """Label Studio's (scheme, host, port), or None while its address is unknown."""
        url = self.label_studio_url
        return outbound.origin_of(url) if url else None

    def is_label_studio(self, url: str) -> bool:
        origin = self.origin()
        return origin is not None and outbound.origin_of(url) == origin

    def update_from_setup(self, hostname: str | None, access_token: str | None) -> None:
        """Learn Label Studio's address and token from ``/setup``, as a pair.

        With ``LABEL_STUDIO_URL`` set, a ``/setup`` for another origin is ignored
        (warned once) and its token is used only when ``LABEL_STUDIO_API_KEY`` is
        unset and the origins match. Without it, the first ``/setup`` hostname is
        pinned with its token; a later one for the same origin may bring a new
        token, one for another origin raises :class:`LabelStudioConflict`. A
        token without a hostname is not used: nothing says where it belongs.
        """
        url = hostname.strip().rstrip("/") if isinstance(hostname, str) and hostname.strip() else None
        token = access_token.strip() if isinstance(access_token, str) and access_token.strip() else None
        if url is None:
            return
        try:
            origin = outbound.check_url(url)
        except OutboundRefused as exc:
            log.warning("ignoring the /setup hostname %r: %s", url[:200], exc)
            return
        with self._setup_lock:
            if self._env_origin is not None:
                if origin != self._env_origin:
                    if not self._warned_setup_host:
                        self._warned_setup_host = True
                        log.warning("/setup names Label Studio at %s, but LABEL_STUDIO_URL is %s: the /setup hostname "
                                    "and token are ignored", _origin_text(origin), _origin_text(self._env_origin))
                    return
                if token is not None and not self._env_key:
                    self._set_setup_key(token)
                return
            if self._setup_url is None:
                self._setup_url = url
                log.info("using Label Studio at %s (from the first /setup; set LABEL_STUDIO_URL to fix it)",
                         _origin_text(origin))
            elif outbound.origin_of(self._setup_url) != origin:
                log.warning("refused a /setup for Label Studio at %s: this backend already uses %s",
                            _origin_text(origin), _origin_text(outbound.origin_of(self._setup_url)))
                raise LabelStudioConflict(
                    "this backend already works for another Label Studio (the hostname of the first /setup); "
                    "set LABEL_STUDIO_URL, or restart the backend, to change it"
                )
            if token is not None:
                self._set_setup_key(token)

    def _set_setup_key(self, token: str) -> None:
        if token == self._setup_key:
            return
        if self._setup_key is not None:
            log.info("Label Studio access token updated from /setup")
        self._setup_key = token
        self.forget_token()

    def uses_pat(self) -> bool:
        """Whether the key is a personal access token (refreshed into Bearer tokens)."""
        key = self.api_key
        return key is not None and is_jwt(key)

    def forget_token(self) -> None:
        """Drop the access token (Label Studio refused it): the next request refreshes it."""
        with self._token_lock:
            self._token = None

    # -- Label Studio's API --------------------------------------------
    def get(
        self, path: str, params: Mapping[str, str] | None = None, timeout: float | tuple[float, float] | None = None
    ) -> requests.Response:
        """GET ``path`` of Label Studio's API with our credentials; the caller closes the response."""
        return self.request("GET", path, params=params, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        """``method`` on ``path`` of Label Studio's API with our credentials; the caller closes the response.

        Redirects are not followed. Raises :class:`ClientError` when Label
        Studio's address is unknown or it cannot be reached.
        """
        base = self.label_studio_url
        if base is None:
            raise ClientError("LABEL_STUDIO_URL is not set")
        url = base + path + (f"?{urlencode(params)}" if params else "")
        retried = False
        while True:
            resp = self.send(method, url, json_body=json_body, timeout=timeout)
            if resp.status_code == 401 and self.uses_pat() and not retried:
                resp.close()
                retried = True
                self.forget_token()
                continue
            return resp

    def export_tasks(self, project_id: str) -> list[Any]:
        """The project's annotated tasks in Label Studio's JSON export format, through its export API."""
        base = self.label_studio_url
        if not base:
            raise ClientError("cannot export annotations: LABEL_STUDIO_URL is not set")
        path = f"/api/projects/{quote(project_id, safe='')}/export"
        url = base + path
        params = {"exportType": "JSON", "download_all_tasks": "false"}
        try:
            resp = self.get(path, params=params, timeout=_EXPORT_TIMEOUT_S)
        except ClientError as exc:  # unreachable, refused, or the token refresh failed
            raise ClientError(f"cannot export annotations: {exc}") from exc
        with resp:
            if resp.status_code != 200:
                hint = " (check LABEL_STUDIO_API_KEY)" if resp.status_code in (401, 403) else ""
                raise ClientError(f"cannot export annotations: {url} answered HTTP {resp.status_code}{hint}")
            try:
                tasks = resp.json()
            except (ValueError, requests.RequestException) as exc:
                raise ClientError(f"cannot export annotations: {url} did not answer JSON") from exc
        if not isinstance(tasks, list):
            raise ClientError(f"cannot export annotations: expected a list of tasks, got {type(tasks).__name__}")
        return tasks

    # -- any outbound request ------------------------------------------
    def send(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        credentials: bool = True,
        redirected_from: str | None = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        """One request through the guarded session, redirects not followed; our credentials only if it goes to
        Label Studio's origin. The caller closes the response."""
        try:
            origin = outbound.check_url(url)
            prepared = self._session.prepare_request(requests.Request(method, url, json=json_body))
            if outbound.origin_of(prepared.url or "") != origin:  # what is sent must be what was checked
                raise OutboundRefused("the URL is ambiguous")
        except OutboundRefused as exc:
            raise _refused(url, redirected_from, exc) from exc
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise ClientError(f"{redact_url(url)}: malformed URL ({short_error(exc)})") from exc
        if credentials and origin == self.origin():
            prepared.headers.update(self._auth_header())
        if timeout is None:
            limit = outbound.current_deadline()
            left = limit.remaining() if limit is not None else self.timeout_s
            timeout = (max(min(left, 10.0), 0.001), max(left, 0.001))
        adapter = self._session.get_adapter(prepared.url or url)
        try:
            # The adapter, not Session.send: the session would read a redirect's whole body.
            return adapter.send(prepared, stream=True, timeout=timeout)
        except OutboundRefused as exc:
            raise _refused(url, redirected_from, exc) from exc
        except requests.exceptions.Timeout as exc:
            raise ClientError(self.timed_out(url)) from exc
        except requests.exceptions.ConnectionError as exc:
            raise ClientError(f"{redact_url(url)}: cannot connect to the host ({short_error(exc)})") from exc
        except requests.exceptions.RequestException as exc:
            raise ClientError(f"{redact_url(url)}: request failed ({short_error(exc)})") from exc

    def timed_out(self, url: str) -> str:
        return f"{redact_url(url)}: timed out after {self.timeout_s:g} s (IMAGE_TIMEOUT_S, whole download)"

    # -- authentication ------------------------------------------------
    def _auth_header(self) -> dict[str, str]:
        key = self.api_key
        if not key:
            return {}
        if not is_jwt(key):
            return {"Authorization": f"Token {key}"}
        with self._token_lock:
            now = time.time()
            if self._token is None or now >= self._token.expires_at - _TOKEN_MARGIN_S:
                self._token = self._refresh_access_token(key)
            return {"Authorization": f"Bearer {self._token.value}"}

    def _refresh_access_token(self, pat: str) -> _Token:
        url = f"{self.label_studio_url}/api/token/refresh/"
        resp = self.send("POST", url, json_body={"refresh": pat}, credentials=False)
        with resp:
            if resp.status_code != 200:
                raise ClientError(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} from "
                    "/api/token/refresh/); check LABEL_STUDIO_API_KEY"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError, requests.exceptions.RequestException):
                access = None
        if not isinstance(access, str) or not access:
            raise ClientError("Label Studio's /api/token/refresh/ answer has no access token")
        exp = _jwt_exp(access)
        expires_at = exp if exp is not None else time.time() + _DEFAULT_TOKEN_LIFETIME_S
        log.debug("refreshed Label Studio access token, expires at %s", expires_at)
        return _Token(access, expires_at)


def _refused(url: str, redirected_from: str | None, exc: OutboundRefused) -> ClientError:
    if redirected_from is not None:
        return ClientError(f"{redact_url(redirected_from)} redirects to a host that is not allowed: {exc}")
    return ClientError(f"host of {redact_url(url)} is not allowed: {exc}")


def _origin_text(origin: outbound.Origin | None) -> str:
    if origin is None:
        return "?"
    scheme, host, port = origin
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def redact_url(url: str) -> str:
    """URL without its query string (pre-signed URLs carry credentials there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if parts.path.startswith("/data/local-files"):
        return url
    return parts._replace(query="", fragment="").geturl()


def short_error(exc: BaseException) -> str:
    """An exception's text, cut to 200 characters for messages shown to annotators."""
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
