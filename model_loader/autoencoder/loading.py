"""Autoencoder files -> a ready `AutoEncoder` on a device: BFL `ae.safetensors` and the diffusers `vae/` layout.

The config is read off tensor shapes, the module is built on the meta device and loaded with
`assign=True` from memory-mapped tensors (diffusers tensors are renamed, and their Linear attention
weights viewed as 1x1 convolutions, one tensor at a time), so a 335 MB file is never held twice.
Files of other models are recognised and named in the error instead of failing on a shape.
`autoencoder_weights` gives the same checked tensors under BFL's names, for another implementation of the
autoencoder (ComfyUI's own, inside ComfyUI).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..checkpoints import open_checkpoint
from ..compute_dtypes import autoencoder_compute_dtype
from ..errors import ModelFileError
from .config import AutoEncoderConfig
from .layouts import config_from_checkpoint, diffusers_key_names, find_autoencoder
from .model import AutoEncoder

log = logging.getLogger(__name__)


def _bfl_tensors(path: Path) -> tuple[AutoEncoderConfig, dict[str, torch.Tensor]]:
    """The autoencoder of `path`: its config and its memory-mapped tensors under BFL's names, checked complete."""
    ckpt = open_checkpoint(path, "vae")
    prefix, layout = find_autoencoder(ckpt, path)
    config = config_from_checkpoint(ckpt, prefix, layout, path)
    log.info("%s: autoencoder in the %s layout%s.", path.name, layout, f", stored under {prefix!r}" if prefix else "")

    with torch.device("meta"):
        model = AutoEncoder(config)
    levels = len(config.ch_mult)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, meta in model.state_dict().items():
        names = [key] if layout == "bfl" else diffusers_key_names(key, levels)
        source = next((prefix + n for n in names if prefix + n in ckpt), None)
        if source is None:
            missing.append(prefix + names[0])
            continue
        tensor = ckpt.tensor(source)
        if tensor.shape != meta.shape:
            if tensor.ndim == 2 and tuple(tensor.shape) + (1, 1) == tuple(meta.shape):
                tensor = tensor.reshape(meta.shape)  # diffusers' Linear attention weight = 1x1 conv (a view)
            else:
                raise ModelFileError(
                    f"{path}: tensor {source!r} has shape {tuple(tensor.shape)}, expected {tuple(meta.shape)} "
                    f"for an autoencoder of this size. The file is damaged or of another model.")
        state[key] = tensor
        used.add(source)
    if missing:
        raise ModelFileError(f"{path} is an incomplete autoencoder: {len(missing)} tensors are missing "
                             f"(e.g. {', '.join(missing[:3])}). Download the VAE file again.")
    extra = [k for k in ckpt.keys() if k.startswith(prefix) and k not in used
             and k[len(prefix):].startswith(("encoder.", "decoder."))]
    if extra:
        raise ModelFileError(f"{path} has autoencoder tensors this architecture does not know "
                             f"({len(extra)}, e.g. {', '.join(sorted(extra)[:3])}); it is not FLUX's autoencoder.")
    return config, state


def autoencoder_weights(path: str | os.PathLike[str]) -> tuple[AutoEncoderConfig, dict[str, torch.Tensor]]:
    """The autoencoder of any file or folder `load_autoencoder` takes, for another implementation of it
    (ComfyUI's): its config and its memory-mapped tensors under BFL's names (`encoder.*`, `decoder.*`, as in
    `ae.safetensors`; diffusers files renamed), checked complete."""
    return _bfl_tensors(Path(path))


def load_autoencoder(path: str | os.PathLike[str], device: torch.device | str,
                     compute_device: torch.device | str | None = None) -> AutoEncoder:
    """The autoencoder of a BFL `ae.safetensors` or a diffusers `vae/` (folder or file), on `device` in the
    dtype it computes in on `compute_device` (default: `device`; inside ComfyUI the weights wait on the
    offload device and ComfyUI moves them)."""
    path, device = Path(path), torch.device(device)
    compute_device = device if compute_device is None else torch.device(compute_device)
    config, state = _bfl_tensors(path)
    with torch.device("meta"):
        model = AutoEncoder(config)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.requires_grad_(False)
    model.eval()
    dtype = autoencoder_compute_dtype(compute_device)
    log.info("Autoencoder %s: config %s, computing in %s on %s.", path.name, config, dtype, device)
    return model.to(device=device, dtype=dtype)
