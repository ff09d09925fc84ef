"""Outbound requests as an attacker would steer them (issue 24, items 1, 2, 3, 7 and 11).

Every fake host listens on 127.0.0.1 and records what it receives. Names such as
``169.254.169.254`` or ``metadata.google.internal`` are never contacted: the
tests replace ``outbound.resolve`` / ``outbound.connect_socket`` with recorders
that refuse to touch anything but 127.0.0.1, and assert that nothing was tried.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

KEY = "0123456789abcdef0123456789abcdef01234567"


def png(width: int = 16, height: int = 12, color: tuple[int, int, int] = (200, 10, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


Route = Callable[[BaseHTTPRequestHandler], None]


class Host:
    """A fake host on 127.0.0.1: answers from ``routes`` (404 otherwise), records (method, path, Authorization)."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.seen: list[tuple[str, str, str | None]] = []
        self.stop = threading.Event()
        self.arrivals: list[float] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def _handle(self) -> None:
                host.arrivals.append(time.monotonic())
                host.seen.append((self.command, self.path, self.headers.get("Authorization")))
                route = host.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    send(self, 404, b"not here")
                else:
                    route(self)

            do_GET = do_POST = _handle  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def auth_headers(self) -> list[str | None]:
        return [auth for _, _, auth in self.seen]

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def image(body: bytes) -> Route:
    return lambda h: send(h, 200, body, {"Content-Type": "image/png"})


def redirect(location: str | Callable[[], str]) -> Route:
    return lambda h: send(h, 302, b"", {"Location": location() if callable(location) else location})


def drip(stop: threading.Event, *, headers_too: bool, every_s: float = 0.3) -> Route:
    """One byte every ``every_s``: of the body (after honest headers), or of the status line itself."""

    def route(h: BaseHTTPRequestHandler) -> None:
        data = b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n" if headers_too else b"x" * 1000
        if not headers_too:
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.flush()
        for i in range(len(data)):
            if stop.wait(every_s):
                return
            try:
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
            except OSError:
                return

    return route


@pytest.fixture
def hosts() -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(routes: dict[str, Route] | None = None) -> Host:
        made.append(Host(routes))
        return made[-1]

    yield make
    for host in made:
        host.close()


