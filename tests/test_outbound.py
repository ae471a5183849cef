"""Outbound requests (``wan_worker.infra.net``): parser differentials, DNS rebinding, deadlines, redirects.

Every server here is real and listens on loopback, or on a public-looking address inside a
loopback-only network namespace (``helpers/netns.py``); a resolver is injected where a name is needed,
so no test sends traffic anywhere but the local machine.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from textwrap import dedent

import pytest
from helpers import netns
from helpers.callbacks import CallbackReceiver
from helpers.logcapture import CALLBACK_SECRET
from helpers.refserver import RefServer, png_bytes
from helpers.workers import ApiWorker, start_api_worker, stop, worker_env

from wan_worker.contract.settings import Settings
from wan_worker.infra import net
from wan_worker.stages import callback

PNG = png_bytes((10, 200, 10), (32, 32))


class RawServer:
    """A TCP server on 127.0.0.1 that hands each connection to ``answer`` and counts them."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                self.requests.append(data)
                self.answer(conn)
            except OSError:  # the client gave up, as it should
                pass

    def url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[RawServer]:
    server = RawServer(answer)
    try:
        yield server
    finally:
        server.close()


def respond(status: str = "200 OK", body: bytes = PNG, headers: tuple[str, ...] = ()) -> Callable:
    def answer(conn: socket.socket) -> None:
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
        conn.sendall("\r\n".join(head).encode() + body)

    return answer


