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
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult

from comfyui_krea.fal_api.remote_fetch import (
    FetchLimits,
    RemoteImageError,
    _PinnedResolver,
    fetch_image_bytes,
    pinned_connector,
    system_resolver,
)
from fake_dns import PUBLIC
from fetch_server import PNG, Server, ToTestServer, resolver_for_tests, with_server

# --- fetches from the test's own server --------------------------------------------------------------------------

def test_an_image_from_an_approved_host_is_returned() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> bytes:
        return await fetch_image_bytes(server.url("/img.png"), resolver=resolver_for_tests(),
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


def test_system_resolver_asks_for_the_port_it_is_given() -> None:
    # getaddrinfo answers for a host and a port together; one it cannot serve fails like a name it cannot find.
    with pytest.raises(OSError):
        asyncio.run(system_resolver("127.0.0.1", -1))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed_and_checked(status: int) -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> bytes:
        target = server.url("/img.png")
        return await fetch_image_bytes(server.url(f"/redirect?status={status}&to={target}"),
                                       resolver=resolver_for_tests(), connector_factory=factory)

    assert with_server(scenario) == PNG
    assert factory.calls == [{"images.example": [PUBLIC]}] * 2


def test_a_redirect_to_a_name_resolving_to_a_private_address_is_refused_before_connecting() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/redirect?to=http://evil.example/x.png"),
                                    resolver=resolver_for_tests(), connector_factory=factory)
        return str(caught.value)

    message = with_server(scenario)
    assert "image_url host 'evil.example' resolves to 10.0.0.7, a private address" in message
    assert factory.calls == [{"images.example": [PUBLIC]}]  # the first hop only


def test_a_redirect_to_a_loopback_literal_is_refused_before_connecting() -> None:
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        literal = f"http://127.0.0.1:{server.port}/canary"
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(f"/redirect?to={literal}"), resolver=resolver_for_tests(),
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
                                    resolver=resolver_for_tests(), connector_factory=factory)
        assert server.hits.get("canary", 0) == 0
        return str(caught.value)

    assert says in with_server(scenario)
    assert len(factory.calls) == 1


def test_a_redirect_without_location_is_refused() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/redirect?status=302"), resolver=resolver_for_tests(),
                                    connector_factory=ToTestServer())
        return str(caught.value)

    assert "HTTP 302 without a Location" in with_server(scenario)


def test_redirect_chains_are_followed_up_to_max_redirects_and_no_further() -> None:
    limits = FetchLimits(max_redirects=3)
    within, beyond = ToTestServer(), ToTestServer()

    async def scenario(server: Server) -> str:
        resolver = resolver_for_tests()
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
        resolver = resolver_for_tests()
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
        return await fetch_image_bytes(server.url("/headers"), resolver=resolver_for_tests(),
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
        body = await fetch_image_bytes(server.url("/img.png"), resolver=resolver_for_tests(),
                                       connector_factory=ToTestServer())
        assert server.hits == {"image": 1}
        return body

    assert with_server(scenario) == PNG


@pytest.mark.parametrize(("path", "max_bytes", "says"), [
    ("/sized?n=4097", 4096, "sends 4097 bytes, more than the 4096 allowed"),  # refused from Content-Length
    ("/chunked?n=1048576", 4096, "sent more than the 4096 bytes allowed"),  # chunked: refused while reading
    # Every 64 KiB piece read is under the limit: only the count of all of them together passes it.
    ("/chunked?n=1048576", 100 * 1024, "sent more than the 102400 bytes allowed"),
])
def test_a_body_over_max_bytes_is_refused(path: str, max_bytes: int, says: str) -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(path), resolver=resolver_for_tests(),
                                    connector_factory=ToTestServer(), limits=FetchLimits(max_bytes=max_bytes))
        return str(caught.value)

    assert with_server(scenario) == f"image_url host 'images.example' {says}"


def test_a_body_read_in_many_pieces_is_returned_whole() -> None:
    body = bytes(range(256)) * 1200  # 300 KiB: several of the reader's 64 KiB pieces, each different

    async def scenario(server: Server) -> bytes:
        return await fetch_image_bytes(server.url("/sized?n=307200&pattern=1"), resolver=resolver_for_tests(),
                                       connector_factory=ToTestServer())

    assert with_server(scenario) == body


@pytest.mark.parametrize("code", [404, 500, 204, 300, 304])
def test_a_non_2xx_answer_is_refused_with_its_status(code: int) -> None:
    async def scenario(server: Server) -> bytes | str:
        try:
            return await fetch_image_bytes(server.url(f"/status/{code}"), resolver=resolver_for_tests(),
                                           connector_factory=ToTestServer())
        except RemoteImageError as exc:
            return str(exc)

    result = with_server(scenario)
    if code == 204:
        assert result == b""  # 2xx, an empty body: the image decoder downstream says what is wrong with it
    else:
        assert result == f"image_url host 'images.example' answered HTTP {code}; expected 2xx"


