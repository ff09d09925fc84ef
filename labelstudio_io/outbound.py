"""Where the backend may send requests, checked on the connection that is actually made.

Task data is user input, so every outbound request (task images, their
redirects, Label Studio's token refresh and export) goes through one guarded
``requests.Session`` built here. Three rules hold for it:

* **One parser.** A URL is refused when it holds userinfo (``@`` before the
  host), a backslash, whitespace, control or non-ASCII characters in the host
  part, or a scheme other than http(s): such URLs are read differently by
  different parsers (``http://a:1\\@b:2/`` is host ``b`` for ``urlsplit`` but
  ``a`` for urllib3). Origins are compared with urllib3's own ``parse_url``,
  the parser the connection is made with.
* **The checked address is the contacted address.** The connection class
  resolves the host itself, checks *every* resolved address with
  :class:`AddressPolicy`, and connects to one of those checked addresses, so a
  DNS answer cannot change between check and connect (rebinding). Redirect hops
  open new connections and are checked the same way.
* **Credentials only to Label Studio.** The connection refuses to send an
  ``Authorization`` header anywhere but Label Studio's origin (scheme, host and
  port), as a second line behind the client's own rule (``client.py``).

Proxies are not used (``trust_env = False``): through a proxy the policy could
not see the address that is contacted. Cookies are not kept either.

:class:`Deadline` bounds a whole download (headers, body, every redirect hop):
per-read socket timeouts restart on every byte, so a host sending one byte at a
time could otherwise hold a worker indefinitely. When the deadline passes, a
timer shuts down the sockets of that download, and the reader fails at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import http.cookiejar
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NameResolutionError, NewConnectionError
from urllib3.util import parse_url
from urllib3.util.timeout import _DEFAULT_TIMEOUT

__all__ = [
    "AddressPolicy",
    "Deadline",
    "Origin",
    "OutboundRefused",
    "check_url",
    "connect_socket",
    "current_deadline",
    "deadline",
    "guard_session",
    "origin_of",
    "resolve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Origin = tuple[str, str, int]  # (scheme, host, port), host lower-case without brackets or trailing dot

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Cloud metadata services: never contacted, whatever ALLOWED_IMAGE_HOSTS says.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class OutboundRefused(Exception):
    """A destination the policy does not allow; raised before anything is sent to it.

    The message names the URL's host and the rule, never whether a port is open
    (nothing was contacted).
    """


# -- URL syntax -----------------------------------------------------------------


def check_url(url: str) -> Origin:
    """The origin of an http(s) URL, or :class:`OutboundRefused` for an ambiguous or unsupported one."""
    if not isinstance(url, str) or not url:
        raise OutboundRefused("the URL is empty")
    if _BAD_CHARS.search(url) or any(ch.isspace() for ch in url):
        raise OutboundRefused("the URL contains whitespace, control characters or backslashes")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        raise OutboundRefused("only http(s) URLs are fetched")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise OutboundRefused("URLs with user information ('user@host') are not fetched")
    if not authority.isascii():
        raise OutboundRefused("host names must be ASCII (use the punycode form)")
    origin = origin_of(url)
    if origin is None:
        raise OutboundRefused("the URL has no valid host or port")
    return origin


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) as urllib3 connects to it, default ports filled in; None if not http(s)."""
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError):
        return None
    scheme = (parsed.scheme or "").lower()
    if scheme not in _DEFAULT_PORTS or not parsed.host or parsed.auth:
        return None
    return scheme, normalise_host(parsed.host), parsed.port or _DEFAULT_PORTS[scheme]


def normalise_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


