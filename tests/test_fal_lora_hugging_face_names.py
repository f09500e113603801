"""fal_api.lora_input.huggingface_url without the network: a Hugging Face name (owner/repo[/file.safetensors]) -> the
download URL of the repository's LoRA file, as huggingface_hub's own hf_hub_url builds it (the oracle); a repository
named without its file is listed (huggingface_hub.list_repo_files, replaced here by a table) and its one
.safetensors file, or its one diffusers-named pytorch_lora_weights.safetensors, taken; anything else is a ValueError
that says what to name."""
from __future__ import annotations

import asyncio
import sys

import pytest

from comfyui_krea.fal_api.lora_input import huggingface_url

huggingface_hub = pytest.importorskip("huggingface_hub", reason="the Hugging Face names need huggingface_hub")

REPOSITORIES = {
    "someone/one-file": ["README.md", "config.json", "style.safetensors"],
    "someone/diffusers": ["README.md", "style_v1.safetensors", "unet/old/pytorch_lora_weights.safetensors"],
    "someone/several": ["a.safetensors", "b/c.safetensors", "pytorch_lora_weights.bin"],
    "someone/none": ["README.md", "lora.SAFETENSORS.zip"],
}


@pytest.fixture
def listed(monkeypatch) -> list[str]:
    """huggingface_hub.list_repo_files answering from REPOSITORIES (an unknown one fails as offline hubs do); the
    repositories it was asked for."""
    asked: list[str] = []

    def list_repo_files(repo_id: str) -> list[str]:
        asked.append(repo_id)
        if repo_id not in REPOSITORIES:
            raise OSError(f"cannot reach the hub for {repo_id}")
        return list(REPOSITORIES[repo_id])

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return asked


def url_of(name: str) -> str:
    return asyncio.run(huggingface_url(name))


def test_a_name_with_its_file_is_that_files_url_without_listing_the_repository(listed):
    assert url_of("someone/styles/sub/dir/style.safetensors") == huggingface_hub.hf_hub_url(
        "someone/styles", "sub/dir/style.safetensors")
    assert listed == []


@pytest.mark.parametrize("repo, file", [("someone/one-file", "style.safetensors"),
                                        ("someone/diffusers", "unet/old/pytorch_lora_weights.safetensors")])
def test_a_repository_name_is_its_one_lora_file(listed, repo, file):
    assert url_of(repo) == huggingface_hub.hf_hub_url(repo, file)
    assert listed == [repo]


@pytest.mark.parametrize("repo, says", [
    ("someone/several", "has 2 .safetensors files (a.safetensors, b/c.safetensors)"),
    ("someone/none", "has 0 .safetensors files"), ("someone/offline", "could not be read: OSError")])
def test_a_repository_without_one_lora_file_is_refused_saying_what_to_name(listed, repo, says):
    with pytest.raises(ValueError) as refused:
        url_of(repo)
    assert says in str(refused.value)


def test_without_huggingface_hub_a_name_is_refused_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as where it is not installed
    with pytest.raises(ValueError) as refused:
        url_of("someone/one-file")
    assert "comfyui-krea[hf]" in str(refused.value)
