"""fal_api.remote_fetch.fetch_to_file, how a LoRA URL is downloaded: the body goes to a new file under the same
guard, redirects and limits as an image_url, the sha256 that comes back is the file's, an existing file is never
written over, and a body over the limit or too slow stops with the reason (the caller removes the partial file).

Like tests/test_fal_remote_fetch.py, nothing here connects anywhere but the test's own 127.0.0.1 server.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import aiohttp
import pytest

from comfyui_krea.fal_api.remote_fetch import FetchLimits, RemoteImageError, fetch_to_file
from fake_dns import PUBLIC
from fetch_server import PNG, Server, ToTestServer, resolver_for_tests, with_server

BODY = (bytes(range(256)) * 1200)[:307200]  # what /sized?n=307200&pattern=1 sends: several 64 KiB reads


def test_the_body_is_written_to_the_file_and_its_sha256_returned(tmp_path: Path) -> None:
    destination = tmp_path / "lora.safetensors"
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        return await fetch_to_file(server.url("/sized?n=307200&pattern=1"), destination,
                                   resolver=resolver_for_tests(), connector_factory=factory)

    assert with_server(scenario) == hashlib.sha256(BODY).hexdigest()
    assert destination.read_bytes() == BODY
    assert factory.calls == [{"images.example": [PUBLIC]}]


def test_redirects_are_followed_to_the_file(tmp_path: Path) -> None:
    destination = tmp_path / "lora.safetensors"
    factory = ToTestServer()

    async def scenario(server: Server) -> str:
        return await fetch_to_file(server.url("/hop/2"), destination, resolver=resolver_for_tests(),
                                   connector_factory=factory)

    assert with_server(scenario) == hashlib.sha256(PNG).hexdigest()
    assert destination.read_bytes() == PNG
    assert len(factory.calls) == 3


def test_an_existing_file_is_never_written_over(tmp_path: Path) -> None:
    destination = tmp_path / "lora.safetensors"
    destination.write_bytes(b"the user's own file")

    async def scenario(server: Server) -> None:
        with pytest.raises(FileExistsError):
            await fetch_to_file(server.url("/img.png"), destination, resolver=resolver_for_tests(),
                                connector_factory=ToTestServer())

    with_server(scenario)
    assert destination.read_bytes() == b"the user's own file"


def test_a_refused_host_creates_no_file(tmp_path: Path) -> None:
    destination = tmp_path / "lora.safetensors"

    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_to_file("http://evil.example/lora.safetensors", destination, resolver=resolver_for_tests(),
                                connector_factory=ToTestServer())
        return str(caught.value)

    assert "resolves to 10.0.0.7, a private address" in with_server(scenario)
    assert not destination.exists()


def test_a_body_over_the_limit_stops_the_file_at_the_limit(tmp_path: Path) -> None:
    destination = tmp_path / "lora.safetensors"

    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_to_file(server.url("/chunked?n=1048576"), destination, resolver=resolver_for_tests(),
                                connector_factory=ToTestServer(), limits=FetchLimits(max_bytes=100 * 1024))
        return str(caught.value)

    assert with_server(scenario) == "image_url host 'images.example' sent more than the 102400 bytes allowed"
    assert destination.stat().st_size <= 100 * 1024  # never more than allowed on disk; the caller removes it


def test_a_slow_server_times_out(tmp_path: Path) -> None:
    async def scenario(server: Server) -> str:
        with pytest.raises(RemoteImageError) as caught:
            await fetch_to_file(server.url("/slow"), tmp_path / "lora.safetensors", resolver=resolver_for_tests(),
                                connector_factory=ToTestServer(), limits=FetchLimits(timeout_s=0.3))
        return str(caught.value)

    start = time.monotonic()
    assert with_server(scenario) == "image_url fetch timed out after 0.3 s"
    assert time.monotonic() - start < 3


def test_a_download_may_take_longer_than_aiohttps_default_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    # LoRAs get 600 s, past aiohttp's default of 5 minutes a session would otherwise impose. That default is
    # shortened here to 0.2 s, so that a body taking 0.5 s stands for one taking 6 minutes.
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=0.2))
    destination = tmp_path / "lora.safetensors"

    async def scenario(server: Server) -> str:
        asyncio.get_running_loop().call_later(0.5, server.release.set)
        return await fetch_to_file(server.url("/slow"), destination, resolver=resolver_for_tests(),
                                   connector_factory=ToTestServer(), limits=FetchLimits(timeout_s=5))

    assert with_server(scenario) == hashlib.sha256(PNG).hexdigest()
