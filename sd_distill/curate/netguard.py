"""What the downloader may fetch: http(s) only, and (by default) nothing on the machine's own networks.

URL lists, LAION parquet files and COCO JSON come from third parties; a row can point anywhere. Two
checks, each returning a ``REASONS`` code (``reasons.py``):

1. ``url_problem(url)`` (collect, no network): only ``http`` / ``https`` URLs with a host. ``file://``,
   ``ftp://``, ``data:``, ``gopher://``... are ``unsupported_scheme``; no host, whitespace or control
   characters are ``url_invalid``. ``served://`` (files of the collect folder on the project's own
   loopback server) passes only with ``allow_served`` (sources marked ``served``: the toy world, tests).
   Local files reach the downloader only from sources that name a local folder or archive.
2. The internal-network guard (``DownloadParams.block_private_networks``): a host that is or resolves to
   a loopback, private, link-local, multicast, reserved, unspecified or otherwise non-global address
   (IPv4, IPv6, IPv4-mapped IPv6) is ``private_address``; networks in ``allowed_networks`` and the
   project's own served endpoint are exempt. It runs
   a. before img2dataset starts, for IP literals and ``localhost`` only (``precheck``: no DNS), and
   b. inside img2dataset's download workers on every connection, redirects included: ``install``
      replaces urllib's global opener (img2dataset fetches with ``urllib.request.urlopen``) with one
      whose HTTP(S) connections resolve the host once, refuse if any address is blocked and connect to
      the checked address itself (no second lookup, so a DNS answer cannot change between check and
      connect). A redirect to anything but http(s) is ``unsupported_scheme``. The same opener caps the
      body at ``max_image_bytes`` (``too_large``) and refuses an empty 2xx body (``empty_body``).
   With an HTTP proxy in the environment the proxy makes the connection: the guard then checks the
   addresses the target's name resolves to here before every request, redirects included, and cannot
   see what the proxy itself resolves.

Name resolution never needs the network for IP literals, ``localhost`` (``127.0.0.1``) and names under
``.invalid`` (RFC 6761: never resolve, ``dns_error``); other names use the system resolver in the worker,
and a name that does not resolve is ``dns_error``.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
SERVED = "served://"


class Refused(OSError):
    """A fetch the guard refuses; ``str()`` is ``[code] detail`` so the error text classifies exactly."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"[{code}] {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Guard:
    """The guard's settings as the download workers receive them (plain values: it is pickled)."""

    block_private: bool = True
    allowed_networks: tuple[str, ...] = ()
    allowed_endpoints: tuple[str, ...] = ()  # "ip:port" of the project's own loopback server
    max_bytes: int = 64 * 2**20

    def networks(self):
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]


# -- 1. schemes -----------------------------------------------------------------------------------
def url_problem(url: str, allow_served: bool = False) -> tuple[str, str] | None:
    """``(code, detail)`` when ``url`` must not be fetched, None when it may."""
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        return "url_invalid", "whitespace or a control character in the URL"
    if allow_served and url.startswith(SERVED):
        return None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in SCHEMES:
        valid = list(SCHEMES) + (["served"] if allow_served else [])
        return "unsupported_scheme", f"scheme {scheme!r} in {url[:120]!r}; valid: {valid}"
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError as e:
        return "url_invalid", f"{e}: {url[:120]!r}"
    if not host:
        return "url_invalid", f"no host in {url[:120]!r}"
    return None


