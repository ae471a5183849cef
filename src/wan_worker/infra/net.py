"""Outbound HTTP(S) to addresses a job chose: one parser, one DNS lookup, a pinned address, one deadline.

Why each rule exists (docs/OPERATIONS.md, "Threat model"):

* A URL is parsed once, here, and refused when another common parser (``urllib``, urllib3,
  WHATWG browsers and clients, glibc's ``inet_aton``) could read a different host from it:
  userinfo, backslashes, whitespace or control characters, percent-encoded or non-ASCII
  hosts, numeric host forms other than dotted-quad IPv4.
* The host is resolved once, in a thread bounded by the deadline; every address is checked,
  and the connection goes to that checked address. The name only travels in the ``Host``
  header and in TLS (SNI and certificate verification), so DNS rebinding has no second lookup
  to win.
* Every read and write gets only the time left before one monotonic deadline, so a server
  that drips its status line, headers or body a byte at a time cannot stretch a request.
* Redirects are followed here, not by a client library, and every hop goes through the same
  parse, lookup and check.
* Failures before a valid HTTP response all read the same ("could not fetch"), so the message
  does not tell a closed port from a refused or unreachable one.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin

#: ``resolve(host, port) -> addresses``: the one DNS lookup of a request (injectable for tests).
Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_URL_CHARS = 8192
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG parses a host whose last label is a number (decimal, 0x hex or octal) as IPv4,
# and glibc's inet_aton accepts 127.1, 0x7f.1 or 2130706433; only dotted-quad is unambiguous.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local use: a private network
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class OutboundError(Exception):
    """A request was refused or failed; the message is safe to show the caller."""


class OutboundTimeout(OutboundError):
    """The request ran out of time (its own limit or the job's deadline)."""


@dataclass(frozen=True)
class Target:
    """A URL as this module reads it, and as it will be sent."""

    scheme: str  # "http" or "https"
    host: str  # a lower-case ASCII name, or an IP address in canonical form
    port: int
    path: str  # path and query, sent verbatim; the fragment is dropped

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def authority(self) -> str:
        """The ``Host`` header: the name (IPv6 in brackets), and the port unless it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes


def parse_url(url: str) -> Target:
    """Parse an http(s) URL strictly; refuse anything another parser could read differently."""
    if not isinstance(url, str) or len(url) > _MAX_URL_CHARS:
        raise OutboundError("invalid URL (too long)")
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme not in DEFAULT_PORTS:
        raise OutboundError(f"URL scheme '{scheme}' is not allowed; use http(s)")
    if any(not ("!" <= ch <= "~") for ch in url):
        raise OutboundError("invalid URL (whitespace, control or non-ASCII characters; use punycode for names)")
    if "\\" in url:
        raise OutboundError("invalid URL (backslash)")
    rest = url[scheme_match.end() :].partition("#")[0]
    if not rest.startswith("//") or rest.startswith("///"):
        raise OutboundError("invalid URL (expected scheme://host)")
    rest = rest[2:]
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if "@" in authority:
        raise OutboundError("invalid URL (credentials in the URL are not allowed)")
    host, port = _split_authority(authority)
    if path.startswith("?"):
        path = "/" + path
    return Target(scheme, host, port if port is not None else DEFAULT_PORTS[scheme], path or "/")


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        if not bracket or "%" in literal:
            raise OutboundError("invalid URL (bad IPv6 literal)")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise OutboundError("invalid URL (bad IPv6 literal)") from None
        if after and not after.startswith(":"):
            raise OutboundError("invalid URL (bad IPv6 literal)")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_raw = authority.partition(":")
        port_text = port_text_raw if colon else None
        host = _check_name(host.lower())
    if port_text is None:
        return host, None
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) <= 65535:
        raise OutboundError("invalid URL (port must be 1-65535)")
    return host, int(port_text)


def _check_name(host: str) -> str:
    if not host:
        raise OutboundError("URL has no host")
    if "%" in host:
        raise OutboundError("invalid URL (percent-encoded host)")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            ipv4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise OutboundError("invalid URL (numeric host must be dotted-quad IPv4)") from None
        if str(ipv4) != host:
            raise OutboundError("invalid URL (numeric host must be dotted-quad IPv4)")
        return host
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise OutboundError("invalid URL (host is not a valid DNS name)")
    return host


# -- addresses ------------------------------------------------------------------------------


def _public_v4_or_v6(ip: IPAddress) -> bool:
    flags = (ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved, ip.is_unspecified)
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return ip.is_global and not any(flags) and not site_local


def carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64:
        return [low32]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)  # (server, client)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::a.b.c.d (not :: or ::1)
        return [low32]
    return []


def is_public(ip: IPAddress) -> bool:
    """Whether an address is publicly routable; IPv6 forms that carry IPv4 are judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id or ip in _NAT64_LOCAL:
            return False
        if carried := carried_ipv4(ip):
            return all(_public_v4_or_v6(v4) for v4 in carried)
    return _public_v4_or_v6(ip)


def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver (getaddrinfo), TCP addresses only."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_checked(
    target: Target, *, allow_private: bool, end: float, resolve: Resolver | None = None
) -> list[IPAddress]:
    """The addresses to connect to: one lookup (none for an IP literal), every address checked."""
    if (literal := target.ip) is not None:
        addresses = [literal]
    else:
        addresses = [_parse_address(a, target.host) for a in _lookup(resolve or system_resolve, target, end)]
        if not addresses:
            raise OutboundError(f"host {target.host} does not resolve")
    if not allow_private and not all(is_public(a) for a in addresses):
        raise OutboundError(
            f"host {target.host} resolves to a non-public address; private, loopback, link-local "
            "and reserved addresses are refused"
        )
    return addresses


