"""The preview images of a streamed fal request under `serve` (standalone/previews.py): decoded by the workflow's own
VAE (a random-weight TINY_AUTOENCODER file here) from the sampler's x0, the first image of the batch, averaged down
to at most PREVIEW_LATENT_SIDE latent pixels on its longest side, and skipped while previews would take more than
PREVIEW_SHARE of the time."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.nodes.host import VaeHandle
from comfyui_krea.sampling.latents import to_raw
from comfyui_krea.standalone import previews
from comfyui_krea.standalone.previews import PREVIEW_LATENT_SIDE, preview_maker
from conftest import TINY_AUTOENCODER, fake_clock

LOADER = {"class_type": "KreaModelLoader", "inputs": {"model_name": "flux1-krea-dev.safetensors",
                                                      "vae_name": "ae.safetensors"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder with vae/ae.safetensors."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "vae").mkdir()
    write_random_autoencoder_checkpoint(folder / "vae" / "ae.safetensors", TINY_AUTOENCODER, seed=3)
    return folder


@pytest.fixture
def decoded(host_state, models, monkeypatch) -> list[tuple[VaeHandle, torch.Tensor, torch.Tensor]]:
    """The host on `models`; each decode the previews make, as (the VAE, the raw latents, the IMAGE made)."""
    host_state.configure(models_dir=models)
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Recording(VaeHandle):
        def decode(self, latents, progress, interrupt=None):
            pixels = super().decode(latents, progress, interrupt)
            seen.append((VaeHandle(self.path, self.device), latents.clone(), pixels.clone()))
            return pixels

    monkeypatch.setattr(previews, "VaeHandle", Recording)
    return seen


def block_means(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(..., h, w) -> the mean of each factor x factor block, the last row and column of blocks cut by the edge."""
    rows = torch.stack([x[..., i:i + factor, :].mean(-2) for i in range(0, x.shape[-2], factor)], -2)
    return torch.stack([rows[..., j:j + factor].mean(-1) for j in range(0, rows.shape[-1], factor)], -1)


@pytest.mark.parametrize("h, w, factor", [(130, 2, 3), (100, 2, 2)])
def test_a_preview_is_the_first_image_decoded_from_x0_averaged_to_at_most_64_latent_pixels(decoded, host_state, h,
                                                                                           w, factor):
    preview = preview_maker({"9": {"class_type": "KreaSampler", "inputs": {"vae_name": "other.safetensors"}},
                             "1": LOADER})
    x0 = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1))
    image = preview(x0)
    expected = to_raw(block_means(x0[:1], factor))
    ((vae, latents, pixels),) = decoded
    assert vae == VaeHandle(host_state.model_path("vae", "ae.safetensors"), host_state.torch_device())
    assert latents.shape == expected.shape and max(latents.shape[-2:]) <= PREVIEW_LATENT_SIDE
    torch.testing.assert_close(latents, expected)
    assert image.size == (8 * expected.shape[-1], 8 * expected.shape[-2]) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), (pixels[0] * 255).round().to(torch.uint8).numpy())


def test_previews_are_skipped_while_they_would_take_over_a_fifth_of_the_time(decoded, monkeypatch):
    # perf_counter's readings, per decoded preview: its start, its end (twice); per skipped one: its start.
    monkeypatch.setattr(previews, "time", fake_clock(0.5, 1.5, 1.5,  # a preview taking 1 s: the next after 5 s
                                                     6.4,  # 4.9 s later: skipped
                                                     6.5, 7.0, 7.0,  # 5 s: made, taking 0.5 s
                                                     9.4,  # 2.4 s: skipped
                                                     9.5, 10.0, 10.0))  # 2.5 s: made
    preview = preview_maker({"1": LOADER})
    x0 = torch.zeros(1, 16, 2, 2)
    made = [preview(x0) is not None for _ in range(5)]
    assert made == [True, False, True, False, True] and len(decoded) == 3


@pytest.mark.parametrize("prompt", [
    {},
    {"1": {"class_type": "KreaSampler", "inputs": {"vae_name": "ae.safetensors"}}},
    {"1": {**LOADER, "inputs": {"vae_name": ["7", 0]}}},  # from another node: not a file name
    {"1": {"class_type": "KreaModelLoader"}},
], ids=["empty", "no loader", "a linked name", "no inputs"])
def test_no_previews_without_the_loaders_vae_file_name(decoded, prompt):
    assert preview_maker(prompt) is None
