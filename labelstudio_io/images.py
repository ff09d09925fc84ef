"""Fetch task images the way Label Studio shows them, safely.

A task's image value can be a path relative to Label Studio (``/data/upload/...``,
``/data/local-files/?d=...``, ``/tasks/<id>/resolve/?fileuri=...``), an absolute
http(s) URL (often a pre-signed cloud URL), a ``data:`` URI, or a local path.
Relative URLs need Label Studio's address and an API key: a legacy key is sent as
``Token <key>``; a personal access token (a JWT refresh token) is exchanged at
``/api/token/refresh/`` for a short-lived access token sent as ``Bearer``.

Credentials are pairs: the environment's key goes only to ``LABEL_STUDIO_URL``,
and a ``/setup`` token only to the ``/setup`` hostname it came with (see
:meth:`ImageLoader.update_from_setup`). A header is attached only when the
prepared request's scheme, host and port equal Label Studio's origin, on every
redirect hop. Every request goes through :mod:`.outbound`'s guarded session:
ambiguous URLs are refused, and the address actually contacted is checked
against the outbound policy (``ALLOWED_IMAGE_HOSTS``) at connect time.

Task data is user input, so downloads are bounded (one deadline for the whole
download, bytes, pixels, concurrent downloads; the pixel count is read from the
header before decoding) and local reads are confined to configured roots. EXIF orientation is applied because browsers, and
so Label Studio's ``original_width``/``original_height``, use it. Every failure
raises :class:`ImageError` with a message fit for the annotator.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from . import outbound
from .lru import SizedLRU
from .outbound import OutboundRefused

__all__ = ["ImageError", "ImageLoader", "ImageLoaderConfig", "LabelStudioConflict", "is_jwt"]

log = logging.getLogger(__name__)

_LS_RELATIVE_PREFIXES = ("/data/upload/", "/data/local-files", "/storage-data/", "/tasks/", "/projects/", "/api/")
_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
# Refresh a Bearer access token this many seconds before it expires.
_TOKEN_MARGIN_S = 30.0
# Lifetime assumed for an access token whose expiry cannot be read (Label Studio's is 5 min).
_DEFAULT_TOKEN_LIFETIME_S = 240.0


class ImageError(ValueError):
    """The task image cannot be loaded (message says why)."""


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


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _env_number(env: Mapping[str, str], name: str, default: float, cast: type) -> Any:
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        value = cast(float(raw)) if cast is int else cast(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class ImageLoaderConfig:
    """Settings of :class:`ImageLoader`; :meth:`from_env` reads them from the environment.

    Environment variables:

    * ``LABEL_STUDIO_URL`` (alias ``LABEL_STUDIO_HOST``): Label Studio's address,
      for relative task URLs such as ``/data/upload/1/x.png``. When set, it is
      the only Label Studio: ``/setup`` cannot change it.
    * ``LABEL_STUDIO_API_KEY`` (alias ``LABEL_STUDIO_ACCESS_TOKEN``): legacy API
      key or personal access token. Sent only to ``LABEL_STUDIO_URL``; without
      ``LABEL_STUDIO_URL`` it is not used at all (a warning says so).
    * ``IMAGE_MAX_BYTES`` (default 64 MiB), ``IMAGE_MAX_PIXELS`` (default 100 M),
      ``IMAGE_TIMEOUT_S`` (one deadline for a whole download: connect, headers,
      body and every redirect hop; default 30 s), ``IMAGE_CACHE_BYTES``
      (in-memory cache of downloads, default 256 MiB; 0 = off),
      ``IMAGE_MAX_DOWNLOADS`` (downloads at a time; others wait, within their
      deadline, for a slot; default 8).
    * ``ALLOWED_IMAGE_HOSTS``: where images may be downloaded from, as
      comma-separated entries: a host name, ``host:port``, an IP address
      (``[v6]:port`` with a port), a CIDR network (``10.0.0.0/8``), or ``*``
      (any public host). Unset or empty: Label Studio's origin and any public
      host. Set without ``*``: only the listed hosts and Label Studio's origin.
      Loopback, private and other non-public addresses are refused unless they
      are Label Studio's origin or listed (a listed name, IP or network permits
      them); link-local and cloud metadata addresses (``169.254.169.254``,
      ``metadata.google.internal``, ...) are always refused. The check is made
      on the resolved address at connect time, on every redirect. No proxy is
      used (``HTTP_PROXY`` and friends are ignored).
    * ``LOCAL_FILES_DOCUMENT_ROOT``: directories (separated by ``os.pathsep``)
      from which local paths and ``/data/local-files/?d=`` files may be read
      directly; unset = no local file access.

    Without ``LABEL_STUDIO_URL``, the ``hostname`` and ``access_token`` of
    Label Studio's ``/setup`` call are used as a pair (see
    :meth:`ImageLoader.update_from_setup`).
    """

    label_studio_url: str | None = None
    api_key: str | None = None
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    timeout_s: float = 30.0
    cache_bytes: int = 256 * 1024 * 1024
    allowed_hosts: tuple[str, ...] = ()
    local_roots: tuple[str, ...] = ()
    max_downloads: int = 8
    user_agent: str = "ovsam-labelstudio-backend"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ImageLoaderConfig":
        env = os.environ if env is None else env
        hosts = _env(env, "ALLOWED_IMAGE_HOSTS") or ""
        roots = _env(env, "LOCAL_FILES_DOCUMENT_ROOT") or ""
        cache_raw = _env(env, "IMAGE_CACHE_BYTES")
        try:
            cache_bytes = int(float(cache_raw)) if cache_raw is not None else cls.cache_bytes
        except ValueError as exc:
            raise ValueError(f"IMAGE_CACHE_BYTES={cache_raw!r} is not a number") from exc
        return cls(
            label_studio_url=_env(env, "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
            api_key=_env(env, "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            max_bytes=_env_number(env, "IMAGE_MAX_BYTES", cls.max_bytes, int),
            max_pixels=_env_number(env, "IMAGE_MAX_PIXELS", cls.max_pixels, int),
            timeout_s=_env_number(env, "IMAGE_TIMEOUT_S", cls.timeout_s, float),
            cache_bytes=max(cache_bytes, 0),
            allowed_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            local_roots=tuple(r for r in roots.split(os.pathsep) if r.strip()),
            max_downloads=_env_number(env, "IMAGE_MAX_DOWNLOADS", cls.max_downloads, int),
        )

    def warnings(self) -> list[str]:
        """Start-up warnings about how credentials will (not) be used."""
        out = []
        if not self.label_studio_url:
            out.append(
                "LABEL_STUDIO_URL is not set: the first /setup call decides which Label Studio this backend "
                "talks to (and sends that call's token to). Set LABEL_STUDIO_URL to fix it."
            )
            if self.api_key:
                out.append("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is not used (it is only "
                           "ever sent to LABEL_STUDIO_URL)")
        return out


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class _Source:
    """Where an image value points: a URL to download, a local file, or a data: URI."""

    kind: str  # "http", "file", "data"
    location: str
    local_fallback: list[Path] = field(default_factory=list)


class ImageLoader:
    """Loads task images as RGB ``uint8`` arrays ``(H, W, 3)``; safe to share between threads."""

    def __init__(self, config: ImageLoaderConfig | None = None, session: requests.Session | None = None) -> None:
        self.config = config or ImageLoaderConfig.from_env()
        self._env_origin: outbound.Origin | None = None
        if self.config.label_studio_url:
            try:
                self._env_origin = outbound.check_url(self.config.label_studio_url)
            except OutboundRefused as exc:
                raise ValueError(f"LABEL_STUDIO_URL={self.config.label_studio_url!r} cannot be used: {exc}") from exc
        self._setup_url: str | None = None
        self._setup_key: str | None = None
        self._setup_lock = threading.Lock()
        self._warned_setup_host = False
        self.policy = outbound.AddressPolicy(self.config.allowed_hosts, label_studio=self._label_studio_origin)
        self._session = outbound.guard_session(session or requests.Session(), self.policy)
        self._session.headers["User-Agent"] = self.config.user_agent
        self._cache: SizedLRU[bytes] = SizedLRU(self.config.cache_bytes, len)
        self._slots = threading.BoundedSemaphore(self.config.max_downloads)
        self._token: _Token | None = None
        self._token_lock = threading.Lock()
        self._roots = [Path(os.path.realpath(r)) for r in self.config.local_roots]
        # PIL raises DecompressionBombError only above twice this; we check the
        # header ourselves before decoding, so align PIL's warning threshold.
        if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < self.config.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.config.max_pixels

    # -- configuration -------------------------------------------------
    @property
    def label_studio_url(self) -> str | None:
        url = self.config.label_studio_url or self._setup_url
        return url.rstrip("/") if url else None

    @property
    def api_key(self) -> str | None:
        """The key for :attr:`label_studio_url`: the environment's only with LABEL_STUDIO_URL."""
        if self.config.label_studio_url:
            return self.config.api_key or self._setup_key
        return self._setup_key

    def _label_studio_origin(self) -> outbound.Origin | None:
        url = self.label_studio_url
        return outbound.origin_of(url) if url else None

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
                if token is not None and not self.config.api_key:
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
        with self._token_lock:
            self._token = None

    # -- public API ----------------------------------------------------
    def load(self, url: str) -> np.ndarray:
        """The image at ``url`` (task data value) as RGB uint8 ``(H, W, 3)``."""
        return self.decode(self.fetch_bytes(url), source=url)

    def load_task_image(self, task: Mapping[str, Any], value_key: str) -> np.ndarray:
        """The image of ``task["data"][value_key]`` (``ProjectSchema.image_value_key``)."""
        data = task.get("data") if isinstance(task, Mapping) else None
        url = data.get(value_key) if isinstance(data, Mapping) else None
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {task.get('id') if isinstance(task, Mapping) else '?'} has no image in data[{value_key!r}]")
        return self.load(url)

    def source_key(self, url: str) -> str:
        """A cheap identity of what :meth:`load` would return for ``url``; it changes when that changes.

        Local files (also ``/data/local-files`` read from disk): resolved path,
        inode, size, mtime and ctime. Label Studio-relative values: the absolute
        URL with the Label Studio origin in use. Other http(s) URLs: the URL
        itself; a remote object replaced under the same URL is not noticed (that
        would cost a request per use; Label Studio uploads get new names, and
        pre-signed URLs change when they are signed again). ``data:`` URIs: a
        SHA-256 of the URI. Raises :class:`ImageError` like :meth:`load`.
        """
        return self._locate(url)[1]

    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes behind a task image value (cached by :meth:`source_key`)."""
        source, key = self._locate(url)
        if source.kind == "data":
            return self._decode_data_uri(source.location)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if source.kind == "file":
            data = self._read_file(Path(source.location))
        else:
            data = self._download(source.location)
        self._cache.put(key, data)
        return data

    def label_studio_get(
        self, path: str, params: Mapping[str, str] | None = None, timeout: float | tuple[float, float] | None = None
    ) -> requests.Response:
        """GET ``path`` of Label Studio's API with our credentials; the caller closes the response."""
        return self.label_studio_request("GET", path, params=params, timeout=timeout)

    def label_studio_request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        """``method`` on ``path`` of Label Studio's API with our credentials; the caller closes the response.

        Redirects are not followed. Raises :class:`ImageError` when Label
        Studio's address is unknown or it cannot be reached.
        """
        base = self.label_studio_url
        if base is None:
            raise ImageError("LABEL_STUDIO_URL is not set")
        url = base + path + (f"?{urlencode(params)}" if params else "")
        retried = False
        while True:
            resp = self._send(method, url, json_body=json_body, timeout=timeout)
            if resp.status_code == 401 and self._uses_pat() and not retried:
                resp.close()
                retried = True
                with self._token_lock:
                    self._token = None
                continue
            return resp

    def decode(self, data: bytes, source: str = "image") -> np.ndarray:
        """Decode bytes to RGB uint8, checking the pixel count before decoding."""
        try:
            img = Image.open(io.BytesIO(data), formats=_formats())
            w, h = img.size
            if w * h > self.config.max_pixels:
                raise ImageError(
                    f"{source}: image is {w}x{h} = {w * h} pixels, more than the limit of "
                    f"{self.config.max_pixels} (IMAGE_MAX_PIXELS)"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:  # PIL's own check, far above our limit
            raise ImageError(
                f"{source}: image has too many pixels, more than the limit of "
                f"{self.config.max_pixels} (IMAGE_MAX_PIXELS): {exc}"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{source}: not an image (or an unsupported format)") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{source}: image is corrupt or truncated: {exc}") from exc

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- resolution ----------------------------------------------------
    def _is_label_studio(self, url: str) -> bool:
        origin = self._label_studio_origin()
        return origin is not None and outbound.origin_of(url) == origin

    def _locate(self, url: str) -> tuple[_Source, str]:
        """Where ``url`` is read from, and its :meth:`source_key`."""
        source = self._resolve(url)
        if source.kind == "data":
            return source, "data:sha256:" + hashlib.sha256(source.location.encode("utf-8", "surrogatepass")).hexdigest()
        for path in source.local_fallback:
            if path.is_file():
                source = _Source("file", str(path))
                break
        if source.kind == "file":
            return source, self._file_cache_key(Path(source.location))
        return source, source.location

    def _resolve(self, url: str) -> _Source:
        if not isinstance(url, str) or not url.strip():
            raise ImageError("image URL is empty")
        url = url.strip()
        lower = url.lower()
        if lower.startswith("data:"):
            return _Source("data", url)
        if lower.startswith(("http://", "https://")):
            self._check_syntax(url)
            return _Source("http", url)
        scheme = urlsplit(url).scheme
        if len(scheme) > 1:  # "c:" would be a Windows drive, anything longer a scheme
            raise ImageError(
                f"URL scheme {scheme!r} is not supported ({_redact(url)}); use http(s), a Label Studio "
                "URL, or a path under LOCAL_FILES_DOCUMENT_ROOT"
            )
        if url.startswith(_LS_RELATIVE_PREFIXES):
            fallback = self._local_files_candidates(url) if url.startswith("/data/local-files") else []
            base = self.label_studio_url
            if base is None:
                if fallback:
                    return _Source("file", str(fallback[0]))
                raise ImageError(
                    f"{url!r} is relative to Label Studio but LABEL_STUDIO_URL is not set"
                )
            absolute = base + url.replace(" ", "%20")  # file names with spaces; the host is ours
            self._check_syntax(absolute)
            return _Source("http", absolute, local_fallback=fallback)
        return _Source("file", str(self._local_path(url)))

    @staticmethod
    def _check_syntax(url: str) -> None:
        try:
            outbound.check_url(url)
        except OutboundRefused as exc:
            raise ImageError(f"image URL {_redact(url)!r} is refused: {exc}") from exc

    def _local_files_candidates(self, url: str) -> list[Path]:
        """Files under the roots that ``/data/local-files/?d=<path>`` may mean."""
        d = parse_qs(urlsplit(url).query).get("d", [""])[0]
        if not d:
            raise ImageError(f"{url!r} has no ?d=<path> parameter")
        out = []
        for root in self._roots:
            candidate = Path(os.path.realpath(root / d.lstrip("/")))
            if _inside(candidate, root):
                out.append(candidate)
        return [p for p in out if p.is_file()]

    def _local_path(self, path: str) -> Path:
        if not self._roots:
            raise ImageError(
                f"local file {path!r} cannot be read: local files are disabled "
                "(set LOCAL_FILES_DOCUMENT_ROOT)"
            )
        raw = Path(unquote(path))
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self._roots]
        for candidate in candidates:
            resolved = Path(os.path.realpath(candidate))
            if any(_inside(resolved, root) for root in self._roots):
                return resolved
        raise ImageError(f"local file {path!r} is outside the allowed roots (LOCAL_FILES_DOCUMENT_ROOT)")

    # -- reading -------------------------------------------------------
    def _file_cache_key(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError as exc:
            raise ImageError(f"local file {str(path)!r} cannot be read: {exc.strerror}") from exc
        return f"file://{path}?{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def _read_file(self, path: Path) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.config.max_bytes:
                raise ImageError(self._too_big(str(path), size))
            with path.open("rb") as fh:
                data = fh.read(self.config.max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"local file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
        if len(data) > self.config.max_bytes:
            raise ImageError(self._too_big(str(path), len(data)))
        return data

    def _decode_data_uri(self, uri: str) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep or ";base64" not in header.lower():
            raise ImageError("data: URI image must be base64-encoded")
        if len(payload) * 3 // 4 > self.config.max_bytes:
            raise ImageError(self._too_big("data: URI", len(payload) * 3 // 4))
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("data: URI image is not valid base64") from exc

    def _too_big(self, what: str, size: int) -> str:
        return f"{what}: {size} bytes is more than the limit of {self.config.max_bytes} bytes (IMAGE_MAX_BYTES)"

    # -- downloading ---------------------------------------------------
    def _download(self, url: str) -> bytes:
        """One download under one deadline (IMAGE_TIMEOUT_S) and one of IMAGE_MAX_DOWNLOADS slots."""
        with outbound.deadline(self.config.timeout_s) as limit:
            if not self._slots.acquire(timeout=limit.remaining()):
                raise ImageError(
                    f"{_redact(url)}: timed out after {self.config.timeout_s:g} s waiting for one of "
                    f"{self.config.max_downloads} download slots (IMAGE_MAX_DOWNLOADS)"
                )
            try:
                data = self._follow(url, limit)
            except ImageError as exc:
                if limit.expired:
                    raise ImageError(self._timed_out(url)) from exc
                raise
            finally:
                self._slots.release()
            if limit.expired:  # the body may have been cut short by the deadline
                raise ImageError(self._timed_out(url))
            return data

    def _timed_out(self, url: str) -> str:
        return f"{_redact(url)}: timed out after {self.config.timeout_s:g} s (IMAGE_TIMEOUT_S, whole download)"

    def _follow(self, url: str, limit: outbound.Deadline) -> bytes:
        """GET, following redirects by hand: every hop is checked, credentials only on Label Studio's origin."""
        retried_auth = False
        hops = 0
        previous: str | None = None
        while True:
            if limit.remaining() <= 0:
                raise ImageError(self._timed_out(url))
            resp = self._send("GET", url, redirected_from=previous)
            try:
                label_studio = self._is_label_studio(url)
                if resp.is_redirect:
                    if hops >= _MAX_REDIRECTS:
                        raise ImageError(f"{_redact(url)}: too many redirects")
                    target = urljoin(url, resp.headers.get("Location", ""))
                    try:
                        outbound.check_url(target)
                    except OutboundRefused as exc:
                        raise ImageError(f"{_redact(url)} redirects to a host that is not allowed: {exc}") from exc
                    previous, url, hops = url, target, hops + 1
                    continue
                if resp.status_code == 401 and label_studio and not retried_auth and self._uses_pat():
                    retried_auth = True
                    with self._token_lock:
                        self._token = None
                    continue
                if resp.status_code >= 400:
                    raise ImageError(self._status_message(url, resp.status_code, label_studio))
                return self._read_body(url, resp)
            finally:
                resp.close()

    def _send(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        credentials: bool = True,
        redirected_from: str | None = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        """One request through the guarded session; our credentials only if it goes to Label Studio's origin."""
        try:
            origin = outbound.check_url(url)
            prepared = self._session.prepare_request(requests.Request(method, url, json=json_body))
            if outbound.origin_of(prepared.url or "") != origin:  # what is sent must be what was checked
                raise OutboundRefused("the URL is ambiguous")
        except OutboundRefused as exc:
            raise self._refused(url, redirected_from, exc) from exc
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise ImageError(f"{_redact(url)}: malformed URL ({_short(exc)})") from exc
        if credentials and origin == self._label_studio_origin():
            prepared.headers.update(self._auth_header())
        if timeout is None:
            limit = outbound.current_deadline()
            left = limit.remaining() if limit is not None else self.config.timeout_s
            timeout = (max(min(left, 10.0), 0.001), max(left, 0.001))
        adapter = self._session.get_adapter(prepared.url or url)
        try:
            # The adapter, not Session.send: the session would read a redirect's whole body.
            return adapter.send(prepared, stream=True, timeout=timeout)
        except OutboundRefused as exc:
            raise self._refused(url, redirected_from, exc) from exc
        except requests.exceptions.Timeout as exc:
            raise ImageError(self._timed_out(url)) from exc
        except requests.exceptions.ConnectionError as exc:
            raise ImageError(f"{_redact(url)}: cannot connect to the host ({_short(exc)})") from exc
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"{_redact(url)}: request failed ({_short(exc)})") from exc

    @staticmethod
    def _refused(url: str, redirected_from: str | None, exc: OutboundRefused) -> ImageError:
        if redirected_from is not None:
            return ImageError(f"{_redact(redirected_from)} redirects to a host that is not allowed: {exc}")
        return ImageError(f"host of {_redact(url)} is not allowed: {exc}")

    def _read_body(self, url: str, resp: requests.Response) -> bytes:
        limit = self.config.max_bytes
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ImageError(self._too_big(_redact(url), int(declared)))
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise ImageError(self._too_big(_redact(url), len(buf)) + " (download aborted)")
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"{_redact(url)}: download failed ({_short(exc)})") from exc
        return bytes(buf)

    def _status_message(self, url: str, status: int, label_studio: bool) -> str:
        where = _redact(url)
        if label_studio and status in (401, 403):
            if self.api_key is None:
                hint = "set LABEL_STUDIO_API_KEY"
            elif self._uses_pat():
                hint = "check that LABEL_STUDIO_API_KEY is a valid personal access token"
            else:
                hint = (
                    "check LABEL_STUDIO_API_KEY; legacy tokens only work when they are enabled for "
                    "the organization, otherwise use a personal access token"
                )
            return f"{where}: Label Studio answered HTTP {status} ({hint})"
        if status == 404:
            return f"{where}: image not found (HTTP 404)"
        if status == 403 and not label_studio:
            return f"{where}: access denied (HTTP 403; a pre-signed URL may have expired)"
        return f"{where}: HTTP {status}"

    # -- authentication ------------------------------------------------
    def _uses_pat(self) -> bool:
        key = self.api_key
        return key is not None and is_jwt(key)

    def _auth_header(self, force_refresh: bool = False) -> dict[str, str]:
        key = self.api_key
        if not key:
            return {}
        if not is_jwt(key):
            return {"Authorization": f"Token {key}"}
        with self._token_lock:
            now = time.time()
            if force_refresh or self._token is None or now >= self._token.expires_at - _TOKEN_MARGIN_S:
                self._token = self._refresh_access_token(key)
            return {"Authorization": f"Bearer {self._token.value}"}

    def _refresh_access_token(self, pat: str) -> _Token:
        url = f"{self.label_studio_url}/api/token/refresh/"
        resp = self._send("POST", url, json_body={"refresh": pat}, credentials=False)
        with resp:
            if resp.status_code != 200:
                raise ImageError(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} from "
                    "/api/token/refresh/); check LABEL_STUDIO_API_KEY"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError, requests.exceptions.RequestException):
                access = None
        if not isinstance(access, str) or not access:
            raise ImageError("Label Studio's /api/token/refresh/ answer has no access token")
        exp = _jwt_exp(access)
        expires_at = exp if exp is not None else time.time() + _DEFAULT_TOKEN_LIFETIME_S
        log.debug("refreshed Label Studio access token, expires at %s", expires_at)
        return _Token(access, expires_at)


def _origin_text(origin: outbound.Origin | None) -> str:
    if origin is None:
        return "?"
    scheme, host, port = origin
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# Formats browsers (and so Label Studio) display, plus TIFF/PPM. Restricting
# them keeps PIL from handing untrusted bytes to e.g. Ghostscript (EPS).
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")


def _formats() -> list[str]:
    Image.init()
    return [f for f in _ALLOWED_FORMATS if f in Image.OPEN]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _redact(url: str) -> str:
    """URL without its query string (pre-signed URLs carry credentials there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if parts.path.startswith("/data/local-files"):
        return url
    return parts._replace(query="", fragment="").geturl()


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8; 16-bit/32-bit grey is scaled to 8 bits as browsers do."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        grey = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":
        grey = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()