@pytest.mark.parametrize("code", [300, 404])
def test_a_non_2xx_body_is_never_read(code: int) -> None:
    # Its body (here over the size limit) is no image; the status is what the refusal names.
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url(f"/status/{code}?n=8192"), resolver=resolver_for_tests(),
                                    connector_factory=ToTestServer(), limits=FetchLimits(max_bytes=4096))
        return str(caught.value)

    assert with_server(scenario) == f"image_url host 'images.example' answered HTTP {code}; expected 2xx"


def test_a_slow_server_times_out() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/slow"), resolver=resolver_for_tests(),
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
            with pytest.raises(aiohttp.ClientConnectorError, match="not pinned") as caught:
                await session.get(server.url("/img.png", host="other.example"))
            # The refusal is the error getaddrinfo gives for a name it does not know, so aiohttp treats it as one.
            assert caught.value.os_error.errno == socket.EAI_NONAME
        assert server.hits["image"] == 2

    with_server(scenario)


@pytest.mark.parametrize(("pinned", "asked"), [
    ("\u017f.example", "s.example"),  # LONG S: upper-cased it would be the S of s.example
    ("images.exampleX", "images.example"),  # only a trailing dot is folded away, never a letter
])
def test_a_pin_opens_only_its_own_name(pinned: str, asked: str) -> None:
    async def scenario(server: Server) -> None:
        async with aiohttp.ClientSession(connector=pinned_connector({pinned: ["127.0.0.1"]})) as session:
            with pytest.raises(aiohttp.ClientConnectorError, match="not pinned"):
                await session.get(server.url("/img.png", host=asked))
        assert server.hits == {}

    with_server(scenario)


def test_the_pinned_connector_tries_the_checked_addresses_in_their_order_every_time() -> None:
    # The order is the resolver's preference; aiohttp's DNS cache would rotate it from one connection to the next.
    async def main() -> list[str]:
        seen: list[str] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append(request.transport.get_extra_info("sockname")[0] if request.transport else "?")
            response = web.Response(text="ok")
            response.force_close()  # a new connection, so a new choice of address, for every request
            return response

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            try:
                await web.TCPSite(runner, "127.0.0.2", port).start()
            except OSError as exc:
                pytest.skip(f"127.0.0.2 cannot be listened on here: {exc}")
            pinned = pinned_connector({"images.example": ["127.0.0.1", "127.0.0.2"]})
            async with aiohttp.ClientSession(connector=pinned) as session:
                for _ in range(3):
                    async with session.get(f"http://images.example:{port}/") as response:
                        assert await response.text() == "ok"
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(main()) == ["127.0.0.1"] * 3


def test_the_pinned_resolver_answers_as_aiohttp_resolvers_do() -> None:
    # aiohttp before 3.10 (pyproject allows 3.9) opens the socket with each answer's family, proto and flags and
    # checks the certificate against its hostname; later versions use host and port. Both get what they expect.
    v4, v6 = PUBLIC, "2606:4700:4700::1111"
    numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

    def answer(address: str, family: socket.AddressFamily, port: int = 8443) -> ResolveResult:
        return ResolveResult(hostname="Images.Example.", host=address, port=port, family=family, proto=0,
                             flags=numeric)

    async def main() -> None:
        resolver = _PinnedResolver({"images.example": [v6, v4]})
        assert await resolver.resolve("Images.Example.", 8443, socket.AF_UNSPEC) == [
            answer(v6, socket.AF_INET6), answer(v4, socket.AF_INET)]
        assert await resolver.resolve("Images.Example.", 8443, socket.AF_INET) == [answer(v4, socket.AF_INET)]
        assert await resolver.resolve("Images.Example.", 8443, socket.AF_INET6) == [answer(v6, socket.AF_INET6)]
        assert await resolver.resolve("Images.Example.") == [answer(v4, socket.AF_INET, port=0)]  # the ABC's defaults
        with pytest.raises(OSError, match="no pinned address of the requested family"):
            await _PinnedResolver({"images.example": [v4]}).resolve("images.example", 80, socket.AF_INET6)

    asyncio.run(main())


def test_a_connection_error_is_a_remote_image_error_with_its_reason() -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_image_bytes(server.url("/img.png"), resolver=resolver_for_tests(),
                                    connector_factory=lambda pinned: pinned_connector({"elsewhere.example": [PUBLIC]}))
        return str(caught.value)

    message = with_server(scenario)
    assert "image_url host 'images.example' could not be fetched" in message and "not pinned" in message
