"""Inpainting inside the real ComfyUI, one process: `python inpainting.py inpainting WORKDIR` prints one JSON line
(the argument form of scenarios.py, whose helpers it uses).

ComfyUI's own LoadImage (an RGBA file whose transparent part is the mask) and LoadImageMask feed the Krea Sampler
two ways: the mask input, and SetLatentNoiseMask on the latent of Krea Encode Image or of ComfyUI's own VAEEncode
(with the same autoencoder file through VAELoader). tests/test_comfyui_inpainting.py asserts on the measurements.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scenarios import TINY, comfy_nodes, conditioning, folder_paths, krea_model, setup_folders, write_other_models

from comfyui_krea.nodes import NODE_CLASS_MAPPINGS
from comfyui_krea.standalone.node_classes import LoadImage as PackLoadImage
from comfyui_krea.standalone.node_classes import LoadImageMask as PackLoadImageMask


def write_inputs(folder: Path) -> None:
    """in.png: RGBA 64x48, its right half transparent (LoadImage's mask: repaint there); mask.png: the same region
    white on black; opaque.png: no alpha."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = (np.random.default_rng(0).random((48, 64, 4)) * 255).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, 32:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "in.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(rgba[..., :3]).save(folder / "opaque.png")


def sample(model, latent: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    sampler = NODE_CLASS_MAPPINGS["KreaSampler"]()
    out = sampler.sample(model, conditioning(TINY), "custom", 64, 48, 3, 4.5, 42, 1, "none", latent=latent,
                         strength=0.9, mask=mask)
    return out["result"][0]["samples"]


def inpainting(work: Path) -> dict:
    from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint

    setup_folders(work, TINY)
    write_other_models(work, TINY)
    # FLUX's own autoencoder shape (ComfyUI's VAELoader assumes it): random weights, bf16 (about 160 MB).
    write_random_autoencoder_checkpoint(work / "vae" / "ae.safetensors", seed=3, dtype=torch.bfloat16)
    write_inputs(work / "input")
    folder_paths.set_input_directory(str(work / "input"))
    image, mask = comfy_nodes.LoadImage().load_image("in.png")
    (file_mask,) = comfy_nodes.LoadImageMask().load_image("mask.png", "red")
    result: dict = {"mask_shape": list(mask.shape), "repaint_fraction": mask.mean().item(),
                    "file_mask_equals_alpha_mask": torch.equal(file_mask, mask)}
    # The server-less runner's stand-ins read the same files as ComfyUI's nodes.
    ours_image, ours_mask = PackLoadImage().load_image(str(work / "input" / "in.png"))
    (ours_file_mask,) = PackLoadImageMask().load_image(str(work / "input" / "mask.png"), "red")
    _, opaque_mask = comfy_nodes.LoadImage().load_image("opaque.png")
    _, ours_opaque_mask = PackLoadImage().load_image(str(work / "input" / "opaque.png"))
    result["stand_ins_equal"] = (torch.equal(ours_image, image) and torch.equal(ours_mask, mask)
                                 and torch.equal(ours_file_mask, file_mask)
                                 and torch.equal(ours_opaque_mask, opaque_mask))
    model = krea_model()
    krea_vae = NODE_CLASS_MAPPINGS["KreaModelLoader"]().load(
        "krea.safetensors", "default", "clip_l.safetensors", "t5.safetensors", "ae.safetensors")[2]
    comfy_vae = comfy_nodes.VAELoader().load_vae("ae.safetensors")[0]
    encoders = {"KreaEncodeImage": lambda: NODE_CLASS_MAPPINGS["KreaEncodeImage"]().encode(krea_vae, image)[0],
                "VAEEncode": lambda: comfy_nodes.VAEEncode().encode(comfy_vae, image)[0]}
    for name, encode in encoders.items():
        latent = encode()
        (with_noise_mask,) = comfy_nodes.SetLatentNoiseMask().set_mask(latent, mask)
        by_input = sample(model, latent, mask)
        by_noise_mask = sample(model, with_noise_mask)
        plain = sample(model, latent)
        kept = (by_noise_mask - latent["samples"]).abs().amax(dim=(0, 1, 2))  # per latent column
        result[name] = {"noise_mask_shape": list(with_noise_mask["noise_mask"].shape),
                        "equal": torch.equal(by_input, by_noise_mask),
                        "kept_max": kept[:4].max().item(), "repainted_min": kept[4:].min().item(),
                        "differs_from_image_to_image": (by_input - plain).abs().max().item()}
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    name, workdir = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"inpainting": inpainting}[name](workdir)))