# -- 2. addresses ---------------------------------------------------------------------------------
def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public address (``"loopback"``, ``"private"``...), or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def _literal(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` connects to; offline for literals, ``localhost`` and ``.invalid``."""
    h = host.strip("[]").rstrip(".").lower()
    lit = _literal(h)
    if lit is not None:
        return [str(lit)]
    if h == "localhost" or h.endswith(".localhost"):
        return ["127.0.0.1"]
    if h == "invalid" or h.endswith(".invalid"):
        raise Refused("dns_error", f"{host}: .invalid names never resolve (RFC 6761)")
    try:
        infos = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Refused("dns_error", f"{host}: {e}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def blocked(addr: str, port: int, guard: Guard) -> str | None:
    """Why connecting to ``addr:port`` is refused under ``guard``, or None."""
    if not guard.block_private:
        return None
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if f"{ip}:{port}" in guard.allowed_endpoints or any(ip in n for n in guard.networks()):
        return None
    why = address_problem(ip)
    return f"{ip} is {why}" if why else None


def check_host(host: str, port: int, guard: Guard) -> list[str]:
    """``host``'s addresses, all checked; raises ``Refused`` (private_address / dns_error)."""
    addrs = resolve(host, port)
    for a in addrs:
        why = blocked(a, port, guard)
        if why:
            raise Refused("private_address", why if _literal(host.strip("[]")) is not None else f"{host} -> {why}")
    return addrs


def precheck(url: str, guard: Guard) -> tuple[str, str] | None:
    """``(code, detail)`` for a URL refused without any DNS lookup (IP literal, localhost, .invalid)."""
    if not guard.block_private:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    h = host.rstrip(".").lower()
    if _literal(h) is None and h not in ("localhost", "invalid") and not h.endswith((".localhost", ".invalid")):
        return None  # a name: checked on connect, in the worker
    try:
        check_host(host, parts.port or (443 if parts.scheme == "https" else 80), guard)
    except Refused as e:
        return e.code, e.detail
    return None


# -- the opener img2dataset's workers fetch with --------------------------------------------------
def _guarded(base: type, guard: Guard) -> type:
    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *a, **kw):
        host, port = address[0], address[1]
        last: OSError | None = None
        for addr in check_host(host, port, guard):
            try:
                return socket.create_connection((addr, port), timeout, source_address)
            except OSError as e:
                last = e
        raise last or OSError(f"no address for {host}")

    class GuardedConnection(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._create_connection = create_connection

    return GuardedConnection


def _answer(open_fn):
    """``open_fn()``, with a reply that is not HTTP (a bad status line, a hang-up) as ``connection_error``."""
    try:
        return open_fn()
    except http.client.HTTPException as e:
        raise Refused("connection_error", f"{type(e).__name__}: {str(e)[:120]!r}") from None


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self._conn = _guarded(http.client.HTTPConnection, guard)

    def http_open(self, req):
        return _answer(lambda: self.do_open(http.client.HTTPConnection if req.has_proxy() else self._conn, req))


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self._conn = _guarded(http.client.HTTPSConnection, guard)

    def https_open(self, req):
        kw = {"context": self._context}
        if hasattr(self, "_check_hostname"):
            kw["check_hostname"] = self._check_hostname
        return _answer(lambda: self.do_open(http.client.HTTPSConnection if req.has_proxy() else self._conn, req, **kw))


class _Redirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"[unsupported_scheme] redirect to {newurl[:120]!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _TargetCheck(urllib.request.BaseHandler):
    """With a proxy: the target's own addresses, before every request (redirects run through it too)."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def http_request(self, req):
        parts = urlsplit(req.full_url)
        check_host(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), self.guard)
        return req

    https_request = http_request


class _Body(urllib.request.BaseHandler):
    """A 2xx body of at most ``max_bytes`` and at least one byte."""

    handler_order = 1000  # after HTTPErrorProcessor: only successful answers get here

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_response(self, req, resp):
        size = resp.headers.get("Content-Length")
        if size and size.strip().isdigit() and int(size) > self.max_bytes:
            raise Refused("too_large", f"Content-Length {int(size)} > max_image_bytes {self.max_bytes}")
        read, limit = resp.read, self.max_bytes

        def capped_read(amt=None):
            if amt is not None:
                return read(amt)
            data = read(limit + 1)
            if len(data) > limit:
                raise Refused("too_large", f"body over max_image_bytes {limit}")
            if not data:
                raise Refused("empty_body", f"{resp.status} with no bytes")
            if size and size.strip().isdigit() and len(data) < int(size):
                raise Refused("connection_error", f"connection closed after {len(data)} of {int(size)} announced bytes")
            return data

        resp.read = capped_read
        return resp

    https_response = http_response


def opener(guard: Guard) -> urllib.request.OpenerDirector:
    """http(s) through the guard, ``file://`` for the images the download step staged itself, nothing else."""
    od = urllib.request.OpenerDirector()
    handlers = [
        urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTP(guard), _HTTPS(guard),
        urllib.request.HTTPDefaultErrorHandler(), _Redirects(), urllib.request.HTTPErrorProcessor(),
        urllib.request.FileHandler(), _Body(guard.max_bytes),
    ]
    if guard.block_private and urllib.request.getproxies():
        handlers.append(_TargetCheck(guard))
    for h in handlers:
        od.add_handler(h)
    return od


_installed: Guard | None = None


def install(guard: Guard) -> None:
    """Make ``guard``'s opener urllib's global one in this process (idempotent)."""
    global _installed
    if _installed != guard:
        urllib.request.install_opener(opener(guard))
        _installed = guard
