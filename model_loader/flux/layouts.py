"""FLUX transformer key layouts: BFL <-> diffusers names, which layout a file is in, the config its shapes give.

  bfl               BFL release keys (`double_blocks.0.img_attn.qkv.weight`), loaded with no remapping
  comfy             the same keys under `model.diffusion_model.` (ComfyUI repacks)
  comfy_fp8_scaled  ComfyUI scaled fp8: float8_e4m3fn Linear weights plus per-tensor `*.scale_weight`
  diffusers         `transformer_blocks.N.attn.to_q` ...: q/k/v (and the single blocks' MLP input) fused on load

GGUF files carry the same keys (ComfyUI-GGUF's layout is bfl's); their block-quantized tensors are planned
with their type and bytes, so a loader can keep them quantized.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checkpoints import FileKind, TensorSource, first_keys, identify, is_lora
from ..errors import ModelFileError
from ..gguf.types import QuantType
from .model import FluxConfig

log = logging.getLogger(__name__)

LAYOUTS = ("bfl", "comfy", "comfy_fp8_scaled", "diffusers")
COMFY_PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------------ BFL <-> diffusers names


@dataclass(frozen=True)
class Rename:
    """One BFL tensor and the diffusers tensors it is made of (concatenated on dim 0, in this order)."""
    bfl: str
    diffusers: tuple[str, ...]
    swap_halves: bool = False  # diffusers' norm_out stores (scale, shift); BFL's final layer (shift, scale)


def _linear(bfl: str, parts: Iterable[str], bias: bool = True, swap: bool = False) -> list[Rename]:
    parts = tuple(parts)
    out = [Rename(f"{bfl}.weight", tuple(f"{p}.weight" for p in parts), swap)]
    if bias:
        out.append(Rename(f"{bfl}.bias", tuple(f"{p}.bias" for p in parts), swap))
    return out


def diffusers_renames(depth: int, depth_single: int, guidance_embed: bool, qkv_bias: bool = True) -> list[Rename]:
    """Every BFL tensor of a FLUX transformer with the diffusers tensors holding the same numbers."""
    r: list[Rename] = []
    r += _linear("img_in", ["x_embedder"]) + _linear("txt_in", ["context_embedder"])
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, dif in embedders:
        r += _linear(f"{bfl}.in_layer", [f"time_text_embed.{dif}.linear_1"])
        r += _linear(f"{bfl}.out_layer", [f"time_text_embed.{dif}.linear_2"])
    for i in range(depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        r += _linear(b + "img_mod.lin", [d + "norm1.linear"]) + _linear(b + "txt_mod.lin", [d + "norm1_context.linear"])
        r += _linear(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], qkv_bias)
        r += _linear(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                     qkv_bias)
        r += _linear(b + "img_attn.proj", [d + "attn.to_out.0"])
        r += _linear(b + "txt_attn.proj", [d + "attn.to_add_out"])
        r += _linear(b + "img_mlp.0", [d + "ff.net.0.proj"]) + _linear(b + "img_mlp.2", [d + "ff.net.2"])
        r += _linear(b + "txt_mlp.0", [d + "ff_context.net.0.proj"])
        r += _linear(b + "txt_mlp.2", [d + "ff_context.net.2"])
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            r.append(Rename(f"{b}{stream}_attn.norm.query_norm.scale", (f"{d}attn.{q}.weight",)))
            r.append(Rename(f"{b}{stream}_attn.norm.key_norm.scale", (f"{d}attn.{k}.weight",)))
    for i in range(depth_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        r += _linear(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        r += _linear(b + "linear2", [d + "proj_out"]) + _linear(b + "modulation.lin", [d + "norm.linear"])
        r.append(Rename(b + "norm.query_norm.scale", (d + "attn.norm_q.weight",)))
        r.append(Rename(b + "norm.key_norm.scale", (d + "attn.norm_k.weight",)))
    r += _linear("final_layer.linear", ["proj_out"])
    r += _linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True)
    return r


def swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ------------------------------------------------------------------------------------ layout detection


@dataclass(frozen=True)
class PlannedTensor:
    """How to read one BFL-named tensor from the file (lazily)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], Tensor]  # the values (a GGUF block-quantized tensor dequantized to float32)
    scale: Callable[[], Tensor] | None = None  # per-tensor scale_weight of a scaled-fp8 weight
    quant: QuantType | None = None  # GGUF block type of a quantized tensor
    raw: Callable[[], Tensor] | None = None  # its blocks as stored: uint8 (rows, row bytes)


