"""fal_api.lora_input, what LoRAs are checked against and how they are fetched: the base transformer is the one the
workflow's Krea Model Loader names in diffusion_models (its config read from the file's header; None where it is
not known here), and a LoRA URL is fetched through the address guard under the LoRA limits (settings.MAX_LORA_MB,
settings.LORA_FETCH_TIMEOUT_S), not the smaller ones of input images.

The fetches reach only a 127.0.0.1 server the test starts: `loras.example` resolves (fake resolver) to a public
address the guard approves, then is pinned to that server."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfyui_krea.fal_api import lora_input, remote_fetch
from comfyui_krea.fal_api.lora_input import CACHE_FOLDER, LoraSources, base_config
from comfyui_krea.fal_api.schema import InputError, LoraWeight
from comfyui_krea.fal_api.settings import MAX_LORA_MB
from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint
from conftest import TINY_FLUX
from fake_dns import PUBLIC, fake_resolver
from lora_files import write_lora

CONFIG: FluxConfig = dataclasses.replace(TINY_FLUX, depth=2, depth_single_blocks=3)


def model_files(root: Path):
    """(folder, name) -> the file under root/folder (None: none); ValueError for a name that leaves it."""

    def model_file(folder: str, name: str) -> Path | None:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"the model name {name!r} leaves the model folder")
        path = root / folder / name
        return path if path.is_file() else None

    return model_file


def test_the_base_is_the_transformer_the_krea_model_loader_names(tmp_path):
    write_random_flux_checkpoint(tmp_path / "diffusion_models" / "krea.safetensors", CONFIG)
    prompt = {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "krea.safetensors"}},
              "2": {"class_type": "KreaSampler", "inputs": {"seed": 1}},
              "3": {"class_type": "KreaModelLoader", "inputs": {"model_name": "krea.safetensors"}}}
    assert base_config(prompt, model_files(tmp_path)) == CONFIG
    prompt["1"]["inputs"]["model_name"] = "other.safetensors"  # only the Krea Model Loader's name counts
    assert base_config(prompt, model_files(tmp_path)) == CONFIG


@pytest.mark.parametrize("loader", [{"inputs": {"model_name": "missing.safetensors"}},
                                    {"inputs": {"model_name": "../krea.safetensors"}},
                                    {"inputs": {"model_name": "damaged.safetensors"}},
                                    {"inputs": {"model_name": ["4", 0]}}, {}])
def test_a_base_that_cannot_be_read_here_is_unknown(tmp_path, loader):
    write_random_flux_checkpoint(tmp_path / "diffusion_models" / "krea.safetensors", CONFIG)
    (tmp_path / "diffusion_models" / "damaged.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    prompt = {"1": {"class_type": "KreaModelLoader", **loader}}
    assert base_config(prompt, model_files(tmp_path)) is None


@contextlib.asynccontextmanager
async def lora_host(lora: bytes) -> AsyncIterator[int]:
    """A raw HTTP server on 127.0.0.1 (its port): /lora sends `lora`; /huge declares one byte more than MAX_LORA_MB
    MiB and sends none; /slow answers after a second."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = (await reader.readline()).split()[1].decode()
        while (await reader.readline()).strip():
            pass
        if path == "/slow":
            await asyncio.sleep(1.0)
        body = lora if path != "/huge" else b""
        length = len(body) if path != "/huge" else MAX_LORA_MB * 1024 * 1024 + 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % length + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
def to_lora_host(monkeypatch) -> None:
    """lora_input's fetches resolve loras.example to a public address, then connect to 127.0.0.1 instead; what
    lora_input hands fetch_to_file (URL, file, limits) is used as it is."""
    real = remote_fetch.fetch_to_file

    async def fetch_to_file(*args, **kwargs) -> str:
        return await real(*args, **kwargs, resolver=fake_resolver({"loras.example": [PUBLIC]}),
                          connector_factory=lambda pinned: remote_fetch.pinned_connector(
                              {host: ["127.0.0.1"] for host in pinned}))

    monkeypatch.setattr(lora_input, "fetch_to_file", fetch_to_file)


def fetched(tmp_path: Path, lora: bytes, path: str) -> list[tuple[str, float]]:
    def model_file(name: str) -> Path | None:
        return tmp_path / name if (tmp_path / name).is_file() else None

    async def scenario() -> list[tuple[str, float]]:
        async with lora_host(lora) as port:
            source = LoraSources(tmp_path, model_file, allow_remote=True)  # the default, guarded fetch
            return await source.resolve([LoraWeight(path=f"http://loras.example:{port}{path}", scale=1.0)], CONFIG)

    return asyncio.run(scenario())


def test_a_lora_url_is_fetched_through_the_guard_into_the_cache(tmp_path, to_lora_host):
    lora = write_lora(tmp_path / "upstream.safetensors", CONFIG, "kohya").read_bytes()
    name = f"{CACHE_FOLDER}/{hashlib.sha256(lora).hexdigest()}.safetensors"
    assert fetched(tmp_path, lora, "/lora") == [(name, 1.0)]
    assert (tmp_path / name).read_bytes() == lora


def test_a_lora_url_over_the_lora_size_limit_is_refused_by_its_content_length(tmp_path, to_lora_host):
    with pytest.raises(InputError) as refused:
        fetched(tmp_path, b"", "/huge")
    assert f"more than the {MAX_LORA_MB * 1024 * 1024} allowed" in refused.value.detail[0]["msg"]


def test_a_lora_url_slower_than_the_lora_time_limit_is_refused(tmp_path, to_lora_host, monkeypatch):
    monkeypatch.setattr(lora_input, "LORA_FETCH_TIMEOUT_S", 0.2)  # the setting, made short
    with pytest.raises(InputError) as refused:
        fetched(tmp_path, b"", "/slow")
    assert "timed out after 0.2 s" in refused.value.detail[0]["msg"]
