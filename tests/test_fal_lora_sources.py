"""fal_api.lora_input without a server: remote LoRAs off by default (a URL or a Hugging Face name is a 422 saying how
to allow them), every refusal a value_error on its own LoRA's path that names the LoRA as given, never the server's
folder; a name in the loras folder taken before it is read as a Hugging Face name; a LoRA checked against the base's
widths (only its header without a base); a Hugging Face name resolved to its file's URL and cached like a URL; the
cache (by the URL's sha256, across runs) found again without a fetch, refetched when its file is gone, one fetch per
URL however many ask at once; a failed fetch leaving nothing in the folder."""
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


def refusal(source: LoraSources, paths: list[str], base: FluxConfig | None = CONFIG) -> dict:
    """The one problem of the 422 that resolving `paths` ends in."""
    with pytest.raises(InputError) as caught:
        asyncio.run(source.resolve([LoraWeight(path=p, scale=1.0) for p in paths], base))
    [problem] = caught.value.detail
    return problem


def serving_file(data: bytes, fetched: list[str]):
    """A fetch (url, new file) -> sha256 that 'downloads' `data` from any URL, recording each URL."""

    async def fetch(url: str, destination: Path) -> str:
        fetched.append(url)
        await asyncio.sleep(0)  # lets a second request for the same URL arrive meanwhile
        destination.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    return fetch


@pytest.mark.parametrize("path, what", [("https://example.com/style.safetensors", "not URLs"),
                                        ("someone/flux-style", "not Hugging Face names")])
def test_a_refused_lora_is_a_value_error_on_its_path_naming_what_was_refused(tmp_path, path, what):
    problem = refusal(sources(tmp_path, allow_remote=False), [path])
    assert {k: problem[k] for k in ("type", "loc", "input")} == {"type": "value_error",
                                                                  "loc": ["body", "loras", 0, "path"], "input": path}
    assert what in problem["msg"]


def test_lora_files_in_the_folder_are_taken_even_where_they_look_like_hugging_face_names(tmp_path):
    write_lora(tmp_path / "krea" / "style.safetensors", CONFIG, "kohya")
    source = sources(tmp_path, allow_remote=False)
    assert asyncio.run(source.resolve([LoraWeight(path="krea/style.safetensors", scale=0.7)], CONFIG)) == [
        ("krea/style.safetensors", 0.7)]


def test_a_lora_of_other_widths_is_refused_against_the_base_and_only_its_header_is_checked_without_one(tmp_path):
    write_lora(tmp_path / "wide.safetensors", dataclasses.replace(CONFIG, hidden_size=64, num_heads=4), "kohya")
    source = sources(tmp_path, allow_remote=False)
    assert refusal(source, ["wide.safetensors"])["loc"] == ["body", "loras", 0, "path"]
    assert asyncio.run(source.resolve([LoraWeight(path="wide.safetensors", scale=1.0)], None)) == [
        ("wide.safetensors", 1.0)]


def test_a_damaged_lora_is_refused_by_the_name_the_client_gave_never_the_servers_folder(tmp_path):
    name = "d" * 220 + ".safetensors"  # longer than the 200 characters a refusal shows
    (tmp_path / name).write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle
    problem = refusal(sources(tmp_path, allow_remote=False), [name])
    assert str(tmp_path) not in problem["msg"] and repr(name[:200]) in problem["msg"]
    assert repr(name[:201]) not in problem["msg"]


def test_a_missing_name_is_asked_of_hugging_face_only_when_it_is_a_repository_name(tmp_path):
    def model_file(name: str) -> Path | None:  # refuses only names that leave the folder, as ModelFile says
        path = (tmp_path / name).resolve()
        if not path.is_relative_to(tmp_path.resolve()):
            raise ValueError(f"the model name {name!r} leaves the model folder")
        return path if path.is_file() else None

    asked = []

    async def hf(name: str) -> str:
        asked.append(name)
        raise ValueError("no such repository")

    source = LoraSources(tmp_path, model_file, allow_remote=True, hf_resolve=hf)
    for name in ["missing.safetensors", "someone/../missing.safetensors"]:
        assert "no LoRA named" in refusal(source, [name])["msg"]
    assert asked == []
    assert refusal(source, ["someone/flux-style"])["msg"] == "no such repository" and asked == ["someone/flux-style"]


