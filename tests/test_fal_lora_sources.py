"""fal_api.lora_input without a server: remote LoRAs off by default (a URL or a Hugging Face name is a 422 saying how
to allow them), a Hugging Face name resolved to its file's URL and cached like a URL, a cache entry found again by its
URL without a fetch, a failed fetch leaving nothing in the folder."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import pytest

from comfyui_krea.fal_api.lora_input import CACHE_FOLDER, LoraSources
from comfyui_krea.fal_api.remote_fetch import RemoteImageError
from comfyui_krea.fal_api.schema import InputError, LoraWeight
from comfyui_krea.model_loader.flux import FluxConfig
from conftest import TINY_FLUX
from lora_files import write_lora

CONFIG: FluxConfig = dataclasses.replace(TINY_FLUX, depth=2, depth_single_blocks=3)


def sources(folder: Path, allow_remote: bool, fetch=None, hf=None) -> LoraSources:
    def model_file(name: str) -> Path | None:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"the model name {name!r} leaves the model folder")
        path = folder / name
        return path if path.is_file() else None

    extra = {k: v for k, v in (("fetch", fetch), ("hf_resolve", hf)) if v is not None}
    return LoraSources(folder, model_file, allow_remote=allow_remote, **extra)


def resolve(source: LoraSources, path: str):
    return asyncio.run(source.resolve([LoraWeight(path=path, scale=0.5)], CONFIG))


@pytest.mark.parametrize("path", ["https://example.com/style.safetensors", "someone/flux-style"])
def test_remote_loras_are_off_by_default(tmp_path, path):
    with pytest.raises(InputError) as caught:
        resolve(sources(tmp_path, allow_remote=False), path)
    assert caught.value.detail[0]["loc"] == ["body", "loras", 0, "path"]
    assert "--allow-remote-loras" in caught.value.detail[0]["msg"]


def test_a_hugging_face_name_is_fetched_from_the_url_huggingface_hub_gives_and_cached(tmp_path):
    source_file = write_lora(tmp_path / "upstream.safetensors", CONFIG, "kohya", seed=1)
    fetched, named = [], []

    async def fetch(url: str, destination: Path) -> str:
        fetched.append(url)
        destination.write_bytes(source_file.read_bytes())
        return hashlib.sha256(destination.read_bytes()).hexdigest()

    async def hf(name: str) -> str:
        named.append(name)
        return f"https://huggingface.co/{name}/resolve/main/lora.safetensors"

    loras = tmp_path / "loras"
    loras.mkdir()
    source = sources(loras, allow_remote=True, fetch=fetch, hf=hf)
    first = resolve(source, "someone/flux-style")
    again = resolve(source, "someone/flux-style")
    assert first == again and first[0][0].startswith(f"{CACHE_FOLDER}/") and first[0][1] == 0.5
    assert named == ["someone/flux-style"] * 2 and len(fetched) == 1  # named each time, fetched once
    assert [p.name for p in (loras / CACHE_FOLDER).iterdir() if p.is_file()] == [first[0][0].split("/")[1]]


def test_a_failed_fetch_leaves_nothing_behind(tmp_path):
    async def fetch(url: str, destination: Path) -> str:
        destination.write_bytes(b"partial")
        raise RemoteImageError("image_url host 'x' sent more than the 10 bytes allowed")

    with pytest.raises(InputError) as caught:
        resolve(sources(tmp_path, allow_remote=True, fetch=fetch), "https://x.example/a.safetensors")
    assert "the LoRA URL host" in caught.value.detail[0]["msg"]
    assert [p for p in (tmp_path / CACHE_FOLDER).rglob("*") if p.is_file()] == []
