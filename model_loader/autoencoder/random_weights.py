"""Random-weight FLUX autoencoders in the BFL and diffusers layouts: the fixtures tests, --demo and benchmarks use."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import save_tensors
from .config import FLUX_AUTOENCODER, SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderConfig
from .layouts import diffusers_key_names
from .model import AutoEncoder


def random_state_dict(config: AutoEncoderConfig, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with BFL key names, scaled so activations stay near unit size through the network."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoEncoder(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 4:  # conv weight: variance 1 / fan_in
            value = noise / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif ".norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif ".norm" in key:
            value = 0.1 * noise
        else:  # conv bias
            value = 0.02 * noise
        state[key] = value.to(dtype)
    return state


def build_random_autoencoder(config: AutoEncoderConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> AutoEncoder:
    """An in-memory autoencoder with random weights (benchmarks)."""
    with torch.device("meta"):
        model = AutoEncoder(config)
    model.load_state_dict(random_state_dict(config, seed, dtype), strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def write_random_autoencoder_checkpoint(path: str | os.PathLike[str], config: AutoEncoderConfig = FLUX_AUTOENCODER,
                                        seed: int = 0, dtype: torch.dtype = torch.float32,
                                        layout: str = "bfl") -> Path:
    """Write random weights as a BFL file, or a diffusers file / vae folder (path without .safetensors).

    The same seed gives the same weights in both layouts.
    """
    path = Path(path)
    state = random_state_dict(config, seed, dtype)
    if layout == "bfl":
        return save_tensors(path, state, {"format": "pt"})
    if layout != "diffusers":
        raise ValueError(f"layout must be 'bfl' or 'diffusers', not {layout!r}")
    levels = len(config.ch_mult)
    renamed = {}
    for key, tensor in state.items():
        name = diffusers_key_names(key, levels)[0]
        if ".attentions.0.to_" in name and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # diffusers stores attention projections as Linear weights
        renamed[name] = tensor.contiguous()
    if path.suffix == ".safetensors":
        return save_tensors(path, renamed, {"format": "pt"})
    save_tensors(path / "diffusion_pytorch_model.safetensors", renamed, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))
    return path


def diffusers_config(config: AutoEncoderConfig) -> dict:
    """The AutoencoderKL config.json of this autoencoder (FLUX: no quant convs, its scale and shift)."""
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.level_channels),
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "act_fn": "silu",
        "mid_block_add_attention": config.mid_attention,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": SCALE_FACTOR,
        "shift_factor": SHIFT_FACTOR,
    }
