"""Autoencoder files -> a ready `AutoEncoder`: BFL `ae.safetensors` and the diffusers `vae/` layout.

The config is read off tensor shapes, the module is built on the meta device and loaded with
`assign=True` from memory-mapped tensors (diffusers tensors are renamed, and their Linear attention
weights viewed as 1x1 convolutions, one tensor at a time), so a 335 MB file is never held twice.
Files of other models are recognised and named in the error instead of failing on a shape.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .autoencoder import AutoEncoder, AutoEncoderConfig, compute_dtype
from .errors import ModelFileError
from .safetensors_file import Checkpoint

log = logging.getLogger(__name__)

FLUX_LATENT_CHANNELS = 16
# Prefixes under which full checkpoints (model + text encoders + VAE in one file) keep their VAE.
_EMBEDDED_PREFIXES = ("", "vae.", "first_stage_model.")
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

_ATTENTION_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_TO_OLD_DIFFUSERS = {"norm": "group_norm", "q": "query", "k": "key", "v": "value",
                               "proj_out": "proj_attn"}


def diffusers_key_names(bfl_key: str, levels: int) -> list[str]:
    """The diffusers name of a BFL key (first), then older diffusers spellings of the same tensor."""
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", bfl_key)
    if m:
        part, layer, kind = m.groups()
        names = [f"{part}.mid_block.attentions.0.{_ATTENTION_TO_DIFFUSERS[layer]}.{kind}"]
        if layer != "norm":
            names.append(f"{part}.mid_block.attentions.0.{_ATTENTION_TO_OLD_DIFFUSERS[layer]}.{kind}")
        return names
    key = bfl_key.replace(".nin_shortcut.", ".conv_shortcut.")
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)",
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        # The decoder's levels are numbered from the top (deepest) in diffusers, from the image in BFL.
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_([12])\.(.+)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
    ]
    for pattern, rename in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return [rename(m)]
    return [key]  # conv_in, conv_out: same names


def _what_it_looks_like(keys: list[str]) -> str | None:
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") or has("single_blocks.") or has("single_transformer_blocks."):
        return "the FLUX transformer (a diffusion model: put it in models/diffusion_models)"
    if has("input_blocks.") or has("model.diffusion_model."):
        return "a Stable Diffusion UNet or full checkpoint"
    if has("text_model.") or has("text_projection"):
        return "a CLIP text encoder (put it in models/text_encoders)"
    if has("SelfAttention.") or any(k == "shared.weight" or k.endswith(".shared.weight") for k in keys):
        return "a T5 text encoder (put it in models/text_encoders)"
    if any("lora" in k.lower() for k in keys):
        return "a LoRA"
    if has("vit.embeddings") or has("classifier."):
        return "an image classifier (the safety checker belongs in models/safety_checker)"
    if has("decoder.layers.") or has("encoder.layers."):
        return "a tiny preview autoencoder (TAESD/TAEF1), not the full VAE"
    if has("transformer_blocks."):
        return "a diffusers transformer (a diffusion model)"
    return None


def _wrong_file(path: Path, what: str) -> ModelFileError:
    return ModelFileError(
        f"{path} is not a FLUX VAE: it looks like {what}. The VAE input needs FLUX's 16-channel autoencoder, "
        "ae.safetensors (from black-forest-labs/FLUX.1-Krea-dev or FLUX.1-dev) or a diffusers vae/ folder, "
        "in models/vae."
    )


def _resolve(path: Path) -> Path:
    """A diffusers model folder -> its vae/ folder; a diffusers vae/ folder -> its main weights file."""
    if path.is_dir():
        if (path / "vae").is_dir():
            path = path / "vae"
        if (path / _DIFFUSERS_WEIGHTS).is_file():  # ignore .fp16 variants beside it
            return path / _DIFFUSERS_WEIGHTS
    return path


def _count(keys: list[str], pattern: str) -> int:
    found = {m[1] for k in keys if (m := re.match(pattern, k))}
    return len(found)


def _read_config(ckpt: Checkpoint, prefix: str, layout: str, path: Path) -> AutoEncoderConfig:
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix)]

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in ckpt:
            raise ModelFileError(f"{path} has an incomplete autoencoder: the tensor {prefix + key!r} is missing. "
                                 "Download the VAE file again.")
        return ckpt.shape(prefix + key)

    if layout == "bfl":
        levels = _count(keys, r"encoder\.down\.(\d+)\.")
        res_blocks = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
        width_key = "encoder.down.{}.block.0.conv1.weight"
        mid_attention = any(k.startswith("encoder.mid.attn_1.") for k in keys)
    else:
        levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
        res_blocks = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        width_key = "encoder.down_blocks.{}.resnets.0.conv1.weight"
        mid_attention = any(k.startswith("encoder.mid_block.attentions.0.") for k in keys)
    out_ch, in_ch = shape("encoder.conv_in.weight")[:2]
    moments = shape("encoder.conv_out.weight")[0]
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys) or moments != 2 * FLUX_LATENT_CHANNELS:
        hint = " (a Stable Diffusion 1.x/2.x/SDXL VAE)" if moments == 8 else ""
        if moments == 2 * FLUX_LATENT_CHANNELS:
            hint = " (it has quant_conv layers, which FLUX's autoencoder does not)"
        raise _wrong_file(path, f"the VAE of another model: {moments // 2} latent channels, not "
                                f"{FLUX_LATENT_CHANNELS}{hint}")
    if levels == 0 or res_blocks == 0:
        raise ModelFileError(f"{path}: the autoencoder's encoder has no down blocks; the file is damaged or of "
                             "another model. Use FLUX's ae.safetensors.")
    widths = [shape(width_key.format(i))[0] for i in range(levels)]
    if any(w % out_ch for w in widths):
        raise ModelFileError(f"{path}: autoencoder widths {widths} are not multiples of its base width {out_ch}.")
    config = AutoEncoderConfig(
        in_channels=in_ch,
        out_channels=shape("decoder.conv_out.weight")[0],
        ch=out_ch,
        ch_mult=tuple(w // out_ch for w in widths),
        num_res_blocks=res_blocks,
        z_channels=moments // 2,
        mid_attention=mid_attention,
    )
    if any(w % config.norm_groups for w in widths):
        raise ModelFileError(f"{path}: autoencoder widths {widths} do not split into {config.norm_groups} "
                             "normalization groups; this is not FLUX's autoencoder.")
    return config


def _find_vae(ckpt: Checkpoint, path: Path) -> tuple[str, str]:
    """(key prefix, 'bfl' or 'diffusers') of the autoencoder in a checkpoint, or the error saying what it is."""
    for prefix in _EMBEDDED_PREFIXES:
        if prefix + "encoder.conv_in.weight" in ckpt and prefix + "decoder.conv_in.weight" in ckpt:
            layout = "diffusers" if any(k.startswith(prefix + "encoder.down_blocks.") for k in ckpt.keys()) \
                else "bfl"
            return prefix, layout
    keys = ckpt.keys()
    what = _what_it_looks_like(keys)
    if what is None:
        if any(k.startswith(("decoder.", "vae.decoder.", "first_stage_model.decoder.")) for k in keys):
            what = "a decoder-only autoencoder (the encoder half is missing)"
        else:
            sample = ", ".join(sorted(keys)[:3])
            what = f"no autoencoder at all (first keys: {sample})"
    raise _wrong_file(path, what)


def load_autoencoder_file(path: Path, device: torch.device) -> AutoEncoder:
    """Build the autoencoder of `path` on `device` in its compute dtype (see `compute_dtype`)."""
    ckpt = Checkpoint(_resolve(path))
    prefix, layout = _find_vae(ckpt, path)
    config = _read_config(ckpt, prefix, layout, path)
    if prefix:
        log.info("%s: using the autoencoder stored under %r.", path, prefix)

    with torch.device("meta"):
        model = AutoEncoder(config)
    expected = model.state_dict()
    levels = len(config.ch_mult)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, meta in expected.items():
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
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.requires_grad_(False)
    model.eval()
    dtype = compute_dtype(device)
    log.info("Autoencoder %s: %s layout, config %s, computing in %s on %s.", path.name, layout, config,
             dtype, device)
    return model.to(device=device, dtype=dtype)


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


def write_random_checkpoint(path: Path, config: AutoEncoderConfig, seed: int = 0,
                            dtype: torch.dtype = torch.float32, layout: str = "bfl") -> Path:
    """Write random weights as a BFL file, or a diffusers file / vae folder (path without .safetensors).

    The same seed gives the same weights in both layouts.
    """
    state = random_state_dict(config, seed, dtype)
    if layout == "bfl":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt"})
        return path
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
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(renamed, str(path), metadata={"format": "pt"})
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(path / _DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))
    return path


def diffusers_config(config: AutoEncoderConfig) -> dict:
    """The AutoencoderKL config.json of this autoencoder (FLUX: no quant convs, scale 0.3611, shift 0.1159)."""
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
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    }