@pytest.fixture
def contacts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Record every name resolution and connection; only 127.0.0.1 is ever really contacted.

    ``names`` maps test host names to the address they "resolve" to.
    """
    from labelstudio_io import outbound

    real_connect = outbound.connect_socket
    seen: dict[str, Any] = {"resolved": [], "connected": [], "names": {}}

    def resolve(host: str, port: int) -> list[str]:
        seen["resolved"].append(host)
        if host in seen["names"]:
            return list(seen["names"][host])
        if host in ("127.0.0.1", "localhost"):
            return ["127.0.0.1"]
        return [host]  # IP literals as they are; other names are not looked up

    def connect(address: str, port: int, *args: Any) -> Any:
        seen["connected"].append((address, port))
        assert address == "127.0.0.1", f"test tried to contact {address}"
        return real_connect(address, port, *args)

    monkeypatch.setattr(outbound, "resolve", resolve)
    monkeypatch.setattr(outbound, "connect_socket", connect)
    return seen


def loader(ls_url: str | None = None, key: str | None = None, **kw: Any) -> Any:
    from labelstudio_io.images import ImageLoader, ImageLoaderConfig

    return ImageLoader(ImageLoaderConfig(label_studio_url=ls_url, api_key=key, **kw))


def click(helpers: Any, image_url: str) -> dict[str, Any]:
    """An interactive /predict body (one smart keypoint) on ``image_url``."""
    body = helpers.fixture_body("predict_interactive_keypoint")
    body["tasks"][0]["data"] = {"image": image_url}
    return body


def regions(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "id"} for r in answer["results"][0]["result"]]


def env_without(env: dict[str, str], *names: str, **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in env.items() if k not in names}, **extra}


# -- item 1: the host that is checked is the host that is contacted --------------------


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{decoy}\\@127.0.0.1:{ls}/data/upload/1/x.png",  # the reported leak
        "http://127.0.0.1:{ls}@127.0.0.1:{decoy}/data/upload/1/x.png",  # userinfo
        "http://127.0.0.1:{decoy}\t@127.0.0.1:{ls}/data/upload/1/x.png",  # whitespace
        "http://127.0.0.1:{decoy}%00@127.0.0.1:{ls}/data/upload/1/x.png",  # encoded NUL before '@'
        "http://127.0.0.1:{ls}/data/upload/1/x.png\r\nX-Injected: 1",  # control characters
        "http://127.0.0.1:{ls}/data/upload/1/x .png",  # whitespace in the path
    ],
)
def test_ambiguous_image_url_gets_no_token_anywhere(helpers: Any, backend_env: dict[str, str], hosts: Any,
                                                     template: str) -> None:
    ls = hosts({"/data/upload/1/x.png": image(helpers.png_bytes())})
    decoy = hosts({"/data/upload/1/x.png": image(helpers.png_bytes())})
    # Even with the decoy allowed, as in the report.
    env = {**backend_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": KEY,
           "ALLOWED_IMAGE_HOSTS": f"127.0.0.1:{decoy.port}"}
    url = template.format(ls=ls.port, decoy=decoy.port)
    with helpers.live_server(helpers.build_app(env)) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/predict", json=click(helpers, url))
    assert decoy.seen == []  # the old code sent ("GET", "/data/upload/1/x.png", "Token <key>") here
    assert ls.seen == []
    assert r.status_code == 422, r.text
    assert "refused" in r.json()["errors"][0]


def test_token_only_on_label_studio_hops(hosts: Any) -> None:
    # Label Studio -> bucket (allowed) -> back to Label Studio: the token on the Label Studio hops only.
    bucket = hosts()
    ls = hosts({
        "/data/upload/1/out.png": redirect(lambda: f"{bucket.url}/signed.png?X-Amz-Signature=s"),
        "/data/upload/1/final.png": image(png()),
    })
    bucket.routes["/signed.png"] = redirect(f"{ls.url}/data/upload/1/final.png")
    ld = loader(ls.url, KEY, allowed_hosts=(f"127.0.0.1:{bucket.port}",))
    assert ld.load("/data/upload/1/out.png").shape == (12, 16, 3)
    assert ls.auth_headers() == [f"Token {KEY}", f"Token {KEY}"]
    assert bucket.auth_headers() == [None]


def test_token_not_sent_to_same_host_on_another_port(hosts: Any) -> None:
    other = hosts({"/x.png": image(png())})
    ls = hosts({"/data/upload/1/a.png": redirect(f"{other.url}/x.png")})
    ld = loader(ls.url, KEY, allowed_hosts=("127.0.0.1",))  # the other port is allowed, but is not Label Studio
    assert ld.load("/data/upload/1/a.png").shape == (12, 16, 3)
    assert other.auth_headers() == [None]


# -- item 3: outbound policy -------------------------------------------------------


def test_default_policy_refuses_loopback_ports_and_says_nothing_about_them(hosts: Any, contacts: Any) -> None:
    ls = hosts()
    listening = hosts({"/x.png": image(png())})
    ld = loader(ls.url, KEY)
    messages = []
    for port in (listening.port, 9):  # an open port and a closed one (discard)
        with pytest.raises(Exception) as info:
            ld.load(f"http://127.0.0.1:{port}/x.png")
        messages.append(str(info.value).replace(f":{port}/", ":PORT/"))
    assert messages[0] == messages[1]  # the answer does not tell which port is open
    assert "loopback or private" in messages[0]
    assert listening.seen == [] and contacts["connected"] == []


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{closed}/x.png",
        "http://0.0.0.0:{ls}/x.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata/computeMetadata/v1/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",
        "http://[::1]:{ls}/x.png",
    ],
)
def test_redirects_to_internal_addresses_are_refused(hosts: Any, contacts: Any, target: str) -> None:
    ls = hosts()
    url = target.format(ls=ls.port, closed=1)
    ls.routes["/data/upload/1/r.png"] = redirect(url)
    with pytest.raises(Exception, match="redirects to a host that is not allowed"):
        loader(ls.url, KEY).load("/data/upload/1/r.png")
    assert contacts["connected"] == [("127.0.0.1", ls.port)]  # Label Studio only
    assert "metadata.google.internal" not in contacts["resolved"] and "metadata" not in contacts["resolved"]


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/x",
                                 "http://[fe80::1]/x", "http://224.0.0.1/x"])
def test_metadata_and_link_local_refused_even_when_listed(contacts: Any, url: str) -> None:
    ld = loader(allowed_hosts=("*", "169.254.0.0/16", "metadata.google.internal", "fe80::/10", "224.0.0.0/4"))
    with pytest.raises(Exception, match="not allowed"):
        ld.load(url)
    assert contacts["connected"] == []


def test_dns_name_resolving_to_loopback(hosts: Any, contacts: Any) -> None:
    target = hosts({"/x.png": image(png())})
    contacts["names"]["rebind.nip.test"] = ["127.0.0.1"]
    url = f"http://rebind.nip.test:{target.port}/x.png"
    with pytest.raises(Exception, match="loopback or private"):
        loader().load(url)  # the default policy: public hosts only
    assert target.seen == []
    # One public and one loopback answer (rebinding): every address must pass.
    contacts["names"]["rebind.nip.test"] = ["93.184.216.34", "127.0.0.1"]
    with pytest.raises(Exception, match="loopback or private"):
        loader().load(url)
    assert target.seen == [] and contacts["connected"] == []
    # Listed by name: the operator allows it, and the connection goes to the checked address.
    contacts["names"]["rebind.nip.test"] = ["127.0.0.1"]
    assert loader(allowed_hosts=("rebind.nip.test",)).load(url).shape == (12, 16, 3)
    assert len(target.seen) == 1


def test_allow_list_limits_public_hosts(contacts: Any) -> None:
    from labelstudio_io.outbound import AddressPolicy, OutboundRefused

    policy = AddressPolicy(["images.example.org", "10.0.0.0/8", "[::1]:8080"])
    policy.check_address(("https", "images.example.org", 443), "93.184.216.34")
    policy.check_address(("http", "files.internal", 80), "10.2.3.4")
    policy.check_address(("http", "::1", 8080), "::1")
    for origin, address in [(("https", "other.example.org", 443), "93.184.216.34"),
                            (("http", "::1", 8081), "::1"),
                            (("http", "nas.local", 80), "192.168.0.2")]:
        with pytest.raises(OutboundRefused):
            policy.check_address(origin, address)
    AddressPolicy(["*"]).check_address(("https", "anything.example", 443), "93.184.216.34")
    AddressPolicy().check_address(("https", "anything.example", 443), "93.184.216.34")
    with pytest.raises(OutboundRefused, match="loopback"):
        AddressPolicy().check_address(("http", "x", 80), "::ffff:127.0.0.1")  # IPv4-mapped


# -- item 2: /setup cannot redirect the token ------------------------------------------


def train_and_wait(http: httpx.Client, helpers: Any) -> dict[str, Any]:
    job_id = http.post("/webhook", json=helpers.fixture_body("train")).json()["job"]

    def done() -> dict[str, Any] | None:
        job = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    return helpers.wait_for(done, timeout=20)


def test_setup_hijack_is_refused_and_attacker_gets_no_token(
    helpers: Any, backend_env: dict[str, str], fake_ls: Any, hosts: Any,
) -> None:
    attacker = hosts()
    env = env_without(backend_env, "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")  # the README's default
    setup = helpers.fixture_body("setup")
    with helpers.live_server(helpers.build_app(env)) as base, httpx.Client(base_url=base, timeout=30) as http:
        # Label Studio connects first.
        assert http.post("/setup", json={**setup, "hostname": fake_ls.url, "access_token": helpers.API_KEY}).status_code == 200
        # The attacker's /setup is refused, with or without a token of its own.
        for token in ("attacker-token", None):
            r = http.post("/setup", json={**setup, "hostname": attacker.url, "access_token": token})
            assert r.status_code == 409, r.text
            assert "another Label Studio" in r.json()["errors"][0]
            assert attacker.url not in r.text
        # Label Studio's next /setup still works; clicks and the export still go to Label Studio.
        assert http.post("/setup", json={**setup, "hostname": fake_ls.url, "access_token": helpers.API_KEY}).status_code == 200
        assert http.post("/predict", json=click(helpers, helpers.DISK_URL)).status_code == 200
        fake_ls.export_tasks = []
        job = train_and_wait(http, helpers)
    assert "nothing to train on" in job["message"], job  # the export (empty here) went to Label Studio
    assert attacker.seen == []
    assert (helpers.DISK_URL, f"Token {helpers.API_KEY}") in fake_ls.requests
    exports = [auth for path, auth in fake_ls.requests if path.startswith("/api/projects/1/export")]
    assert exports == [f"Token {helpers.API_KEY}"]


def test_env_key_never_goes_to_a_setup_hostname(
    helpers: Any, backend_env: dict[str, str], hosts: Any, caplog: Any,
) -> None:
    attacker = hosts({"/data/upload/1/x.png": image(helpers.png_bytes()), "/api/projects/1/export": image(b"[]")})
    env = env_without(backend_env, "LABEL_STUDIO_URL", LABEL_STUDIO_API_KEY=KEY)  # key set, URL unset
    with caplog.at_level("WARNING"), helpers.live_server(helpers.build_app(env)) as base, \
            httpx.Client(base_url=base, timeout=30) as http:
        # The attacker gets there first, without a token: its hostname is used, the env key is not.
        assert http.post("/setup", json={**helpers.fixture_body("setup"), "hostname": attacker.url,
                                         "access_token": None}).status_code == 200
        http.post("/predict", json=click(helpers, "/data/upload/1/x.png"))
        train_and_wait(http, helpers)
    assert [path.split("?")[0] for _, path, _ in attacker.seen] == ["/data/upload/1/x.png", "/api/projects/1/export"]
    assert attacker.auth_headers() == [None, None]
    assert "LABEL_STUDIO_URL is not set" in caplog.text
    assert "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL" in caplog.text


def test_setup_cannot_move_a_configured_label_studio(helpers: Any, backend_env: dict[str, str], fake_ls: Any,
                                                     hosts: Any) -> None:
    attacker = hosts()
    with helpers.live_server(helpers.build_app(backend_env)) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/setup", json={**helpers.fixture_body("setup"), "hostname": attacker.url, "access_token": "t"})
        assert r.status_code == 200  # ignored (and logged): LABEL_STUDIO_URL decides
        assert http.post("/predict", json=click(helpers, helpers.DISK_URL)).status_code == 200
    assert attacker.seen == []
    assert fake_ls.requests[-1] == (helpers.DISK_URL, f"Token {helpers.API_KEY}")


def test_setup_token_pairs_with_its_hostname(hosts: Any) -> None:
    from labelstudio_io.client import LabelStudioConflict

    ls, other = hosts(), hosts()
    ld = loader()
    ld.client.update_from_setup(None, "orphan")  # a token without a hostname is not used
    assert ld.client.api_key is None
    ld.client.update_from_setup(ls.url, "first")
    ld.client.update_from_setup(ls.url + "/", "second")  # same origin: the token is updated
    assert (ld.client.label_studio_url, ld.client.api_key) == (ls.url, "second")
    with pytest.raises(LabelStudioConflict):
        ld.client.update_from_setup(other.url, "third")
    assert (ld.client.label_studio_url, ld.client.api_key) == (ls.url, "second")
    # With LABEL_STUDIO_URL, a /setup token is used only for that origin and only without an env key.
    ld = loader(ls.url)
    ld.client.update_from_setup(other.url, "elsewhere")
    assert ld.client.api_key is None
    ld.client.update_from_setup(ls.url, "matching")
    assert ld.client.api_key == "matching"
    ld = loader(ls.url, KEY)
    ld.client.update_from_setup(ls.url, "matching")
    assert ld.client.api_key == KEY


def test_start_up_warns_about_an_open_bind_without_basic_auth(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    import uvicorn

    from labelstudio_backend import __main__ as launcher
    from labelstudio_backend import server

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    monkeypatch.setattr(server, "create_app", lambda settings: None)
    monkeypatch.setenv("DEVICE", "cpu")
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING"):
        assert launcher.main(["--host", "127.0.0.1"]) == 0
        assert "without BASIC_AUTH_USER" not in caplog.text
        assert launcher.main(["--host", "0.0.0.0"]) == 0
    assert "listening on 0.0.0.0 without BASIC_AUTH_USER/BASIC_AUTH_PASS" in caplog.text


# -- item 7: one deadline for the whole download ----------------------------------------


@pytest.mark.parametrize("headers_too", [False, True], ids=["body-drip", "header-drip"])
def test_dripping_host_is_cut_at_the_deadline(hosts: Any, headers_too: bool) -> None:
    slow = hosts()
    slow.routes["/x.png"] = drip(slow.stop, headers_too=headers_too)
    ld = loader(allowed_hosts=("127.0.0.1",), timeout_s=1.5)
    start = time.monotonic()
    with pytest.raises(Exception, match=r"timed out after 1.5 s \(IMAGE_TIMEOUT_S, whole download\)"):
        ld.load(f"{slow.url}/x.png")
    assert time.monotonic() - start < 6


def test_dripping_image_answers_the_click_in_time(helpers: Any, backend_env: dict[str, str], hosts: Any) -> None:
    slow = hosts()
    slow.routes["/x.png"] = drip(slow.stop, headers_too=False)
    env = {**backend_env, "IMAGE_TIMEOUT_S": "1.5", "ALLOWED_IMAGE_HOSTS": f"127.0.0.1:{slow.port}"}
    with helpers.live_server(helpers.build_app(env)) as base, httpx.Client(base_url=base, timeout=30) as http:
        start = time.monotonic()
        r = http.post("/predict", json=click(helpers, f"{slow.url}/x.png"))
        elapsed = time.monotonic() - start
    assert r.status_code == 422 and "whole download" in r.json()["errors"][0]
    assert elapsed < 6


def test_download_slots_are_bounded(hosts: Any) -> None:
    slow = hosts()
    slow.routes["/x.png"] = drip(slow.stop, headers_too=False, every_s=0.1)
    ld = loader(allowed_hosts=("127.0.0.1",), timeout_s=1.0, max_downloads=1)
    errors: list[str] = []

    def fetch(i: int) -> None:
        try:
            ld.load(f"{slow.url}/x.png?i={i}")
        except Exception as exc:
            errors.append(str(exc))

    start = time.monotonic()
    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Each ends at its deadline: either waiting for the slot ("download slots (IMAGE_MAX_DOWNLOADS)") or, when the
    # slot came free just before its own deadline on a busy machine, in its download.
    assert len(errors) == 3 and all("timed out" in e for e in errors)
    # The first download holds the only slot until its deadline (1 s): nothing else reaches the host before.
    assert all(later - slow.arrivals[0] > 0.5 for later in slow.arrivals[1:])
    assert time.monotonic() - start < 6


# -- item 11: a changed image is never answered from the old one's embedding -------------


def test_replaced_local_file_gets_a_new_mask(helpers: Any, backend_env: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "files"
    root.mkdir()
    (root / "img.png").write_bytes(helpers.png_bytes(shape="disk"))
    (root / "fresh.png").write_bytes(helpers.png_bytes(shape="rect", seed=1))
    env = {**backend_env, "LOCAL_FILES_DOCUMENT_ROOT": str(root)}
    url = "/data/local-files/?d=img.png"
    with helpers.live_server(helpers.build_app(env)) as base, httpx.Client(base_url=base, timeout=60) as http:
        before = http.post("/predict", json=click(helpers, url)).json()
        path = root / "img.png"
        path.write_bytes(helpers.png_bytes(shape="rect", seed=1))
        later = time.time_ns() + 2 * 10**9
        os.utime(path, ns=(later, later))
        after = http.post("/predict", json=click(helpers, url)).json()
        fresh = http.post("/predict", json=click(helpers, "/data/local-files/?d=fresh.png")).json()
    assert regions(before) != regions(fresh)  # the two images give different answers
    assert regions(after) == regions(fresh)


def test_source_key_follows_what_load_returns(hosts: Any, tmp_path: Path) -> None:
    import base64

    ls1 = hosts({"/data/upload/1/a.png": image(png(color=(255, 0, 0)))})
    ls2 = hosts({"/data/upload/1/a.png": image(png(color=(0, 0, 255)))})
    one, two = loader(), loader()
    one.client.update_from_setup(ls1.url, KEY)
    two.client.update_from_setup(ls2.url, KEY)
    # The same relative URL under two Label Studios: two identities, each fetched from its own host.
    assert one.source_key("/data/upload/1/a.png") == f"{ls1.url}/data/upload/1/a.png"
    assert one.source_key("/data/upload/1/a.png") != two.source_key("/data/upload/1/a.png")
    assert tuple(one.load("/data/upload/1/a.png")[0, 0]) == (255, 0, 0)
    assert tuple(two.load("/data/upload/1/a.png")[0, 0]) == (0, 0, 255)
    # A host switch by /setup is refused, so one loader never answers one host's URL with another's image.
    from labelstudio_io.client import LabelStudioConflict

    with pytest.raises(LabelStudioConflict):
        one.client.update_from_setup(ls2.url, KEY)
    assert tuple(one.load("/data/upload/1/a.png")[0, 0]) == (255, 0, 0)
    # Local files: a new key when the file changes; data: URIs by content.
    local = loader(local_roots=(str(tmp_path),))
    (tmp_path / "a.png").write_bytes(png())
    first = local.source_key("a.png")
    (tmp_path / "a.png").write_bytes(png(20, 10))
    assert local.source_key("a.png") != first and local.load("a.png").shape == (10, 20, 3)
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert local.source_key(uri) == local.source_key(uri) != local.source_key(uri.replace("data:image/png", "data:x"))
    assert np.array_equal(local.load(uri), loader().load(uri))
