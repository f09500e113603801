"""FLUX autoencoder key layouts: BFL `ae.safetensors` <-> diffusers `vae/` names, and the config from shapes."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..checkpoints import Checkpoint, FileKind, first_keys, identify
from ..errors import ModelFileError
from .config import LATENT_CHANNELS, AutoEncoderConfig

# Prefixes under which full checkpoints (model + text encoders + VAE in one file) keep their VAE.
_EMBEDDED_PREFIXES = ("", "vae.", "first_stage_model.")

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


def _wrong_file(path: Path, what: str, found: FileKind | None = None) -> ModelFileError:
    return ModelFileError(
        f"{path} is not a FLUX VAE: it looks like {what}. The VAE input needs FLUX's 16-channel autoencoder, "
        "ae.safetensors (from black-forest-labs/FLUX.1-Krea-dev or FLUX.1-dev) or a diffusers vae/ folder.",
        found=found, expected=FileKind.VAE)


def _count(keys: list[str], pattern: str) -> int:
    found = {m[1] for k in keys if (m := re.match(pattern, k))}
    return len(found)


def config_from_checkpoint(ckpt: Checkpoint, prefix: str, layout: str, path: Path) -> AutoEncoderConfig:
    """The config of the autoencoder stored under `prefix` in `layout`, read off its tensor shapes."""
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
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys) or moments != 2 * LATENT_CHANNELS:
        hint = " (a Stable Diffusion 1.x/2.x/SDXL VAE)" if moments == 8 else ""
        if moments == 2 * LATENT_CHANNELS:
            hint = " (it has quant_conv layers, which FLUX's autoencoder does not)"
        raise _wrong_file(path, f"the VAE of another model: {moments // 2} latent channels, not "
                                f"{LATENT_CHANNELS}{hint}", FileKind.VAE)
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


def find_autoencoder(ckpt: Checkpoint, path: Path) -> tuple[str, str]:
    """(key prefix, 'bfl' or 'diffusers') of the autoencoder in a checkpoint, or the error saying what it is."""
    for prefix in _EMBEDDED_PREFIXES:
        if prefix + "encoder.conv_in.weight" in ckpt and prefix + "decoder.conv_in.weight" in ckpt:
            layout = "diffusers" if any(k.startswith(prefix + "encoder.down_blocks.") for k in ckpt.keys()) \
                else "bfl"
            return prefix, layout
    keys = ckpt.keys()
    kind = identify(keys)
    if kind is FileKind.VAE:
        raise _wrong_file(path, "an incomplete autoencoder (its encoder or decoder half is missing)")
    if kind is FileKind.UNKNOWN:
        raise _wrong_file(path, f"no autoencoder at all (first keys: {first_keys(keys)})")
    raise _wrong_file(path, kind.description, kind)
