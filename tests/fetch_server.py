"""The image server the remote-fetch tests fetch from (tests/test_fal_remote_fetch.py, tests/test_fal_fetch_to_file.py):
an aiohttp server on 127.0.0.1 with one route per behaviour, and a connector factory that pins every host the guard
approved to it, recording each hop."""
from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
from aiohttp import web
from PIL import Image

from comfyui_krea.fal_api.remote_fetch import Resolver, pinned_connector, refused_address
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
        n = int(request.query["n"])
        body = (bytes(range(256)) * (n // 256 + 1))[:n] if "pattern" in request.query else b"\x89" * n
        return web.Response(body=body, content_type="image/png")

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
        n = int(request.query.get("n", "0"))  # a body of n bytes, else a short text
        return web.Response(status=int(request.match_info["code"]), body=b"\x89" * n if n else b"nope")

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


def resolver_for_tests() -> Resolver:
    """images.example is public (and then pinned to the test server); evil.example is private."""
    return fake_resolver({"images.example": [PUBLIC], "evil.example": ["10.0.0.7"]})