def _parse_address(text: str, host: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise OutboundError(f"host {host} does not resolve") from None


def _lookup(resolve: Resolver, target: Target, end: float) -> list[str]:
    """Run the resolver in a daemon thread so a slow DNS server can't outlast the deadline."""
    result: list[list[str] | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(list(resolve(target.host, target.port)))
        except BaseException as exc:  # noqa: BLE001 - reported below as "does not resolve"
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="dns-lookup", daemon=True).start()
    if not done.wait(max(0.0, end - time.monotonic())):
        raise OutboundTimeout(f"DNS lookup of {target.host} timed out")
    if isinstance(result[0], BaseException):
        raise OutboundError(f"host {target.host} does not resolve")
    return result[0]


# -- the request ----------------------------------------------------------------------------


class _DeadlineSocket:
    """A connected socket whose every send and receive gets only the time left before ``end``."""

    def __init__(self, sock: socket.socket, end: float) -> None:
        self.sock, self.end = sock, end

    def _arm(self) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        self._arm()
        return self.sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Nothing: http.client closes its connection before the body is read; ``send`` closes the socket."""


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self.sock.recv_into(buffer)


def _connect(target: Target, addresses: list[IPAddress], end: float) -> socket.socket:
    """Connect to the first checked address that answers; TLS verifies the certificate against the name."""
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            left = end - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            sock.connect((str(address), target.port))
            if target.scheme == "https":
                sock.settimeout(max(0.001, end - time.monotonic()))  # bounds the whole handshake
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            return sock
        except (OSError, ssl.SSLError):
            sock.close()
    raise OutboundError(f"could not fetch from {target.host}")


def send(
    method: str,
    target: Target,
    *,
    end: float,
    allow_private: bool,
    max_bytes: int | None,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    resolve: Resolver | None = None,
) -> Response:
    """One request, no redirects followed: parse-checked ``target``, one lookup, pinned address.

    The body is not read for a redirect or when ``max_bytes`` is None. A body over
    ``max_bytes``, or one sent with a ``Content-Encoding`` other than identity, is refused.
    """
    addresses = resolve_checked(target, allow_private=allow_private, end=end, resolve=resolve)
    raw = _connect(target, addresses, end)
    conn = http.client.HTTPConnection(str(addresses[0]), target.port)
    conn.sock = _DeadlineSocket(raw, end)  # type: ignore[assignment] - pre-connected: no lookup, no connect
    try:
        conn.putrequest(method, target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.authority)
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        fields = {k.lower(): v for k, v in response.getheaders()}
        if max_bytes is None or response.status in REDIRECT_STATUSES:
            return Response(response.status, fields, b"")
        return Response(response.status, fields, _read_body(response, fields, max_bytes))
    except TimeoutError:
        raise OutboundTimeout("timed out") from None
    except (OSError, http.client.HTTPException):
        raise OutboundError(f"could not fetch from {target.host}") from None
    finally:
        conn.close()
        raw.close()


def _read_body(response: http.client.HTTPResponse, fields: Mapping[str, str], cap: int) -> bytes:
    encoding = fields.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise OutboundError(f"response is {encoding}-encoded; only identity encoding is accepted")
    declared = fields.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise OutboundError(f"body of {declared} bytes is over the {cap} byte cap")
    body = bytearray()
    while chunk := response.read(min(64 * 1024, cap + 1 - len(body))):
        body.extend(chunk)
        if len(body) > cap:
            raise OutboundError(f"body is over the {cap} byte cap")
    return bytes(body)


def _redirect_url(target: Target, response: Response) -> str:
    """The next hop; its characters are checked before joining, since ``urljoin`` drops some."""
    location = response.headers.get("location", "")
    if not location:
        raise OutboundError(f"HTTP {response.status} without a Location")
    if any(not ("!" <= ch <= "~") or ch == "\\" for ch in location):
        raise OutboundError("invalid redirect Location (whitespace, control, non-ASCII or backslash)")
    return urljoin(str(target), location)


def end_time(timeout_s: float, deadline: float | None) -> float:
    """The monotonic time a request must end by: its own limit, or the job's deadline if sooner."""
    own = time.monotonic() + timeout_s
    return own if deadline is None else min(own, deadline)


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    deadline: float | None = None,
    allow_private: bool = False,
    max_redirects: int = 3,
    resolve: Resolver | None = None,
) -> bytes:
    """GET ``url`` and return its body (status 200 only), following at most ``max_redirects``.

    Everything, redirects included, ends within ``timeout_s`` and before ``deadline`` (a
    ``time.monotonic()`` value); each hop is parsed, resolved and checked on its own.
    """
    end = end_time(timeout_s, deadline)
    late = f"timed out after {timeout_s:g}s" if end != deadline else "timed out at the job deadline (JOB_TIMEOUT_S)"
    target = parse_url(url)
    for _ in range(max_redirects + 1):
        try:
            response = send("GET", target, end=end, allow_private=allow_private, max_bytes=max_bytes, resolve=resolve)
        except OutboundTimeout:
            raise OutboundTimeout(late) from None
        if response.status in REDIRECT_STATUSES:
            target = parse_url(_redirect_url(target, response))
            continue
        if response.status != 200:
            raise OutboundError(f"HTTP {response.status}")
        return response.body
    raise OutboundError(f"more than {max_redirects} redirects")
