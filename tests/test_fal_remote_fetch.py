"""fal_api.remote_fetch: an image_url of another host is fetched only from public addresses, after DNS and on
every redirect, within size and time limits.

No test here opens a connection to anything but a 127.0.0.1 server the test itself started. Refusals run with a
connector factory that fails the test if it is ever called; allowed fetches resolve `images.example` (through a
fake resolver) to a public address, which the guard approves, and then pin it to the test's own server.
"""
from __future__ import annotations

import asyncio
import inspect
import io
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from comfyui_krea.fal_api.remote_fetch import (
    FetchLimits,
    RemoteImageError,
    Resolver,
    fetch_image_bytes,
    pinned_connector,
    refused_address,
    system_resolver,
)

T = TypeVar("T")

PUBLIC = "93.184.216.34"  # a public address the fake resolver hands out; nothing ever connects to it


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def fake_resolver(table: dict[str, list[str]]) -> Resolver:
    """A resolver answering from `table`; unknown names fail as getaddrinfo does."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {host}")
        return list(table[host])

    return resolve


async def must_not_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"must not resolve {host!r}: an IP literal is checked as it is")


class MustNotConnect:
    """A connector factory that fails the test when called, and remembers that it was."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, pinned: dict[str, list[str]]) -> aiohttp.BaseConnector:
        self.calls.append(pinned)
        raise AssertionError(f"must not connect: {pinned}")


class StopBeforeConnecting(Exception):
    """Raised by RecordOnly, so that an approved fetch ends before it opens a connection."""


class RecordOnly:
    """A connector factory that records what it was asked to pin and then stops the fetch."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, pinned: dict[str, list[str]]) -> aiohttp.BaseConnector:
        self.calls.append(pinned)
        raise StopBeforeConnecting


class ToTestServer:
    """Pins every host the guard approved to 127.0.0.1, where the test's server listens; records each hop."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, pinned: dict[str, list[str]]) -> aiohttp.BaseConnector:
        # The guard hands over only addresses it approved; anything else here is a guard bug, caught before any
        # connection is made.
        for host, addresses in pinned.items():
            assert addresses and all(refused_address(a) is None for a in addresses), (host, addresses)
        self.calls.append(pinned)
        return pinned_connector({host: ["127.0.0.1"] for host in pinned})


@dataclass
class Server:
    port: int
    hits: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "images.example") -> str:
        return f"http://{host}:{self.port}{path}"


@asynccontextmanager
async def serve() -> AsyncIterator[Server]:
    """An aiohttp server on 127.0.0.1 with the routes the tests fetch; port chosen by the OS."""
    server = Server(port=0)

    def hit(name: str) -> None:
        server.hits[name] = server.hits.get(name, 0) + 1

    async def image(request: web.Request) -> web.Response:
        hit("image")
        if not request.raw_path.startswith("/"):
            hit("as proxy")  # absolute-form request line: the client took this server for a proxy
        return web.Response(body=PNG, content_type="image/png")

    async def canary(request: web.Request) -> web.Response:
        hit("canary")  # a refused redirect names this; the guard must stop before it is reached
        return web.Response(body=PNG, content_type="image/png")

    async def hop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        return web.Response(status=302, headers={"Location": f"/hop/{n - 1}"})  # relative, resolved by the client

    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        headers = {"Location": request.query["to"]} if "to" in request.query else {}
        return web.Response(status=status, headers=headers)

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89" * int(request.query["n"]), content_type="image/png")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()  # no Content-Length: only counting what arrives can stop it
        await response.prepare(request)
        try:
            for _ in range(int(request.query["n"]) // 1024):
                await response.write(b"\x89" * 1024)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading, as it should
        return response

    async def headers(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Accept-Encoding", "(none)"))

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(server.release.wait(), timeout=5)
        except asyncio.TimeoutError:
            pass
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/img.png", image)
    app.router.add_get("/canary", canary)
    app.router.add_get("/hop/{n}", hop)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/sized", sized)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/headers", headers)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


def with_server(scenario: Callable[[Server], Awaitable[T]]) -> T:
    async def main() -> T:
        async with serve() as server:
            return await scenario(server)

    return asyncio.run(main())


def refused(url: str, resolver: Resolver, **kwargs: object) -> str:
    """The message of the RemoteImageError that fetching `url` raises, checking no connection was attempted."""
    factory = MustNotConnect()
    with pytest.raises(RemoteImageError) as caught:
        asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=factory, **kwargs))  # type: ignore[arg-type]
    assert factory.calls == []
    return str(caught.value)