@dataclass(frozen=True)
class FluxLayout:
    kind: str  # one of LAYOUTS
    tensors: dict[str, PlannedTensor]  # BFL key -> how to read it


_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_BUNDLED_PARTS = {"first_stage_model.": "VAE", "vae.": "VAE", "cond_stage_model.": "text encoder",
                  "conditioner.": "text encoders", "text_encoders.": "text encoders"}


def _not_flux(name: str, keys: list[str]) -> ModelFileError:
    kind = identify(keys)
    use = "Use a FLUX.1 transformer file (e.g. flux1-krea-dev.safetensors)."
    if kind is not FileKind.UNKNOWN:
        return ModelFileError(f"{name} is {kind.description}, not a FLUX.1 transformer. {use}", found=kind,
                              expected=FileKind.FLUX_TRANSFORMER)
    return ModelFileError(f"{name} is not a FLUX.1 transformer (none of its keys look like FLUX's double_blocks / "
                          f"transformer_blocks; first keys: {first_keys(keys, 5)}). {use}",
                          found=kind, expected=FileKind.FLUX_TRANSFORMER)


def plan_flux_layout(source: TensorSource, name: str) -> FluxLayout:
    """Detect the layout of `source` and say how to read every BFL-named tensor from it."""
    keys = source.keys()
    if is_lora(keys):  # checked first: LoRA keys can mention double_blocks too
        raise _not_flux(name, keys)
    for prefix in ("", COMFY_PREFIX):
        if f"{prefix}img_in.weight" in keys and any(k.startswith(prefix + "double_blocks.") for k in keys):
            return _plan_bfl(source, keys, prefix, name)
    if "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys):
        return _plan_diffusers(source, keys, name)
    raise _not_flux(name, keys)


def _plan_bfl(source: TensorSource, keys: list[str], prefix: str, name: str) -> FluxLayout:
    own = [k for k in keys if k.startswith(prefix)]
    others = [k for k in keys if not k.startswith(prefix)]
    if others:
        stray = [k for k in others if not k.startswith(tuple(_BUNDLED_PARTS))]
        if stray:
            raise ModelFileError(f"{name} holds tensors outside the FLUX transformer that this loader does not know "
                                 f"(e.g. {', '.join(stray[:3])}). Use the transformer file on its own.")
        parts = sorted({_BUNDLED_PARTS[p] for p in _BUNDLED_PARTS if any(k.startswith(p) for k in others)})
        log.info("%s bundles the FLUX transformer with %s; loading the transformer only.", name, ", ".join(parts))
    key_set = set(keys)
    scaled = False
    quant_type = getattr(source, "quant_type", None)  # GGUF files: which tensors are block-quantized
    plan: dict[str, PlannedTensor] = {}
    for key in own:
        short = key[len(prefix):]
        if short == "scaled_fp8" or short.endswith(".scale_input"):
            continue  # format marker / activation scales for fp8 matmuls: not needed to compute
        if short.endswith(".scale_weight"):
            scaled = True
            continue
        scale_key = key[: -len(".weight")] + ".scale_weight" if key.endswith(".weight") else None
        scale = (lambda k=scale_key: source.tensor(k)) if scale_key in key_set else None
        quant = quant_type(key) if quant_type is not None else None
        raw = (lambda k=key: source.raw(k)) if quant is not None else None
        plan[short] = PlannedTensor(source.shape(key), source.dtype(key), lambda k=key: source.tensor(k), scale,
                                    quant, raw)
    orphans = [k for k in own if k.endswith(".scale_weight") and k[: -len(".scale_weight")] + ".weight" not in key_set]
    if orphans:
        raise ModelFileError(f"{name} has fp8 scales without weights (e.g. {orphans[0]}); the file is damaged.")
    kind = "comfy_fp8_scaled" if scaled else ("comfy" if prefix else "bfl")
    return FluxLayout(kind, plan)


