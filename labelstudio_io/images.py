"""Fetch task images the way Label Studio shows them, safely.

A task's image value can be a path relative to Label Studio (``/data/upload/...``,
``/data/local-files/?d=...``, ``/tasks/<id>/resolve/?fileuri=...``), an absolute
http(s) URL (often a pre-signed cloud URL), a ``data:`` URI, or a local path.
Relative URLs need Label Studio's address and an API key: every request goes
through the loader's :class:`~.client.LabelStudioClient` (``ImageLoader.client``),
which pairs them, refreshes access tokens, sends credentials only to Label Studio's
origin and checks every address contacted against the outbound policy.

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
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from . import outbound
from .client import ClientError, LabelStudioClient, redact_url, short_error
from ovsam.cache import SizedLRU
from .outbound import OutboundRefused

__all__ = ["ImageError", "ImageLoader", "ImageLoaderConfig"]

log = logging.getLogger(__name__)

_LS_RELATIVE_PREFIXES = ("/data/upload/", "/data/local-files", "/storage-data/", "/tasks/", "/projects/", "/api/")
_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class ImageError(ValueError):
    """The task image cannot be loaded (message says why)."""


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
    :meth:`LabelStudioClient.update_from_setup`).
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
class _Source:
    """Where an image value points: a URL to download, a local file, or a data: URI."""

    kind: str  # "http", "file", "data"
    location: str
    local_fallback: list[Path] = field(default_factory=list)


class ImageLoader:
    """Loads task images as RGB ``uint8`` arrays ``(H, W, 3)``; safe to share between threads."""

    def __init__(self, config: ImageLoaderConfig | None = None, session: requests.Session | None = None) -> None:
        self.config = config or ImageLoaderConfig.from_env()
        self.client = LabelStudioClient(
            self.config.label_studio_url,
            self.config.api_key,
            allowed_hosts=self.config.allowed_hosts,
            user_agent=self.config.user_agent,
            timeout_s=self.config.timeout_s,
            session=session,
        )
        self._cache: SizedLRU[bytes] = SizedLRU(self.config.cache_bytes, len)
        self._slots = threading.BoundedSemaphore(self.config.max_downloads)
        self._roots = [Path(os.path.realpath(r)) for r in self.config.local_roots]
        # PIL raises DecompressionBombError only above twice this; we check the
        # header ourselves before decoding, so align PIL's warning threshold.
        if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < self.config.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.config.max_pixels

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
                f"URL scheme {scheme!r} is not supported ({redact_url(url)}); use http(s), a Label Studio "
                "URL, or a path under LOCAL_FILES_DOCUMENT_ROOT"
            )
        if url.startswith(_LS_RELATIVE_PREFIXES):
            fallback = self._local_files_candidates(url) if url.startswith("/data/local-files") else []
            base = self.client.label_studio_url
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
            raise ImageError(f"image URL {redact_url(url)!r} is refused: {exc}") from exc

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
                    f"{redact_url(url)}: timed out after {self.config.timeout_s:g} s waiting for one of "
                    f"{self.config.max_downloads} download slots (IMAGE_MAX_DOWNLOADS)"
                )
            try:
                data = self._follow(url, limit)
            except ImageError as exc:
                if limit.expired:
                    raise ImageError(self.client.timed_out(url)) from exc
                raise
            finally:
                self._slots.release()
            if limit.expired:  # the body may have been cut short by the deadline
                raise ImageError(self.client.timed_out(url))
            return data

    def _follow(self, url: str, limit: outbound.Deadline) -> bytes:
        """GET, following redirects by hand: every hop is checked, credentials only on Label Studio's origin."""
        retried_auth = False
        hops = 0
        previous: str | None = None
        while True:
            if limit.remaining() <= 0:
                raise ImageError(self.client.timed_out(url))
            try:
                resp = self.client.send("GET", url, redirected_from=previous)
            except ClientError as exc:
                raise ImageError(str(exc)) from exc
            try:
                label_studio = self.client.is_label_studio(url)
                if resp.is_redirect:
                    if hops >= _MAX_REDIRECTS:
                        raise ImageError(f"{redact_url(url)}: too many redirects")
                    target = urljoin(url, resp.headers.get("Location", ""))
                    try:
                        outbound.check_url(target)
                    except OutboundRefused as exc:
                        raise ImageError(f"{redact_url(url)} redirects to a host that is not allowed: {exc}") from exc
                    previous, url, hops = url, target, hops + 1
                    continue
                if resp.status_code == 401 and label_studio and not retried_auth and self.client.uses_pat():
                    retried_auth = True
                    self.client.forget_token()
                    continue
                if resp.status_code >= 400:
                    raise ImageError(self._status_message(url, resp.status_code, label_studio))
                return self._read_body(url, resp)
            finally:
                resp.close()

    def _read_body(self, url: str, resp: requests.Response) -> bytes:
        limit = self.config.max_bytes
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ImageError(self._too_big(redact_url(url), int(declared)))
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise ImageError(self._too_big(redact_url(url), len(buf)) + " (download aborted)")
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"{redact_url(url)}: download failed ({short_error(exc)})") from exc
        return bytes(buf)

    def _status_message(self, url: str, status: int, label_studio: bool) -> str:
        where = redact_url(url)
        if label_studio and status in (401, 403):
            if self.client.api_key is None:
                hint = "set LABEL_STUDIO_API_KEY"
            elif self.client.uses_pat():
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


# Formats browsers (and so Label Studio) display, plus TIFF/PPM. Restricting
# them keeps PIL from handing untrusted bytes to e.g. Ghostscript (EPS).
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")


def _formats() -> list[str]:
    Image.init()
    return [f for f in _ALLOWED_FORMATS if f in Image.OPEN]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


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
