"""ImageLoader against tiny local HTTP servers: auth, limits, redirects, local files, cache."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from labelstudio_io.client import is_jwt
from labelstudio_io.images import ImageError, ImageLoader, ImageLoaderConfig

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def make_jwt(payload: dict) -> str:
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.c2lnbmF0dXJl"


PAT = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 10**8, "jti": "pat"})


def png_bytes(w: int = 16, h: int = 12, mode: str = "RGB", color=(200, 10, 30)) -> bytes:
    img = Image.new(mode, (w, h), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int = 50_000, h: int = 50_000) -> bytes:
    """A small PNG whose header declares w x h pixels."""
    data = bytearray(png_bytes(4, 4))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def exif_jpeg() -> bytes:
    """40 x 20 JPEG, left half red, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


IMAGE = png_bytes()
NOISE = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(NOISE, format="PNG")
TRUNCATED = NOISE.getvalue()[: len(NOISE.getvalue()) * 2 // 3]


class State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.valid_access: set[str] = set()
        self.access_lifetime = 3600.0
        self.refresh_calls = 0
        self.hits: Counter[str] = Counter()
        self.auth: dict[str, list[str | None]] = defaultdict(list)
        self.other_port = 0


STATE = State()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth == f"Token {LEGACY_KEY}":
            return True
        return bool(auth and auth.startswith("Bearer ") and auth[7:] in STATE.valid_access)

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/token/refresh/":
            return self._send(404)
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        STATE.refresh_calls += 1
        if body.get("refresh") != PAT:
            return self._send(401, b'{"detail": "Token is invalid"}', "application/json")
        access = make_jwt({"token_type": "access", "exp": time.time() + STATE.access_lifetime,
                           "n": STATE.refresh_calls})
        STATE.valid_access.add(access)
        self._send(200, json.dumps({"access": access}).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        STATE.hits[self.path] += 1
        STATE.auth[path].append(self.headers.get("Authorization"))
        if path.startswith(("/data/", "/tasks/")):
            if not self._authorized():
                return self._send(401, b'{"detail": "Authentication credentials were not provided."}',
                                  "application/json")
            if path == "/data/upload/1/redirect-out.png":
                loc = f"http://127.0.0.1:{STATE.other_port}/public/img.png?X-Amz-Signature=abc"
                return self._send(302, b"", headers={"Location": loc})
            if path.startswith("/data/upload/") or path.startswith("/data/local-files"):
                return self._send(200, IMAGE, "image/png")
            return self._send(404)
        routes = {
            "/public/img.png": lambda: self._send(200, IMAGE, "image/png"),
            "/public/img2.png": lambda: self._send(200, png_bytes(8, 8), "image/png"),
            "/public/exif.jpg": lambda: self._send(200, exif_jpeg(), "image/jpeg"),
            "/public/bomb.png": lambda: self._send(200, bomb_png(), "image/png"),
            "/public/notimage": lambda: self._send(200, b"<html>hello</html>", "text/html"),
            "/public/truncated.png": lambda: self._send(200, TRUNCATED, "image/png"),
            "/public/big-declared": lambda: self._send(200, b"x" * 300_000, "image/png"),
            "/public/big-stream": self._big_stream,
            "/public/missing.png": lambda: self._send(404, b"nope"),
            "/public/error.png": lambda: self._send(500, b"boom"),
            "/public/slow.png": self._slow,
            "/public/redirect-ls": lambda: self._send(
                302, b"", headers={"Location": "/data/upload/1/img.png"}),
            "/public/redirect-other": lambda: self._send(
                302, b"", headers={"Location": f"http://127.0.0.1:{STATE.other_port}/public/img.png"}),
            "/public/loop": lambda: self._send(302, b"", headers={"Location": "/public/loop"}),
        }
        handler = routes.get(path)
        if handler is None:
            return self._send(404)
        handler()

    def _big_stream(self) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"\0" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _slow(self) -> None:
        time.sleep(1.5)
        try:
            self._send(200, IMAGE, "image/png")
        except (BrokenPipeError, ConnectionResetError):
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 stalls concurrent connects for 1 s


def _serve() -> tuple[ThreadingHTTPServer, str]:
    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def servers():
    ls, ls_url = _serve()  # plays Label Studio
    other, other_url = _serve()  # plays a cloud bucket (a different origin)
    STATE.other_port = other.server_address[1]
    yield ls_url, other_url
    for s in (ls, other):
        s.shutdown()
        s.server_close()


@pytest.fixture
def ls_url(servers):
    STATE.reset()
    STATE.other_port = int(servers[1].rsplit(":", 1)[1])
    return servers[0]


@pytest.fixture
def other_url(servers):
    return servers[1]


def loader(ls_url=None, key=None, **kw) -> ImageLoader:
    # The "bucket" servers of these tests are on loopback, which the outbound
    # policy refuses unless listed (see test_security_outbound.py for that).
    kw.setdefault("allowed_hosts", ("127.0.0.1",))
    return ImageLoader(ImageLoaderConfig(label_studio_url=ls_url, api_key=key, **kw))


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- decoding and formats --------------------------------------------------


def test_legacy_token_relative_upload_url(ls_url):
    img = loader(ls_url, LEGACY_KEY).load("/data/upload/1/img.png")
    assert img.shape == (12, 16, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (200, 10, 30)
    assert STATE.auth["/data/upload/1/img.png"] == [f"Token {LEGACY_KEY}"]


def test_trailing_slash_and_absolute_label_studio_url(ls_url):
    ld = loader(ls_url + "/", LEGACY_KEY)
    ld.load(ls_url + "/data/upload/1/abs.png")
    assert STATE.auth["/data/upload/1/abs.png"] == [f"Token {LEGACY_KEY}"]
    ld.load("/data/local-files/?d=images/x.png")
    assert STATE.hits["/data/local-files/?d=images/x.png"] == 1


def test_exif_orientation_applied(ls_url, other_url):
    img = loader().load(other_url + "/public/exif.jpg")
    assert img.shape == (40, 20, 3)  # rotated: displayed 20 wide, 40 high
    # orientation 6 rotates 90 degrees clockwise: the red left half ends up on top
    assert img[5, 10, 0] > 200 and img[5, 10, 2] < 60
    assert img[35, 10, 2] > 200 and img[35, 10, 0] < 60


@pytest.mark.parametrize("mode,color", [("RGBA", (1, 2, 3, 0)), ("L", 77), ("P", 5), ("CMYK", (0, 0, 0, 0))])
def test_modes_become_rgb_uint8(mode, color):
    img = Image.new(mode, (5, 4), color)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    out = loader().decode(buf.getvalue())
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_16_bit_grey_is_scaled():
    arr = np.full((3, 4), 65535, np.uint16)
    arr[0, 0] = 0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = loader().decode(buf.getvalue())
    assert out.shape == (3, 4, 3)
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert loader().load(uri).shape == (12, 16, 3)
    with pytest.raises(ImageError, match="base64"):
        loader().load("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="IMAGE_MAX_BYTES"):
        loader(max_bytes=10).load(uri)


def test_not_an_image_and_truncated(other_url):
    with pytest.raises(ImageError, match="not an image"):
        loader().load(other_url + "/public/notimage")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        loader().load(other_url + "/public/truncated.png")


def test_eps_is_not_decoded():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not an image"):
        loader().decode(eps)


# -- limits ----------------------------------------------------------------


def test_pixel_limit_checked_from_header(other_url):
    with pytest.raises(ImageError, match="too many pixels.*IMAGE_MAX_PIXELS"):
        loader(max_pixels=10_000_000).load(other_url + "/public/bomb.png")
    with pytest.raises(ImageError, match="16x12 = 192 pixels"):
        loader(max_pixels=100).load(other_url + "/public/img.png")
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 10_000_000


def test_byte_limit_declared_and_streamed(other_url):
    with pytest.raises(ImageError, match="300000 bytes.*IMAGE_MAX_BYTES"):
        loader(max_bytes=100_000).load(other_url + "/public/big-declared")
    start = time.perf_counter()
    with pytest.raises(ImageError, match="download aborted"):
        loader(max_bytes=200_000).load(other_url + "/public/big-stream")
    assert time.perf_counter() - start < 5


def test_timeout(other_url):
    start = time.perf_counter()
    with pytest.raises(ImageError, match="timed out"):
        loader(timeout_s=0.3).load(other_url + "/public/slow.png")
    assert time.perf_counter() - start < 1.4


def test_unreachable_host():
    with pytest.raises(ImageError, match="cannot connect"):
        loader(timeout_s=2).load(f"http://127.0.0.1:{closed_port()}/x.png")


@pytest.mark.parametrize("path,message", [("/public/missing.png", "not found"), ("/public/error.png", "HTTP 500")])
def test_http_status(other_url, path, message):
    with pytest.raises(ImageError, match=message):
        loader().load(other_url + path)


def test_presigned_query_not_in_errors(other_url):
    with pytest.raises(ImageError) as info:
        loader().load(other_url + "/public/missing.png?X-Amz-Signature=secret123")
    assert "secret123" not in str(info.value)


# -- authentication --------------------------------------------------------


def test_personal_access_token_exchanged_and_cached(ls_url):
    ld = loader(ls_url, PAT)
    ld.load("/data/upload/1/a.png")
    ld.load("/data/upload/1/b.png")
    assert STATE.refresh_calls == 1
    (auth_a,), (auth_b,) = STATE.auth["/data/upload/1/a.png"], STATE.auth["/data/upload/1/b.png"]
    assert auth_a == auth_b and auth_a.startswith("Bearer ") and auth_a != f"Bearer {PAT}"


def test_access_token_refreshed_before_expiry(ls_url):
    STATE.access_lifetime = 10  # inside the refresh margin: every use refreshes
    ld = loader(ls_url, PAT)
    ld.load("/data/upload/1/a.png")
    ld.load("/data/upload/1/b.png")
    assert STATE.refresh_calls == 2
    assert STATE.auth["/data/upload/1/a.png"] != STATE.auth["/data/upload/1/b.png"]


def test_access_token_refreshed_once_on_401(ls_url):
    ld = loader(ls_url, PAT)
    ld.load("/data/upload/1/a.png")
    STATE.valid_access.clear()  # server forgets the token (e.g. restart)
    ld.load("/data/upload/1/b.png")
    assert STATE.refresh_calls == 2
    assert len(STATE.auth["/data/upload/1/b.png"]) == 2  # 401, then the retry


def test_wrong_pat_is_reported(ls_url):
    bad = make_jwt({"token_type": "refresh", "jti": "other"})
    with pytest.raises(ImageError, match="refused the personal access token"):
        loader(ls_url, bad).load("/data/upload/1/a.png")


def test_wrong_legacy_key_and_missing_key(ls_url):
    with pytest.raises(ImageError, match="HTTP 401.*legacy tokens"):
        loader(ls_url, "wrongkey").load("/data/upload/1/a.png")
    with pytest.raises(ImageError, match="HTTP 401.*set LABEL_STUDIO_API_KEY"):
        loader(ls_url).load("/data/upload/1/a.png")


def test_no_auth_header_to_other_hosts(ls_url, other_url):
    loader(ls_url, LEGACY_KEY).load(other_url + "/public/img.png?X-Amz-Signature=abc")
    assert STATE.auth["/public/img.png"] == [None]


def test_redirect_from_label_studio_to_bucket_drops_auth(ls_url, other_url):
    port = urlsplit(other_url).port
    ld = loader(ls_url, LEGACY_KEY, allowed_hosts=("example.org", f"127.0.0.1:{port}"))
    assert ld.load("/data/upload/1/redirect-out.png").shape == (12, 16, 3)
    assert STATE.auth["/data/upload/1/redirect-out.png"] == [f"Token {LEGACY_KEY}"]
    assert STATE.auth["/public/img.png"] == [None]


def test_redirect_from_label_studio_is_checked_like_any_other(ls_url, other_url):
    # Label Studio's redirects get no trust of their own: the bucket must be allowed too.
    ld = loader(ls_url, LEGACY_KEY, allowed_hosts=("example.org",))
    with pytest.raises(ImageError, match="redirects to a host that is not allowed"):
        ld.load("/data/upload/1/redirect-out.png")
    assert STATE.auth["/data/upload/1/redirect-out.png"] == [f"Token {LEGACY_KEY}"]
    assert STATE.hits["/public/img.png?X-Amz-Signature=abc"] == 0


def test_redirect_to_label_studio_gets_auth(ls_url):
    ld = loader(ls_url, LEGACY_KEY)
    ld.load(ls_url + "/public/redirect-ls")
    assert STATE.auth["/public/redirect-ls"] == [f"Token {LEGACY_KEY}"]  # same host as Label Studio
    assert STATE.auth["/data/upload/1/img.png"] == [f"Token {LEGACY_KEY}"]


def test_redirect_loops_and_disallowed_redirects(ls_url, other_url):
    with pytest.raises(ImageError, match="too many redirects"):
        loader().load(other_url + "/public/loop")
    # a bucket allowed by port redirecting elsewhere is refused
    port = urlsplit(ls_url).port
    ld = loader(allowed_hosts=(f"127.0.0.1:{port}",))
    with pytest.raises(ImageError, match="redirects to a host that is not allowed"):
        ld.load(ls_url + "/public/redirect-other")


def test_allowed_hosts(ls_url, other_url):
    ld = loader(ls_url, LEGACY_KEY, allowed_hosts=("example.org",))
    with pytest.raises(ImageError, match="not allowed"):
        ld.load(other_url + "/public/img.png")
    assert ld.load(ls_url + "/data/upload/1/a.png").shape == (12, 16, 3)  # Label Studio itself
    port = urlsplit(other_url).port
    assert loader(allowed_hosts=(f"127.0.0.1:{port}",)).load(other_url + "/public/img.png").shape[2] == 3


def test_is_jwt():
    assert is_jwt(PAT)
    assert not is_jwt(LEGACY_KEY)
    assert not is_jwt("a.b.c")
    assert not is_jwt("")


# -- configuration ---------------------------------------------------------


def test_relative_url_needs_label_studio_url():
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL is not set"):
        loader().load("/data/upload/1/a.png")


def test_setup_fallback(ls_url):
    ld = loader()
    ld.client.update_from_setup(ls_url, LEGACY_KEY)
    assert ld.load("/data/upload/1/a.png").shape == (12, 16, 3)
    # environment values win over /setup
    ld = loader(ls_url, PAT)
    ld.client.update_from_setup("http://localhost:1", LEGACY_KEY)
    assert (ld.client.label_studio_url, ld.client.api_key) == (ls_url, PAT)


def test_from_env_aliases_and_numbers(tmp_path):
    env = {
        "LABEL_STUDIO_HOST": "http://ls:8080/",
        "LABEL_STUDIO_ACCESS_TOKEN": "abc",
        "IMAGE_MAX_BYTES": "1000",
        "IMAGE_MAX_PIXELS": "1e6",
        "IMAGE_TIMEOUT_S": "2.5",
        "IMAGE_CACHE_BYTES": "0",
        "ALLOWED_IMAGE_HOSTS": " a.example , B.example:9000,",
        "LOCAL_FILES_DOCUMENT_ROOT": f"{tmp_path}{os.pathsep}/srv/data",
    }
    cfg = ImageLoaderConfig.from_env(env)
    assert cfg.label_studio_url == "http://ls:8080/" and cfg.api_key == "abc"
    assert (cfg.max_bytes, cfg.max_pixels, cfg.timeout_s, cfg.cache_bytes) == (1000, 1_000_000, 2.5, 0)
    assert cfg.allowed_hosts == ("a.example", "b.example:9000")
    assert cfg.local_roots == (str(tmp_path), "/srv/data")
    cfg = ImageLoaderConfig.from_env({"LABEL_STUDIO_URL": "http://a", "LABEL_STUDIO_HOST": "http://b",
                                      "LABEL_STUDIO_API_KEY": "k1", "LABEL_STUDIO_ACCESS_TOKEN": "k2"})
    assert (cfg.label_studio_url, cfg.api_key) == ("http://a", "k1")
    assert ImageLoaderConfig.from_env({}) == ImageLoaderConfig()
    with pytest.raises(ValueError, match="IMAGE_MAX_BYTES"):
        ImageLoaderConfig.from_env({"IMAGE_MAX_BYTES": "lots"})
    with pytest.raises(ValueError, match="positive"):
        ImageLoaderConfig.from_env({"IMAGE_TIMEOUT_S": "0"})


def test_load_task_image(ls_url):
    ld = loader(ls_url, LEGACY_KEY)
    assert ld.load_task_image({"id": 1, "data": {"img": "/data/upload/1/a.png"}}, "img").shape == (12, 16, 3)
    with pytest.raises(ImageError, match=r"task 7 has no image in data\['image'\]"):
        ld.load_task_image({"id": 7, "data": {"img": "x"}}, "image")


# -- schemes and local files -----------------------------------------------


@pytest.mark.parametrize("url", ["file:///etc/passwd", "s3://bucket/key.png", "ftp://host/x.png", "gs://b/k.jpg"])
def test_other_schemes_rejected(tmp_path, url):
    with pytest.raises(ImageError, match="not supported"):
        loader(local_roots=(str(tmp_path),)).load(url)


def test_empty_url():
    with pytest.raises(ImageError, match="empty"):
        loader().load("  ")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(IMAGE)
    (tmp_path / "secret.png").write_bytes(IMAGE)
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    return root


def test_local_paths_need_roots(root):
    with pytest.raises(ImageError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        loader().load(str(root / "images" / "a.png"))


def test_local_paths_under_root(root):
    ld = loader(local_roots=(str(root),))
    assert ld.load(str(root / "images" / "a.png")).shape == (12, 16, 3)
    assert ld.load("images/a.png").shape == (12, 16, 3)  # relative to the root


@pytest.mark.parametrize(
    "path",
    ["../secret.png", "images/../../secret.png", "images/link.png", "/etc/hostname", "{tmp}/secret.png"],
)
def test_local_escapes_rejected(root, path):
    ld = loader(local_roots=(str(root),))
    with pytest.raises(ImageError, match="outside the allowed roots"):
        ld.load(path.format(tmp=root.parent))


def test_local_missing_and_too_big(root):
    ld = loader(local_roots=(str(root),))
    with pytest.raises(ImageError, match="cannot be read"):
        ld.load("images/nothere.png")
    with pytest.raises(ImageError, match="IMAGE_MAX_BYTES"):
        loader(local_roots=(str(root),), max_bytes=10).load("images/a.png")


def test_local_files_url_read_from_root_or_label_studio(root, ls_url):
    ld = loader(ls_url, LEGACY_KEY, local_roots=(str(root),))
    assert ld.load("/data/local-files/?d=images/a.png").shape == (12, 16, 3)
    assert STATE.hits["/data/local-files/?d=images/a.png"] == 0  # read from disk
    ld.load("/data/local-files/?d=images/other.png")  # not on disk: asked from Label Studio
    assert STATE.hits["/data/local-files/?d=images/other.png"] == 1
    ld.load("/data/local-files/?d=../secret.png")  # escapes are never read from disk
    assert STATE.hits["/data/local-files/?d=../secret.png"] == 1
    # without LABEL_STUDIO_URL the local copy is enough
    assert loader(local_roots=(str(root),)).load("/data/local-files/?d=images%2Fa.png").shape == (12, 16, 3)
    with pytest.raises(ImageError, match=r"\?d=<path>"):
        ld.load("/data/local-files/?x=1")


# -- cache -----------------------------------------------------------------


def test_cache_hits_and_byte_limit(ls_url, other_url):
    ld = loader(ls_url, LEGACY_KEY)
    for _ in range(3):
        ld.load("/data/upload/1/a.png")
    assert STATE.hits["/data/upload/1/a.png"] == 1

    small = loader(cache_bytes=len(IMAGE) + 10)
    small.load(other_url + "/public/img.png")
    small.load(other_url + "/public/img2.png")  # evicts img.png
    small.load(other_url + "/public/img.png")
    assert STATE.hits["/public/img.png"] == 2
    assert small._cache.size <= len(IMAGE) + 10

    off = loader(cache_bytes=0)
    off.load(other_url + "/public/img2.png")
    off.load(other_url + "/public/img2.png")
    assert STATE.hits["/public/img2.png"] == 3


def test_local_cache_notices_changes(root):
    ld = loader(local_roots=(str(root),))
    assert ld.load("images/a.png").shape == (12, 16, 3)
    path = root / "images" / "a.png"
    path.write_bytes(png_bytes(20, 10))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert ld.load("images/a.png").shape == (10, 20, 3)


def test_concurrent_loads_share_one_token(ls_url):
    ld = loader(ls_url, PAT)
    urls = [f"/data/upload/1/c{i % 8}.png" for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(lambda u: ld.load(u).shape, urls))
    assert set(shapes) == {(12, 16, 3)}
    assert STATE.refresh_calls == 1