def drip(conn: socket.socket) -> None:
    """Status line and headers one byte every 0.2 s: each read succeeds, the request never ends."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: " + b"a" * 200:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def fetch(url: str, **kw) -> bytes:
    return net.fetch(url, **{"max_bytes": 1 << 20, "timeout_s": 5.0, **kw})


# -- one parser -----------------------------------------------------------------------------

#: URLs that another common parser (urllib, urllib3/requests, WHATWG, inet_aton) reads differently.
PARSER_DIFFERENTIALS = [
    "http://evil.com@127.0.0.1:{port}/",
    "http://127.0.0.1:{port}@evil.com/",
    "http://127.0.0.1:{port}\\@evil.com/",
    "http://127.0.0.1:{port}\\evil.com/",
    "http://127.0.0.1%2f@evil.com:{port}/",
    "http://%31%32%37.0.0.1:{port}/",
    "http://127.0.0.1%00.evil.com:{port}/",
    "http://0x7f000001:{port}/",
    "http://2130706433:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://127.1:{port}/",
    "http://127.0.0.1.:{port}/",
    "http://evil.com.127.0.0.1:{port}/",
    "http://127.0.0.1:{port}\t/",
    "http://127.0.\t0.1:{port}/",
    "http://127.0.0.1\n:{port}/",
    "http:// 127.0.0.1:{port}/",
    " http://127.0.0.1:{port}/",
    "http:/127.0.0.1:{port}/",
    "http:127.0.0.1:{port}/",
    "http:///127.0.0.1:{port}/",
    "http://[::1%25lo]:{port}/",
    "http://[::1]x:{port}/",
    "http://１２７.0.0.1:{port}/",
    "http://ｅvil.com:{port}/",
    "http://:{port}/",
    "http://127.0.0.1:0{port}0000/",
    "http://127.0.0.1:+{port}/",
    "http://127.0.0.1:{port}:80/",
]


@pytest.mark.parametrize("template", PARSER_DIFFERENTIALS)
def test_parser_differentials_are_refused_and_never_reach_a_server(template):
    """Refused by the parser itself, so even with private addresses allowed nothing connects."""
    with raw_server(respond()) as server:
        url = template.format(port=server.port)
        with pytest.raises(net.OutboundError, match=r"invalid URL|no host|scheme"):
            net.parse_url(url)
        with pytest.raises(net.OutboundError):
            fetch(url, allow_private=True, resolve=lambda host, port: ["127.0.0.1"])
        assert server.connections == 0


@pytest.mark.parametrize(
    "url, host, port, path, authority",
    [
        ("HTTP://Example.COM/a?b=1#frag", "example.com", 80, "/a?b=1", "example.com"),
        ("https://example.com:8443", "example.com", 8443, "/", "example.com:8443"),
        ("http://example.com?q", "example.com", 80, "/?q", "example.com"),
        ("http://[::FFFF:127.0.0.1]:81/p", "::ffff:7f00:1", 81, "/p", "[::ffff:7f00:1]:81"),
        ("http://xn--bcher-kva.example/", "xn--bcher-kva.example", 80, "/", "xn--bcher-kva.example"),
        ("http://a.example/%2e%2e/@x", "a.example", 80, "/%2e%2e/@x", "a.example"),
    ],
)
def test_accepted_urls_parse_to_one_reading(url, host, port, path, authority):
    target = net.parse_url(url)
    assert (target.host, target.port, target.path, target.authority) == (host, port, path, authority)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped, judged by 8.8.8.8
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of the metadata address
        ("64:ff9b:1::808:808", False),  # NAT64 local-use prefix: a private network
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fec0::1", False),  # site-local
        ("ff02::1", False),
        ("2001:db8::1", False),  # documentation
    ],
)
def test_addresses_are_judged_by_the_ipv4_they_carry(address, public):
    assert net.is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url", ["http://[::ffff:127.0.0.1]:{port}/", "http://[::127.0.0.1]:{port}/", "http://127.0.0.1:{port}/"]
)
def test_loopback_in_any_form_is_refused_before_connecting(url):
    with raw_server(respond()) as server:
        with pytest.raises(net.OutboundError, match="non-public"):
            fetch(url.format(port=server.port))
        assert server.connections == 0


def test_a_name_resolving_to_any_private_address_is_refused_before_connecting():
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.216.34", "127.0.0.1"]

    with raw_server(respond()) as server:
        with pytest.raises(net.OutboundError, match="non-public"):
            fetch(f"http://images.example:{server.port}/a.png", resolve=resolve)
        assert server.connections == 0 and calls == ["images.example"]


# -- one lookup, pinned ---------------------------------------------------------------------


def test_the_resolved_address_is_the_one_connected_to():
    """With private addresses allowed, a name is fetched from the address the resolver gave."""
    calls: list[tuple[str, int]] = []
    with raw_server(respond()) as server:

        def resolve(host: str, port: int) -> list[str]:
            calls.append((host, port))
            return ["127.0.0.1"]

        body = fetch(f"http://images.example:{server.port}/a.png", allow_private=True, resolve=resolve)
    assert body == PNG and calls == [("images.example", server.port)]
    request = server.requests[0].decode()
    assert request.startswith("GET /a.png HTTP/1.1\r\n")
    assert f"\r\nHost: images.example:{server.port}\r\n" in request
    assert "\r\nAccept-Encoding: identity\r\n" in request


@pytest.mark.skipif(not netns.available(), reason="needs unshare -n (root) for a loopback-only network namespace")
def test_dns_rebinding_gets_one_lookup_and_the_checked_address():
    """The resolver answers a public address first and loopback after: one lookup is made,
    the check and the connection both use it, and the loopback server is never reached."""
    result = netns.run_isolated(
        dedent(
            f"""
            import json
            from helpers.refserver import RefServer
            from wan_worker.infra import net

            public = RefServer(host="{netns.PUBLIC}")
            loopback = RefServer(port=public.port)  # same port on 127.0.0.1
            answers = [["{netns.PUBLIC}"], ["127.0.0.1"], ["127.0.0.1"]]
            calls = []

            def resolve(host, port):
                calls.append(host)
                return answers[len(calls) - 1]

            body = net.fetch(f"http://rebind.example:{{public.port}}/red.png", max_bytes=1 << 20,
                             timeout_s=5, allow_private=False, resolve=resolve)
            print(json.dumps({{"calls": calls, "public": public.hits, "loopback": loopback.hits,
                              "ok": body == public.routes["/red.png"][2]}}))
            """
        )
    )
    assert result == {"calls": ["rebind.example"], "public": ["/red.png"], "loopback": [], "ok": True}


# -- redirects ------------------------------------------------------------------------------


@pytest.mark.skipif(not netns.available(), reason="needs unshare -n (root) for a loopback-only network namespace")
def test_every_redirect_hop_is_parsed_resolved_and_checked():
    result = netns.run_isolated(
        dedent(
            f"""
            import json
            from helpers.refserver import RefServer
            from wan_worker.infra import net

            public = RefServer(host="{netns.PUBLIC}")
            loopback = RefServer()
            calls = []

            def resolve(host, port):
                calls.append(host)
                return {{"public.example": ["{netns.PUBLIC}"], "rebind.example": ["127.0.0.1"]}}[host]

            def attempt(location):
                try:
                    net.fetch(public.url("/redirect?to=" + location), max_bytes=1 << 20, timeout_s=5,
                              allow_private=False, resolve=resolve)
                    return "fetched"
                except net.OutboundError as exc:
                    return str(exc)

            results = {{
                "loopback": attempt(loopback.url("/red.png")),
                "mapped": attempt(f"http://[::ffff:127.0.0.1]:{{loopback.port}}/red.png"),
                "userinfo": attempt(f"http://public.example@127.0.0.1:{{loopback.port}}/red.png"),
                "name": attempt(f"http://rebind.example:{{loopback.port}}/red.png"),
                "public": attempt(f"http://public.example:{{public.port}}/blue.png"),
            }}
            print(json.dumps({{"results": results, "calls": calls, "loopback": loopback.hits,
                              "public": public.hits}}))
            """
        )
    )
    results = result["results"]
    assert "non-public" in results["loopback"] and "non-public" in results["mapped"]
    assert "credentials" in results["userinfo"] and "non-public" in results["name"]
    assert results["public"] == "fetched"
    assert result["calls"] == ["rebind.example", "public.example"]
    assert result["loopback"] == []  # no refused hop ever connected
    assert result["public"].count("/blue.png") == 1 and len(result["public"]) == 6


def test_too_many_redirects_and_a_malformed_location_are_refused():
    server = RefServer()
    try:
        hop = server.url("/red.png")
        for _ in range(4):
            hop = server.url("/redirect?to=" + hop)
        with pytest.raises(net.OutboundError, match="more than 3 redirects"):
            fetch(hop, allow_private=True)
        assert fetch(hop, allow_private=True, max_redirects=4) == server.routes["/red.png"][2]
    finally:
        server.close()
    for location in ("http://127.0.0.1:1\\@evil.example/", "http://127.0.0.1:1/\tx", "/caf\u00e9"):
        with (
            raw_server(respond("302 Found", b"", (f"Location: {location}",))) as redirecting,
            pytest.raises(net.OutboundError, match="invalid redirect Location"),
        ):
            fetch(redirecting.url(), allow_private=True)


# -- deadlines ------------------------------------------------------------------------------


def test_a_server_dripping_its_headers_is_cut_off_at_the_request_limit():
    with raw_server(drip) as server:
        started = time.monotonic()
        with pytest.raises(net.OutboundTimeout, match="timed out after 1s"):
            fetch(server.url(), allow_private=True, timeout_s=1.0)
        assert time.monotonic() - started < 1.0 + 2.0


def test_the_job_deadline_cuts_a_request_short():
    with raw_server(drip) as server:
        started = time.monotonic()
        with pytest.raises(net.OutboundTimeout, match="job deadline"):
            fetch(server.url(), allow_private=True, timeout_s=30.0, deadline=started + 1.0)
        assert time.monotonic() - started < 1.0 + 2.0


def test_a_slow_dns_lookup_is_bounded():
    def resolve(host: str, port: int) -> list[str]:
        time.sleep(10)
        return ["127.0.0.1"]

    started = time.monotonic()
    with pytest.raises(net.OutboundTimeout, match="timed out"):
        fetch("http://slow-dns.example/a.png", allow_private=True, timeout_s=1.0, resolve=resolve)
    assert time.monotonic() - started < 1.0 + 2.0


def test_an_unresolvable_name_is_refused():
    def resolve(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(net.OutboundError, match="does not resolve"):
        fetch("http://nowhere.example/a.png", resolve=resolve)


# -- uniform failures, caps, encodings --------------------------------------------------------


def test_connection_failures_read_the_same_for_closed_and_broken_ports():
    """A closed port, a port that hangs up and one that speaks something else: one message."""
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()

    def hang_up(conn: socket.socket) -> None:
        conn.close()

    def not_http(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    messages = set()
    with raw_server(hang_up) as hangs, raw_server(not_http) as other:
        for port in (closed_port, hangs.port, other.port):
            with pytest.raises(net.OutboundError) as info:
                fetch(f"http://127.0.0.1:{port}/", allow_private=True, timeout_s=2.0)
            messages.add(str(info.value))
    assert messages == {"could not fetch from 127.0.0.1"}


def test_encoded_bodies_are_refused_and_identity_is_asked_for():
    gzipped = respond(body=gzip.compress(PNG), headers=("Content-Encoding: gzip",))
    with raw_server(gzipped) as server, pytest.raises(net.OutboundError, match="gzip-encoded; only identity"):
        fetch(server.url(), allow_private=True)
    assert b"Accept-Encoding: identity\r\n" in server.requests[0]


def test_body_cap_holds_with_and_without_a_content_length():
    def undeclared(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"0" * 50_000)

    with raw_server(respond(body=b"0" * 50_000)) as declared, raw_server(undeclared) as streamed:
        with pytest.raises(net.OutboundError, match="body of 50000 bytes is over the 10000 byte cap"):
            fetch(declared.url(), allow_private=True, max_bytes=10_000)
        with pytest.raises(net.OutboundError, match="body is over the 10000 byte cap"):
            fetch(streamed.url(), allow_private=True, max_bytes=10_000)
        assert len(fetch(streamed.url(), allow_private=True, max_bytes=50_000)) == 50_000


def test_non_200_is_an_error_naming_the_status():
    with raw_server(respond("404 Not Found", b"no")) as server, pytest.raises(net.OutboundError, match="HTTP 404"):
        fetch(server.url(), allow_private=True)


# -- the job callback -----------------------------------------------------------------------


def deliver(url: str, deadline: float | None = None, **overrides) -> bool:
    settings = Settings(**{"callback_timeout_s": 1.0, "callback_attempts": 4, **overrides})
    return callback.deliver(url, CALLBACK_SECRET, {"job_id": "j"}, settings, deadline=deadline)


def test_a_dripping_callback_receiver_is_bounded_for_all_attempts():
    with raw_server(drip) as receiver:
        started = time.monotonic()
        assert deliver(receiver.url("/cb")) is False
        assert time.monotonic() - started < 1.0 + 2.0  # CALLBACK_TIMEOUT_S bounds every attempt together


def test_the_job_deadline_bounds_the_callback_with_a_short_grace():
    with raw_server(drip) as receiver:
        started = time.monotonic()
        assert deliver(receiver.url("/cb"), deadline=started + 0.5, callback_timeout_s=30) is False
        assert time.monotonic() - started < callback.LATE_JOB_GRACE_S + 2.0
    # A job already past its deadline still reports its result to a receiver that answers.
    with CallbackReceiver() as ok:
        assert deliver(ok.url, deadline=time.monotonic() - 60) is True
        assert len(ok.deliveries) == 1 and ok.deliveries[0].signature_ok


def test_callback_redirects_are_not_followed_or_retried():
    with CallbackReceiver() as target:
        with raw_server(respond("307 Temporary Redirect", b"", (f"Location: {target.url}",))) as redirecting:
            assert deliver(redirecting.url("/cb")) is False
        assert redirecting.connections == 1 and target.deliveries == []


@pytest.mark.parametrize(
    "allowed, job_url, used",
    [
        ("hooks.example", "https://hooks.example/cb", True),
        ("hooks.example", "https://hooks.example:8443/cb", True),  # a bare host: any port
        ("hooks.example:8443", "https://hooks.example:8443/cb", True),
        ("hooks.example:8443", "https://hooks.example/cb", False),
        ("hooks.example:8443", "http://hooks.example:8080/cb", False),
        ("HOOKS.example.:443", "https://hooks.EXAMPLE/cb", True),
        ("[::1]:9000", "http://[0:0::1]:9000/cb", True),
        ("[::1]:9000", "http://[::1]:9001/cb", False),
        ("hooks.example", "http://hooks.example@127.0.0.1/cb", False),  # userinfo: host is 127.0.0.1
        ("hooks.example", "http://127.0.0.1\\@hooks.example/cb", False),  # backslash
        ("hooks.example", "http://hooks.example\t/cb", False),
        ("hooks.example", "http://hooks%2eexample/cb", False),
        ("hooks.example", "ftp://hooks.example/cb", False),
    ],
)
def test_callback_allow_list_with_host_and_port(allowed, job_url, used):
    settings = Settings(callback_url="https://operator.example/cb", callback_allowed_hosts=allowed)
    url, warning = callback.resolve_url(settings, job_url)
    assert (url == job_url) is used
    assert (warning is None) is used
    if not used:
        assert url == "https://operator.example/cb"


def test_an_invalid_configured_callback_url_sends_nothing():
    with raw_server(respond()) as receiver:
        assert deliver(f"http://operator.example@127.0.0.1:{receiver.port}/cb") is False
    assert receiver.connections == 0


# -- end to end: a worker with private references refused --------------------------------------


@pytest.fixture(scope="module")
def public_only_worker(tiny_models, s3, tmp_path_factory) -> Iterator[ApiWorker]:
    env = worker_env(tiny_models, **s3.env(), ALLOW_PRIVATE_REFERENCE_URLS="0")
    worker = start_api_worker(env, tmp_path_factory.mktemp("public-only") / "worker.log")
    yield worker
    stop(worker.proc)


def test_parser_differential_reference_refused_through_the_api_and_worker_keeps_serving(public_only_worker):
    server = RefServer()
    job = {"job_type": "image_fast", "prompt": "p", "width": 256, "height": 256, "config": {"num_inference_steps": 1}}
    try:
        for url in (
            f"http://images.example@127.0.0.1:{server.port}/red.png",
            f"http://127.0.0.1:{server.port}\\@images.example/red.png",
            f"http://0x7f000001:{server.port}/red.png",
            f"http://[::ffff:127.0.0.1]:{server.port}/red.png",
        ):
            out = public_only_worker.runsync({**job, "reference_image_url": url, "strict_references": True})
            assert out["status"] == "FAILED", out
            assert "reference_image_url" in out["error"] and (
                "invalid URL" in out["error"] or "non-public" in out["error"]
            )
        lenient = public_only_worker.runsync({**job, "reference_image_url": f"http://0x7f000001:{server.port}/red.png"})
        assert lenient["status"] == "COMPLETED", lenient
        assert lenient["output"]["assets"][0]["metadata"]["reference_mode_applied"] == "none"
        assert any("invalid URL" in w for w in lenient["output"]["warnings"])
        assert server.hits == []  # nothing reached the loopback server
    finally:
        server.close()
