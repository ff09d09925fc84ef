"""Fetch task images the way Label Studio shows them, safely.

A task's image value can be a path relative to Label Studio (``/data/upload/...``,
``/data/local-files/?d=...``, ``/tasks/<id>/resolve/?fileuri=...``), an absolute
http(s) URL (often a pre-signed cloud URL), a ``data:`` URI, or a local path.
Relative URLs need Label Studio's address and an API key: a legacy key is sent as
``Token <key>``; a personal access token (a JWT refresh token) is exchanged at
``/api/token/refresh/`` for a short-lived access token sent as ``Bearer``. Our
credentials are only ever sent to Label Studio's own host.

Task data is user input, so downloads are bounded (timeouts, bytes, pixels; the
pixel count is read from the header before decoding) and local reads are
confined to configured roots. EXIF orientation is applied because browsers, and
so Label Studio's ``original_width``/``original_height``, use it. Every failure
raises :class:`ImageError` with a message fit for the annotator.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "ImageLoader", "ImageLoaderConfig", "is_jwt"]

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


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with default ports filled in, for host comparisons."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


@dataclass(frozen=True)
class ImageLoaderConfig:
    """Settings of :class:`ImageLoader`; :meth:`from_env` reads them from the environment.

    Environment variables:

    * ``LABEL_STUDIO_URL`` (alias ``LABEL_STUDIO_HOST``): Label Studio's address,
      for relative task URLs such as ``/data/upload/1/x.png``.
    * ``LABEL_STUDIO_API_KEY`` (alias ``LABEL_STUDIO_ACCESS_TOKEN``): legacy API
      key or personal access token.
    * ``IMAGE_MAX_BYTES`` (default 64 MiB), ``IMAGE_MAX_PIXELS`` (default 100 M),
      ``IMAGE_TIMEOUT_S`` (connect and read timeout, default 30 s),
      ``IMAGE_CACHE_BYTES`` (in-memory cache of downloads, default 256 MiB; 0 = off).
    * ``ALLOWED_IMAGE_HOSTS``: comma-separated host names (or ``host:port``) that
      absolute URLs may point to; empty = any http(s) host. Label Studio's own
      host is always allowed.
    * ``LOCAL_FILES_DOCUMENT_ROOT``: directories (separated by ``os.pathsep``)
      from which local paths and ``/data/local-files/?d=`` files may be read
      directly; unset = no local file access.

    When ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` are unset, the
    ``hostname`` / ``access_token`` of Label Studio's ``/setup`` call are used
    (see :meth:`ImageLoader.update_from_setup`).
    """

    label_studio_url: str | None = None
    api_key: str | None = None
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    timeout_s: float = 30.0
    cache_bytes: int = 256 * 1024 * 1024
    allowed_hosts: tuple[str, ...] = ()
    local_roots: tuple[str, ...] = ()
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
        )


class _ByteLRU:
    """Thread-safe LRU of bytes, bounded by total size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.limit:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class _Source:
    """Where an image value points: a URL to download or a local file."""

    kind: str  # "http", "file", "data"
    location: str
    label_studio: bool = False
    local_fallback: list[Path] = field(default_factory=list)


class ImageLoader:
    """Loads task images as RGB ``uint8`` arrays ``(H, W, 3)``; safe to share between threads."""

    def __init__(self, config: ImageLoaderConfig | None = None, session: requests.Session | None = None) -> None:
        self.config = config or ImageLoaderConfig.from_env()
        self._setup_url: str | None = None
        self._setup_key: str | None = None
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = self.config.user_agent
        self._cache = _ByteLRU(self.config.cache_bytes)
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
        return self.config.api_key or self._setup_key

    def update_from_setup(self, hostname: str | None, access_token: str | None) -> None:
        """Use ``/setup``'s hostname/access_token where the environment sets none."""
        changed = False
        if hostname and isinstance(hostname, str) and hostname != self._setup_url:
            self._setup_url, changed = hostname.strip(), True
        if access_token and isinstance(access_token, str) and access_token != self._setup_key:
            self._setup_key, changed = access_token.strip(), True
        if changed and not self.config.api_key:
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

    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes behind a task image value (cached by resolved location)."""
        source = self._resolve(url)
        if source.kind == "data":
            return self._decode_data_uri(source.location)
        cache_key = source.location
        if source.kind == "file":
            cache_key = self._file_cache_key(Path(source.location))
        else:
            for path in source.local_fallback:
                if path.is_file():
                    source = _Source("file", str(path))
                    cache_key = self._file_cache_key(path)
                    break
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        if source.kind == "file":
            data = self._read_file(Path(source.location))
        else:
            data = self._download(source.location, source.label_studio)
        self._cache.put(cache_key, data)
        return data

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
        base = self.label_studio_url
        return base is not None and _origin(url) is not None and _origin(url) == _origin(base)

    def _host_allowed(self, url: str) -> bool:
        if not self.config.allowed_hosts or self._is_label_studio(url):
            return True
        origin = _origin(url)
        if origin is None:
            return False
        _, host, port = origin
        return host in self.config.allowed_hosts or f"{host}:{port}" in self.config.allowed_hosts

    def _resolve(self, url: str) -> _Source:
        if not isinstance(url, str) or not url.strip():
            raise ImageError("image URL is empty")
        url = url.strip()
        lower = url.lower()
        if lower.startswith("data:"):
            return _Source("data", url)
        if lower.startswith(("http://", "https://")):
            if _origin(url) is None:
                raise ImageError(f"malformed image URL {url!r}")
            if not self._host_allowed(url):
                raise ImageError(
                    f"host of {_redact(url)} is not allowed (ALLOWED_IMAGE_HOSTS={','.join(self.config.allowed_hosts)})"
                )
            return _Source("http", url, label_studio=self._is_label_studio(url))
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
            return _Source("http", base + url, label_studio=True, local_fallback=fallback)
        return _Source("file", str(self._local_path(url)))

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
        return f"file://{path}?{st.st_mtime_ns}:{st.st_size}"

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

    def _download(self, url: str, label_studio: bool) -> bytes:
        """GET with our auth only on Label Studio's host, following redirects by hand."""
        retried_auth = False
        hops = 0
        trusted = label_studio  # a redirect issued by Label Studio is trusted
        while True:
            headers = self._auth_header(force_refresh=False) if label_studio else {}
            resp = self._get(url, headers)
            try:
                if resp.is_redirect:
                    if hops >= _MAX_REDIRECTS:
                        raise ImageError(f"{_redact(url)}: too many redirects")
                    target = urljoin(url, resp.headers.get("Location", ""))
                    if _origin(target) is None:
                        raise ImageError(f"{_redact(url)} redirects to an unsupported URL")
                    if not trusted and not self._host_allowed(target):
                        raise ImageError(f"{_redact(url)} redirects to a host that is not allowed")
                    url, hops = target, hops + 1
                    label_studio = self._is_label_studio(target)
                    trusted = label_studio
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

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        timeout = (min(self.config.timeout_s, 10.0), self.config.timeout_s)
        try:
            return self._session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
        except requests.exceptions.Timeout as exc:
            raise ImageError(f"{_redact(url)}: timed out after {self.config.timeout_s:g} s") from exc
        except requests.exceptions.ConnectionError as exc:
            raise ImageError(f"{_redact(url)}: cannot connect to the host ({_short(exc)})") from exc
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"{_redact(url)}: request failed ({_short(exc)})") from exc

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
        base = self.label_studio_url
        url = f"{base}/api/token/refresh/"
        timeout = (min(self.config.timeout_s, 10.0), self.config.timeout_s)
        try:
            resp = self._session.post(url, json={"refresh": pat}, timeout=timeout, allow_redirects=False)
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"cannot reach Label Studio to refresh the access token ({_short(exc)})") from exc
        with resp:
            if resp.status_code != 200:
                raise ImageError(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} from "
                    "/api/token/refresh/); check LABEL_STUDIO_API_KEY"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise ImageError("Label Studio's /api/token/refresh/ answer has no access token")
        exp = _jwt_exp(access)
        expires_at = exp if exp is not None else time.time() + _DEFAULT_TOKEN_LIFETIME_S
        log.debug("refreshed Label Studio access token, expires at %s", expires_at)
        return _Token(access, expires_at)


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
