"""A running fal stream request's sampler estimate x0 (model space, (B, 16, h, w)) -> a preview image, decoded by the
request's own VAE (`serve`; inside ComfyUI its latent previewer makes them, nodes/host/fal_queue.py).

The latent is averaged down to at most PREVIEW_LATENT_SIDE on its longest side first (a 1024 px image previews at
512 px, a decode a quarter of the final one's size), and a preview is skipped while the time since the last one is
under PREVIEW_SHARE's inverse times what decoding it took, so previews cost at most about a fifth of the sampling.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from PIL import Image

from ..nodes.host import VaeHandle, standalone_host
from ..sampling.latents import to_raw

PREVIEW_LATENT_SIDE = 64  # latent pixels: 512 image pixels
PREVIEW_SHARE = 0.2  # of the wall time, at most, spent decoding previews
LOADER = "KreaModelLoader"


def preview_maker(prompt: Mapping[str, dict]) -> Callable[[torch.Tensor], Image.Image | None] | None:
    """x0 -> a preview (None: skipped this step), with the VAE of the workflow's loader; None without one."""
    name = next((node.get("inputs", {}).get("vae_name") for node in prompt.values()
                 if node.get("class_type") == LOADER), None)
    if not isinstance(name, str):
        return None
    host = standalone_host()
    vae = VaeHandle(host.model_path("vae", name), host.torch_device())
    last = {"at": 0.0, "took": 0.0}

    def preview(x0: torch.Tensor) -> Image.Image | None:
        started = time.perf_counter()
        if started - last["at"] < last["took"] / PREVIEW_SHARE:
            return None
        latent = x0[:1].float()
        factor = math.ceil(max(latent.shape[-2:]) / PREVIEW_LATENT_SIDE)
        if factor > 1:
            latent = F.avg_pool2d(latent, factor, ceil_mode=True)
        with torch.no_grad():
            pixels = vae.decode(to_raw(latent), lambda *_: None)[0]  # (H, W, 3) in 0..1 on the CPU
        image = Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())
        last["at"], last["took"] = time.perf_counter(), time.perf_counter() - started
        return image

    return preview