# --- refused_address ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "word"), [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("169.254.1.1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("100.64.0.1", "not globally routable"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", None),  # refused; the word depends on the Python version's tables
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fd00:ec2::254", "private"),
    ("ff02::1", "multicast"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("2001:db8::1", None),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", None),  # teredo
    ("fec0::1", None),  # site-local
])
def test_refused_address_names_why(address: str, word: str | None) -> None:
    reason = refused_address(address)
    assert reason is not None, address
    if word is not None:
        assert reason.startswith(word), (address, reason)


def test_refused_address_says_what_an_embedded_or_metadata_address_is() -> None:
    assert refused_address("::ffff:127.0.0.1") == "loopback (IPv4-mapped 127.0.0.1)"
    assert refused_address("2002:7f00:1::") == "loopback (6to4 of 127.0.0.1)"
    assert refused_address("64:ff9b::a00:1") == "private (NAT64 of 10.0.0.1)"
    assert refused_address("169.254.169.254") == "link-local (cloud metadata)"
    assert refused_address("fd00:ec2::254") == "private (cloud metadata)"


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", PUBLIC, "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::",  # IPv6 forms of a public IPv4 address
])
def test_refused_address_passes_public_addresses(address: str) -> None:
    assert refused_address(address) is None


@pytest.mark.parametrize("address", ["", "localhost", "example.com", "1.2.3", "::g", "10.0.0.1/8"])
def test_refused_address_refuses_what_is_not_an_address(address: str) -> None:
    assert refused_address(address) == "not an IP address"


# --- refusals before any connection ------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "::1", "fe80::1", "fc00::1", "fd00:ec2::254", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "2002:7f00:1::",
    "100.64.0.1",
])
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    message = refused("http://images.example/x.png", fake_resolver({"images.example": [address]}))
    assert f"image_url host 'images.example' resolves to {address}, a " in message
    assert "only public addresses may be fetched" in message


def test_the_message_names_host_address_and_reason() -> None:
    message = refused("https://x.example/a.png", fake_resolver({"x.example": ["10.0.0.5"]}))
    assert message == ("image_url host 'x.example' resolves to 10.0.0.5, a private address; "
                       "only public addresses may be fetched")


@pytest.mark.parametrize("addresses", [[PUBLIC, "10.0.0.5"], ["10.0.0.5", PUBLIC], [PUBLIC, "::1"]])
def test_one_non_public_address_among_public_ones_refuses_the_name(addresses: list[str]) -> None:
    message = refused("http://images.example/x.png", fake_resolver({"images.example": addresses}))
    assert "resolves to" in message and PUBLIC not in message


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1/x.png", "127.0.0.1, a loopback"),
    ("http://127.0.0.1:8188/prompt", "127.0.0.1, a loopback"),
    ("http://[::1]/", "::1, a loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback (IPv4-mapped 127.0.0.1)"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://10.0.0.1/", "private"),
    ("http://0.0.0.0/", "unspecified"),
    # Legacy numeric spellings of IPv4 addresses, which yarl leaves as they are and resolvers read as addresses.
    ("http://2130706433/x.png", "IPv4 address 127.0.0.1, a loopback"),
    ("http://017700000001/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://0x7f.1/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://0x7f000001/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://127.1/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://127.0.0.1./", "IPv4 address 127.0.0.1, a loopback"),
    ("http://10.1/", "IPv4 address 10.0.0.1, a private"),
    ("http://2852039166/", "IPv4 address 169.254.169.254, a link-local"),
    ("http://134744072/", "legacy spelling of the IPv4 address 8.8.8.8"),
    ("http://256.1.1.1/", "not a valid one"),
    ("http://08.1.1.1/", "not a valid one"),
    ("http://1.2.3.4.5/", "not a valid one"),
    ("http://4294967296/", "not a valid one"),
])
def test_ip_literal_hosts_are_checked_without_resolving(url: str, says: str) -> None:
    assert says in refused(url, must_not_resolve)


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "ftp://images.example/x.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "gopher://images.example/",
    "javascript:alert(1)",
    "//images.example/x.png",
    "images.example/x.png",
])
def test_only_http_and_https_are_fetched(url: str) -> None:
    assert "only http and https URLs may be fetched" in refused(url, fake_resolver({"images.example": [PUBLIC]}))


