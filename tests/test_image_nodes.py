"""KreaEncodeImage and KreaDecode (and the registration of the three image nodes): shapes, the resize (PIL's
antialiased bicubic, clamped), errors, and a cancel that stops a tiled pass between tiles."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.nodes.host import Interrupted, VaeHandle
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage, KreaSaveImage
from conftest import TINY_AUTOENCODER


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> VaeHandle:
    path = write_random_autoencoder_checkpoint(tmp_path_factory.mktemp("vae") / "ae.safetensors", TINY_AUTOENCODER)
    return VaeHandle(path, torch.device("cpu"))


def test_registered_under_krea_image():
    for node_id, name in (("KreaEncodeImage", "Krea Encode Image"), ("KreaDecode", "Krea Decode"),
                          ("KreaSaveImage", "Krea Save Image")):
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        assert cls.CATEGORY == "Krea/image" and cls.DESCRIPTION
        assert hasattr(cls, cls.FUNCTION)
    assert KreaSaveImage.OUTPUT_NODE is True
    hidden = KreaSaveImage.INPUT_TYPES()["hidden"]
    assert hidden == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    required = KreaSaveImage.INPUT_TYPES()["required"]
    assert required["output_format"][0] == ["jpeg", "png", "webp"]
    assert required["output_format"][1]["default"] == "jpeg"
    assert required["filename_prefix"][1]["default"] == "krea/krea"
    assert (required["quality"][1]["min"], required["quality"][1]["max"], required["quality"][1]["default"]) \
        == (1, 100, 95)


def test_encode_then_decode_shapes(vae):
    image = torch.rand(2, 48, 64, 3)
    (latent,) = KreaEncodeImage().encode(vae, image)
    assert latent["samples"].shape == (2, 16, 6, 8) and latent["samples"].dtype == torch.float32
    (decoded,) = KreaDecode().decode(vae, latent)
    assert decoded.shape == (2, 48, 64, 3) and decoded.dtype == torch.float32
    assert decoded.device.type == "cpu"
    assert decoded.min() >= 0 and decoded.max() <= 1 and decoded.std() > 0


def test_encode_matches_the_autoencoder_on_minus_one_to_one(vae):
    image = torch.rand(1, 32, 32, 3)
    (latent,) = KreaEncodeImage().encode(vae, image)
    expected = vae.load().encode(image.permute(0, 3, 1, 2) * 2 - 1)
    assert torch.equal(latent["samples"], expected)


def test_encode_resizes_to_multiples_of_16(vae, caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_krea.nodes.image"):
        (latent,) = KreaEncodeImage().encode(vae, torch.rand(1, 40, 57, 3))
    assert latent["samples"].shape == (1, 16, 48 // 8, 64 // 8)  # 40 -> 48, 57 -> 64
    assert "resizing 57x40 to 64x48" in caplog.text
    (latent,) = KreaEncodeImage().encode(vae, torch.rand(1, 7, 16, 3))
    assert latent["samples"].shape == (1, 16, 2, 2)  # never below 16


def test_encode_drops_alpha(vae):
    rgb = torch.rand(1, 32, 32, 3)
    rgba = torch.cat([rgb, torch.rand(1, 32, 32, 1)], dim=-1)
    assert torch.equal(KreaEncodeImage().encode(vae, rgba)[0]["samples"],
                       KreaEncodeImage().encode(vae, rgb)[0]["samples"])


@pytest.mark.parametrize("image, message", [
    (torch.rand(1, 32, 32, 1), "grayscale"),
    (torch.rand(32, 32, 3), "without a batch dimension"),
    (torch.rand(1, 3, 32, 32), "channels-first"),
    (torch.rand(2, 1, 32, 32, 3), "4 dimensions"),
    (torch.rand(0, 32, 32, 3), "empty"),
    ([[0.0]], "must be an IMAGE"),
])
def test_wrong_images_are_refused(vae, image, message):
    with pytest.raises(ValueError, match=message):
        KreaEncodeImage().encode(vae, image)


@pytest.mark.parametrize("samples, message", [
    ({"samples": torch.zeros(1, 4, 8, 8)}, "4 channels .a Stable Diffusion"),
    ({"samples": torch.zeros(1, 16, 2, 8, 8)}, "Video"),
    (torch.zeros(1, 16, 8, 8), "must be a LATENT"),
    ({}, "must be a LATENT"),
])
def test_decode_refuses_other_latents(vae, samples, message):
    with pytest.raises(ValueError, match=message):
        KreaDecode().decode(vae, samples)


# ------------------------------------------------------------------------------------------------- the resize

def _pil_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's antialiased bicubic resize of a (H, W, 3) float image, channel by channel in float: an independent
    implementation of the resize KreaEncodeImage documents (bicubic, antialiased, clamped to 0..1)."""
    channels = [np.asarray(Image.fromarray(image[..., c].numpy(), mode="F").resize((width, height),
                                                                                    Image.Resampling.BICUBIC))
                for c in range(3)]
    return torch.from_numpy(np.stack(channels, -1)).clamp(0.0, 1.0)


def test_encode_resizes_as_an_antialiased_bicubic_clamped_to_zero_one(vae, monkeypatch):
    # A 100x100 checkerboard of 0/1 (sharp edges: bicubic overshoots, antialiasing matters) -> 96x96.
    board = ((torch.arange(100)[:, None] // 3 + torch.arange(100)[None, :] // 3) % 2).float()
    image = board[..., None].expand(100, 100, 3).contiguous()
    model = vae.load()
    seen = []
    monkeypatch.setattr(model, "encode", lambda pixels, **kw: seen.append(pixels) or torch.zeros(1, 16, 12, 12))
    KreaEncodeImage().encode(vae, image[None])
    (pixels,) = seen  # what the autoencoder was given, in [-1, 1]
    resized = ((pixels[0] + 1) / 2).permute(1, 2, 0)
    assert resized.shape == (96, 96, 3)
    # measured 7e-6 (float rounding); without antialiasing 0.04, with aligned corners 0.05, unclamped 0.15
    assert (resized - _pil_bicubic(image, 96, 96)).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------- cancel

@pytest.mark.parametrize("node", ["encode", "decode"])
def test_cancel_stops_a_tiled_vae_pass_between_tiles(vae, host_state, monkeypatch, node):
    from comfyui_krea.model_loader.autoencoder import tiling

    event = threading.Event()
    host_state.configure(interrupt=event)
    monkeypatch.setattr(tiling, "available_memory", lambda device: 1)  # the smallest tiles
    model = vae.load()
    ran = []

    def first_tile_runs_then_cancel(*_) -> None:
        ran.append(1)
        event.set()

    hook = model.decoder.conv_in.register_forward_hook(first_tile_runs_then_cancel)
    hook_e = model.encoder.conv_in.register_forward_hook(first_tile_runs_then_cancel)
    try:
        with pytest.raises(Interrupted):
            if node == "encode":
                KreaEncodeImage().encode(vae, torch.rand(1, 512, 512, 3))
            else:
                KreaDecode().decode(vae, {"samples": torch.zeros(1, 16, 64, 64)})
    finally:
        hook.remove()
        hook_e.remove()
    assert ran == [1]  # one tile ran, the cancel stopped the rest