# -- addresses ------------------------------------------------------------------


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (tests replace this to keep traffic local)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _normalise_address(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _never(ip: IPAddress) -> bool:
    """Link-local, unspecified, multicast and metadata addresses: refused whatever is configured."""
    return ip in METADATA_ADDRESSES or ip.is_link_local or ip.is_unspecified or ip.is_multicast


@dataclass(frozen=True)
class _Entry:
    host: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, port: int, ip: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host
        return self.network is not None and ip in self.network


def _parse_entry(text: str) -> _Entry | None:
    """``host``, ``host:port``, ``1.2.3.4``, ``[::1]:8080``, ``10.0.0.0/8``; None for ``*``."""
    text = text.strip().lower()
    if text == "*":
        return None
    with contextlib.suppress(ValueError):
        return _Entry(network=ipaddress.ip_network(text, strict=False))
    host, port = text, None
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", text)
    if match and (text.startswith("[") or text.count(":") == 1):
        host, port = match.group(1), int(match.group(2))
    host = normalise_host(host)
    with contextlib.suppress(ValueError):
        return _Entry(network=ipaddress.ip_network(host), port=port)
    return _Entry(host=host, port=port)


class AddressPolicy:
    """Which (scheme, host, port, address) a connection may be made to.

    Always allowed: Label Studio's origin (unless it resolves to a never-allowed
    address). Never allowed: link-local, unspecified, multicast, and cloud
    metadata names/addresses. Loopback, private, CGNAT and other non-global
    addresses: only for Label Studio's origin or a destination listed in
    ``allowed``. Public addresses: any when ``allowed`` is empty or holds ``*``,
    otherwise only listed ones. A listed name, ``name:port``, IP or network
    permits the destination whatever its address class (but never the
    never-allowed ones).
    """

    def __init__(self, allowed: Sequence[str] = (), label_studio: Callable[[], Origin | None] = lambda: None) -> None:
        parsed = [_parse_entry(a) for a in allowed if a.strip()]
        self.entries = tuple(e for e in parsed if e is not None)
        self.any_public = not parsed or any(e is None for e in parsed)
        self._label_studio = label_studio

    def is_label_studio(self, origin: Origin) -> bool:
        return origin == self._label_studio()

    def check_name(self, origin: Origin) -> None:
        """Refusals that need no DNS lookup (metadata host names)."""
        host = origin[1]
        if host in METADATA_HOSTS or host.endswith(".metadata.google.internal"):
            raise OutboundRefused(f"{host} is a cloud metadata service")

    def check_address(self, origin: Origin, address: str) -> None:
        _, host, port = origin
        try:
            ip = _normalise_address(address)
        except ValueError as exc:
            raise OutboundRefused(f"{host} resolves to an unusable address") from exc
        if _never(ip):
            raise OutboundRefused(f"{host} is a link-local, metadata or otherwise reserved address")
        if self.is_label_studio(origin) or any(e.matches(host, port, ip) for e in self.entries):
            return
        if not ip.is_global:
            raise OutboundRefused(
                f"{host} is a loopback or private address (add it to ALLOWED_IMAGE_HOSTS to allow it)"
            )
        if not self.any_public:
            raise OutboundRefused(f"{host} is not in ALLOWED_IMAGE_HOSTS")

    def checked_addresses(self, origin: Origin) -> list[str]:
        """Resolve the origin's host and check every address; all must pass (no mixing good and bad)."""
        self.check_name(origin)
        addresses = resolve(origin[1], origin[2])
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no addresses")
        for address in addresses:
            self.check_address(origin, address)
        return addresses


# -- whole-download deadline ------------------------------------------------------


class Deadline:
    """One time limit for a whole download; shuts its sockets down when it passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            if self._closed:
                return
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            self._sockets.clear()


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown on the file descriptor, also for an SSLSocket (whose
    # own shutdown would tear down its TLS state under a reading thread).
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("outbound_deadline", default=None)


def current_deadline() -> Deadline | None:
    return _current.get()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Run a download under one :class:`Deadline` (for the calling thread's requests)."""
    limit = Deadline(seconds)
    token = _current.set(limit)
    try:
        yield limit
    finally:
        _current.reset(token)
        limit.close()


# -- guarded connections ----------------------------------------------------------


def connect_socket(
    address: str, port: int, timeout: Any, source_address: Any, options: Sequence[tuple[int, int, Any]] | None
) -> socket.socket:
    """A TCP connection to an already checked address (tests wrap this to see what is contacted)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for opt in options or ():
            sock.setsockopt(*opt)
        if timeout is not _DEFAULT_TIMEOUT:
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _GuardedMixin:
    """Resolves, checks and connects by itself; refuses credentials for other origins."""

    policy: AddressPolicy
    scheme: str

    def _origin(self) -> Origin:
        conn: Any = self
        return self.scheme, normalise_host(conn._dns_host), conn.port or _DEFAULT_PORTS[self.scheme]

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        origin = self._origin()
        try:
            addresses = self.policy.checked_addresses(origin)
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        error: OSError | None = None
        for address in addresses:
            try:
                sock = connect_socket(address, origin[2], conn.timeout, conn.source_address, conn.socket_options)
            except socket.timeout as exc:
                raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
            except OSError as exc:
                error = exc
                continue
            limit = current_deadline()
            if limit is not None:
                limit.register(sock)
            return sock
        raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")

    def request(self, *args: Any, **kwargs: Any) -> Any:
        conn: Any = self
        limit = current_deadline()
        if limit is not None and conn.sock is not None:  # a pooled connection serves this download
            limit.register(conn.sock)
        return super().request(*args, **kwargs)  # type: ignore[misc]

    def putheader(self, header: str | bytes, *values: Any) -> None:
        name = header.decode("latin-1") if isinstance(header, bytes) else header
        if name.lower() in ("authorization", "proxy-authorization") and not self.policy.is_label_studio(self._origin()):
            raise OutboundRefused("credentials are only sent to Label Studio's own origin")
        super().putheader(header, *values)  # type: ignore[misc]


def _adapter_for(policy: AddressPolicy) -> HTTPAdapter:
    http_conn = type("GuardedHTTPConnection", (_GuardedMixin, HTTPConnection), {"policy": policy, "scheme": "http"})
    https_conn = type("GuardedHTTPSConnection", (_GuardedMixin, HTTPSConnection), {"policy": policy, "scheme": "https"})
    http_pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            raise OutboundRefused("proxies are not used for image downloads (the policy could not be checked)")

    return GuardedAdapter()


def guard_session(session: requests.Session, policy: AddressPolicy) -> requests.Session:
    """Make every http(s) request of ``session`` go through ``policy``; no proxies, no cookies kept."""
    session.trust_env = False
    session.proxies.clear()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = _adapter_for(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