@pytest.mark.parametrize("url", [
    "http://user:pass@images.example/x.png",
    "http://user@images.example/x.png",
    "https://:secret@images.example/x.png",
])
def test_credentials_in_the_url_are_refused(url: str) -> None:
    message = refused(url, fake_resolver({"images.example": [PUBLIC]}))
    assert "carries user credentials" in message and "pass" not in message and "secret" not in message


def test_a_url_without_host_or_with_port_zero_is_refused() -> None:
    resolver = fake_resolver({"images.example": [PUBLIC]})
    assert "names no host" in refused("http:///x.png", resolver)
    assert "port 0" in refused("http://images.example:0/x.png", resolver)
    assert "not a valid URL" in refused("http://images.example:99999/x.png", resolver)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    message = refused("http://nowhere.example/x.png", fake_resolver({}))
    assert "image_url host 'nowhere.example' could not be resolved" in message


def test_a_name_resolving_to_nothing_or_to_garbage_is_refused() -> None:
    assert "resolves to no address" in refused("http://a.example/", fake_resolver({"a.example": []}))
    message = refused("http://a.example/", fake_resolver({"a.example": ["not-an-ip"]}))
    assert "resolves to not-an-ip, which is not an IP address" in message


def test_approved_hosts_reach_the_connector_pinned_to_their_checked_addresses() -> None:
    for url, resolver, pinned in [
        ("https://images.example/x.png", fake_resolver({"images.example": [PUBLIC, "2606:4700:4700::1111"]}),
         {"images.example": [PUBLIC, "2606:4700:4700::1111"]}),
        ("http://8.8.8.8/x.png", must_not_resolve, {"8.8.8.8": ["8.8.8.8"]}),
        ("http://[2606:4700:4700::1111]/x.png", must_not_resolve,
         {"2606:4700:4700::1111": ["2606:4700:4700::1111"]}),
    ]:
        factory = RecordOnly()
        with pytest.raises(StopBeforeConnecting):
            asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=factory))
        assert factory.calls == [pinned]


def test_the_resolver_is_asked_for_the_host_and_the_default_or_given_port() -> None:
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [PUBLIC]

    for url in ["http://images.example/x", "https://images.example/x", "http://images.example:8080/x"]:
        with pytest.raises(StopBeforeConnecting):
            asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=RecordOnly()))
    assert asked == [("images.example", 80), ("images.example", 443), ("images.example", 8080)]


# --- fetches from the test's own server --------------------------------------------------------------------------

def _resolver_for_tests() -> Resolver:
    return fake_resolver({"images.example": [PUBLIC], "evil.example": ["10.0.0.7"]})


def test_an_image_from_an_approved_host_is_returned() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> bytes:
        return await fetch_image_bytes(server.url("/img.png"), resolver=_resolver_for_tests(),
                                       connector_factory=factory)

    assert with_server(scenario) == PNG
    assert factory.calls == [{"images.example": [PUBLIC]}]