def _plan_diffusers(source: TensorSource, keys: list[str], name: str) -> FluxLayout:
    def count(block: str) -> int:
        found = [int(m.group(2)) for k in keys if (m := _BLOCK_INDEX.match(k)) and m.group(1) == block]
        return max(found) + 1 if found else 0

    depth = count("transformer_blocks")
    renames = diffusers_renames(depth, count("single_transformer_blocks"),
                                any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
                                qkv_bias=depth == 0 or "transformer_blocks.0.attn.to_q.bias" in keys)
    used = {p for r in renames for p in r.diffusers}
    missing = sorted(used.difference(keys))
    if missing:
        raise ModelFileError(f"{name} (diffusers layout) is missing {len(missing)} tensors of the FLUX transformer "
                             f"(e.g. {', '.join(missing[:3])}); the download may be incomplete.")
    extra = sorted(set(keys) - used)
    if extra:
        raise ModelFileError(f"{name} (diffusers layout) holds {len(extra)} tensors a FLUX.1 transformer does not "
                             f"have (e.g. {', '.join(extra[:3])}).")
    quant_type = getattr(source, "quant_type", None)  # GGUF files: which tensors are block-quantized
    plan: dict[str, PlannedTensor] = {}
    for r in renames:
        shapes = [source.shape(p) for p in r.diffusers]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ModelFileError(f"{name}: tensors {', '.join(r.diffusers)} have shapes {shapes} that do not fit "
                                 "together; the file is damaged or not a FLUX.1 transformer.")
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        # GGUF parts of one block type fuse as their rows of blocks (each row is whole blocks): kept quantized.
        quants = {quant_type(p) for p in r.diffusers} if quant_type is not None else {None}
        quant = quants.pop() if len(quants) == 1 else None
        raw = (lambda r=r: _read_fused(source.raw, r)) if quant is not None else None
        plan[r.bfl] = PlannedTensor(shape, source.dtype(r.diffusers[0]), lambda r=r: _read_fused(source.tensor, r),
                                    quant=quant, raw=raw)
    return FluxLayout("diffusers", plan)


def _read_fused(read: Callable[[str], Tensor], rename: Rename) -> Tensor:
    parts = [read(p) for p in rename.diffusers]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return swap_halves(t) if rename.swap_halves else t


# ----------------------------------------------------------------------------------------------- config


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Rotary split of the head dim: FLUX's (16, 56, 56) for 128, the same proportions (rounded to even) else."""
    side = 2 * (head_dim * 7 // 32)
    return (head_dim - 2 * side, side, side)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str) -> FluxConfig:
    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ModelFileError(f"{name} has no tensor {key!r}, which every FLUX.1 transformer has; the file is "
                                 "incomplete or of another model.")
        return shapes[key]

    def depth(block: str) -> int:
        found = [int(m.group(2)) for k in shapes if (m := _BLOCK_INDEX.match(k)) and m.group(1) == block]
        return max(found) + 1 if found else 0

    hidden, in_channels = need("img_in.weight")
    depth_double, depth_single = depth("double_blocks"), depth("single_blocks")
    if depth_double:
        head_dim = need("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = need("double_blocks.0.img_mlp.0.weight")[0]
    elif depth_single:
        head_dim = need("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = need("single_blocks.0.linear2.weight")[1] - hidden
    else:
        raise ModelFileError(f"{name} has no transformer blocks; it is not a complete FLUX.1 transformer.")
    if head_dim <= 0 or hidden % head_dim:
        raise ModelFileError(f"{name}: hidden size {hidden} is not a multiple of the head dim {head_dim}.")
    return FluxConfig(
        in_channels=in_channels,
        out_channels=need("final_layer.linear.weight")[0],
        vec_in_dim=need("vector_in.in_layer.weight")[1],
        context_in_dim=need("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth_double,
        depth_single_blocks=depth_single,
        axes_dim=rope_axes_for_head_dim(head_dim),
        qkv_bias=depth_double == 0 or "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
