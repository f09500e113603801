"""fal_api.remote_fetch, fetching: an image_url the address guard approves is fetched from the addresses it
checked and no others (redirects checked like the first URL, at most max_redirects of them), within size and
time limits, uncompressed, past any proxy settings, and every failure is a RemoteImageError that says why.

No test here opens a connection to anything but a 127.0.0.1 server the test itself started: fetches resolve
`images.example` (through a fake resolver) to a public address, which the guard approves, and then pin it to the
test's own server. The guard's refusals are tests/test_fal_address_guard.py.
"""
from __future__ import annotations

import asyncio
import inspect
import io
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
from fake_dns import PUBLIC, fake_resolver

T = TypeVar("T")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


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