def test_the_defaults_are_the_system_resolver_and_the_pinned_connector() -> None:
    parameters = inspect.signature(fetch_image_bytes).parameters
    assert parameters["resolver"].default is system_resolver
    assert parameters["connector_factory"].default is pinned_connector
    assert parameters["limits"].default == FetchLimits(max_bytes=32 * 1024 * 1024, timeout_s=20.0, max_redirects=3)


def test_system_resolver_returns_addresses_as_strings() -> None:
    # Numeric hosts: getaddrinfo answers without asking DNS, so this runs offline.
    assert asyncio.run(system_resolver("127.0.0.1", 80)) == ["127.0.0.1"]
    assert asyncio.run(system_resolver("::1", 443)) == ["::1"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed_and_checked(status: int) -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> bytes:
        target = server.url("/img.png")
        return await fetch_image_bytes(server.url(f"/redirect?status={status}&to={target}"),
                                       resolver=_resolver_for_tests(), connector_factory=factory)

    assert with_server(scenario) == PNG
    assert factory.calls == [{"images.example": [PUBLIC]}] * 2


def test_a_redirect_to_a_name_resolving_to_a_private_address_is_refused_before_connecting() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/redirect?to=http://evil.example/x.png"),
                                    resolver=_resolver_for_tests(), connector_factory=factory)
        return str(caught.value)

    message = with_server(scenario)
    assert "image_url host 'evil.example' resolves to 10.0.0.7, a private address" in message
    assert factory.calls == [{"images.example": [PUBLIC]}]  # the first hop only


def test_a_redirect_to_a_loopback_literal_is_refused_before_connecting() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        literal = f"http://127.0.0.1:{server.port}/canary"
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(f"/redirect?to={literal}"), resolver=_resolver_for_tests(),
                                    connector_factory=factory)
        assert server.hits.get("canary", 0) == 0
        return str(caught.value)

    assert "image_url host '127.0.0.1' is 127.0.0.1, a loopback address" in with_server(scenario)
    assert factory.calls == [{"images.example": [PUBLIC]}]


@pytest.mark.parametrize(("location", "says"), [
    ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@images.example/img.png", "carries user credentials"),
    ("http://2130706433:{port}/canary", "loopback"),  # with the test server's port, should the guard fail
    ("http://nowhere.example/x.png", "could not be resolved"),
])
def test_a_redirect_is_checked_like_the_first_url(location: str, says: str) -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(f"/redirect?to={location.format(port=server.port)}"),
                                    resolver=_resolver_for_tests(), connector_factory=factory)
        assert server.hits.get("canary", 0) == 0
        return str(caught.value)

    assert says in with_server(scenario)
    assert len(factory.calls) == 1


def test_a_redirect_without_location_is_refused() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/redirect?status=302"), resolver=_resolver_for_tests(),
                                    connector_factory=ToTestServer())
        return str(caught.value)

    assert "HTTP 302 without a Location" in with_server(scenario)


def test_redirect_chains_are_followed_up_to_max_redirects_and_no_further() -> None:
    limits = FetchLimits(max_redirects=3)
    within, beyond = ToTestServer(), ToTestServer()

    async def scenario(server: Server) -> str:
        resolver = _resolver_for_tests()
        assert await fetch_image_bytes(server.url("/hop/3"), resolver=resolver, connector_factory=within,
                                       limits=limits) == PNG
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/hop/4"), resolver=resolver, connector_factory=beyond, limits=limits)
        return str(caught.value)

    assert "redirected more than 3 times" in with_server(scenario)
    assert len(within.calls) == 4 and len(beyond.calls) == 4  # the fifth hop is never requested


def test_a_body_of_exactly_max_bytes_is_returned() -> None:
    async def scenario(server: Server) -> tuple[bytes, bytes]:
        limits = FetchLimits(max_bytes=4096)
        resolver = _resolver_for_tests()
        sized = await fetch_image_bytes(server.url("/sized?n=4096"), resolver=resolver,
                                        connector_factory=ToTestServer(), limits=limits)
        streamed = await fetch_image_bytes(server.url("/chunked?n=4096"), resolver=resolver,
                                           connector_factory=ToTestServer(), limits=limits)
        return sized, streamed

    sized, streamed = with_server(scenario)
    assert sized == streamed == b"\x89" * 4096