@pytest.mark.parametrize("url", ["http://x.example/a.safetensors", "HTTPS://x.example/a.safetensors",
                                 "https://x.example/get?from=https://y.example/a.safetensors"])
def test_http_and_https_urls_are_fetched_as_given(tmp_path, url):
    lora = write_lora(tmp_path / "upstream.safetensors", CONFIG, "kohya").read_bytes()
    fetched: list[str] = []
    loras = tmp_path / "loras"
    [(name, _)] = resolve(sources(loras, allow_remote=True, fetch=serving_file(lora, fetched)), url)
    assert fetched == [url] and name == f"{CACHE_FOLDER}/{hashlib.sha256(lora).hexdigest()}.safetensors"
    assert (loras / name).read_bytes() == lora


def test_a_refused_fetch_is_located_on_its_own_lora(tmp_path):
    write_lora(tmp_path / "style.safetensors", CONFIG, "kohya")

    async def fetch(url: str, destination: Path) -> str:
        destination.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle: refused once fetched
        return hashlib.sha256(destination.read_bytes()).hexdigest()

    async def hf(name: str) -> str:
        return "https://huggingface.co/someone/flux-style/resolve/main/lora.safetensors"

    source = sources(tmp_path, allow_remote=True, fetch=fetch, hf=hf)
    for remote in ["https://x.example/a.safetensors", "someone/flux-style"]:
        assert refusal(source, ["style.safetensors", remote])["loc"] == ["body", "loras", 1, "path"]
    assert [p for p in (tmp_path / CACHE_FOLDER).rglob("*") if p.is_file()] == []


def test_the_cache_of_an_earlier_run_is_found_by_the_sha256_of_the_url(tmp_path):
    lora = write_lora(tmp_path / "style.safetensors", CONFIG, "kohya").read_bytes()
    url = "https://x.example/style-é.safetensors"
    digest = hashlib.sha256(lora).hexdigest()
    (tmp_path / CACHE_FOLDER / "urls").mkdir(parents=True)
    (tmp_path / CACHE_FOLDER / f"{digest}.safetensors").write_bytes(lora)
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()
    (tmp_path / CACHE_FOLDER / "urls" / url_hash).write_text(digest + "\n")
    fetched: list[str] = []
    source = sources(tmp_path, allow_remote=True, fetch=serving_file(lora, fetched))
    assert resolve(source, url) == [(f"{CACHE_FOLDER}/{digest}.safetensors", 0.5)] and fetched == []


def test_a_cache_entry_whose_file_is_gone_is_fetched_again(tmp_path):
    lora = write_lora(tmp_path / "upstream.safetensors", CONFIG, "kohya").read_bytes()
    fetched: list[str] = []
    loras = tmp_path / "loras"
    source = sources(loras, allow_remote=True, fetch=serving_file(lora, fetched))
    [(name, _)] = resolve(source, "https://x.example/a.safetensors")
    (loras / name).unlink()
    assert resolve(source, "https://x.example/a.safetensors") == [(name, 0.5)] and len(fetched) == 2
    assert (loras / name).read_bytes() == lora


def test_urls_asked_for_at_once_are_fetched_once_each_and_cached_ones_do_not_wait(tmp_path):
    lora = write_lora(tmp_path / "upstream.safetensors", CONFIG, "kohya").read_bytes()
    fetched: list[str] = []
    plain = serving_file(lora, fetched)
    held = asyncio.Event()

    async def fetch(url: str, destination: Path) -> str:
        if "slow" in url:
            await held.wait()
        return await plain(url, destination)

    source = sources(tmp_path, allow_remote=True, fetch=fetch)

    async def scenario() -> None:
        one = [LoraWeight(path="https://x.example/a.safetensors", scale=1.0)]
        first, second = await asyncio.gather(source.resolve(one, CONFIG), source.resolve(one, CONFIG))
        assert first == second and fetched == ["https://x.example/a.safetensors"]
        other = await source.resolve([LoraWeight(path="https://x.example/b.safetensors", scale=1.0)], CONFIG)
        assert other == first and len(fetched) == 2  # a second URL: the URL folder exists already
        slow = asyncio.create_task(source.resolve([LoraWeight(path="https://x.example/slow", scale=1.0)], CONFIG))
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(source.resolve(one, CONFIG), 1.0) == first  # not behind the slow download
        held.set()
        assert await slow == first

    asyncio.run(scenario())