def test_the_body_is_asked_for_uncompressed() -> None:
    # A compressed body could inflate far past what Content-Length promised; identity keeps the two the same.
    async def scenario(server: Server) -> bytes:
        return await fetch_image_bytes(server.url("/headers"), resolver=_resolver_for_tests(),
                                       connector_factory=ToTestServer())

    assert with_server(scenario) == b"identity"


def test_proxy_settings_in_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would connect on the fetch's behalf, past the pinned addresses. The one named here is the test's own
    # server, so a fetch that obeyed it would still only reach 127.0.0.1 servers the test started.
    async def scenario(server: Server) -> bytes:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{server.port}")
        body = await fetch_image_bytes(server.url("/img.png"), resolver=_resolver_for_tests(),
                                       connector_factory=ToTestServer())
        assert server.hits == {"image": 1}
        return body

    assert with_server(scenario) == PNG


@pytest.mark.parametrize(("path", "says"), [
    ("/sized?n=4097", "sends 4097 bytes, more than the 4096 allowed"),  # refused from Content-Length
    ("/chunked?n=1048576", "sent more than the 4096 bytes allowed"),  # chunked: refused while reading
])
def test_a_body_over_max_bytes_is_refused(path: str, says: str) -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(path), resolver=_resolver_for_tests(),
                                    connector_factory=ToTestServer(), limits=FetchLimits(max_bytes=4096))
        return str(caught.value)

    assert says in with_server(scenario)


@pytest.mark.parametrize("code", [404, 500, 204, 304])
def test_a_non_2xx_answer_is_refused_with_its_status(code: int) -> None:
    async def scenario(server: Server) -> bytes | str:
        try:
            return await fetch_image_bytes(server.url(f"/status/{code}"), resolver=_resolver_for_tests(),
                                           connector_factory=ToTestServer())
        except RemoteImageError as exc:
            return str(exc)

    result = with_server(scenario)
    if code == 204:
        assert result == b""  # 2xx, an empty body: the image decoder downstream says what is wrong with it
    else:
        assert result == f"image_url host 'images.example' answered HTTP {code}; expected 2xx"


def test_a_slow_server_times_out() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/slow"), resolver=_resolver_for_tests(),
                                    connector_factory=ToTestServer(), limits=FetchLimits(timeout_s=0.5))
        return str(caught.value)

    start = time.monotonic()
    assert "timed out after 0.5 s" in with_server(scenario)
    assert time.monotonic() - start < 3


def test_a_slow_resolver_times_out() -> None:
    async def slow_resolver(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return [PUBLIC]

    message = refused("http://images.example/x.png", slow_resolver, limits=FetchLimits(timeout_s=0.2))
    assert "timed out after 0.2 s" in message


def test_pinned_connector_connects_pinned_hosts_only() -> None:
    async def scenario(server: Server) -> None:
        async with aiohttp.ClientSession(connector=pinned_connector({"images.example": ["127.0.0.1"]})) as session:
            async with session.get(server.url("/img.png")) as response:
                assert await response.read() == PNG
            # Names are case-insensitive and may end in a dot; both still select the pinned addresses.
            async with session.get(server.url("/img.png", host="Images.Example.")) as response:
                assert await response.read() == PNG
            with pytest.raises(aiohttp.ClientConnectorError, match="not pinned"):
                await session.get(server.url("/img.png", host="other.example"))
        assert server.hits["image"] == 2

    with_server(scenario)


def test_a_connection_error_is_a_remote_image_error_with_its_reason() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/img.png"), resolver=_resolver_for_tests(),
                                    connector_factory=lambda pinned: pinned_connector({"elsewhere.example": [PUBLIC]}))
        return str(caught.value)

    message = with_server(scenario)
    assert "image_url host 'images.example' could not be fetched" in message and "not pinned" in message
