"""FLUX transformer files -> a ready `Flux` module.

Accepted layouts (detected from the keys):
  bfl               BFL release keys (`double_blocks.0.img_attn.qkv.weight`), loaded with no remapping
  comfy             the same keys under `model.diffusion_model.` (ComfyUI repacks)
  comfy_fp8_scaled  ComfyUI scaled fp8: float8_e4m3fn Linear weights plus per-tensor `*.scale_weight`
  diffusers         `transformer_blocks.N.attn.to_q` ...: q/k/v (and the single blocks' MLP input) fused on load

The model is built on the meta device and its parameters are assigned from the memory-mapped file,
converted tensor by tensor only where the layout or `weight_dtype` asks for it, so loading never holds a
second copy of the weights. The config is read off the tensor shapes, so a reduced test file goes through
the same code as the full-size one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from .errors import ModelFileError
from .flux import Flux, FluxConfig
from .operations import CastLinear, CastOps, fp8_matmul_supported
from .safetensors_file import Checkpoint

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast")
LAYOUTS = ("bfl", "comfy", "comfy_fp8_scaled", "diffusers")
COMFY_PREFIX = "model.diffusion_model."
FP8_MAX = 448.0  # largest float8_e4m3fn value
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def tensor(self, key: str) -> Tensor: ...


class StateDictSource:
    """A plain {key: tensor} mapping (meta tensors work: shapes only) seen as a TensorSource."""

    def __init__(self, state_dict: Mapping[str, Tensor]) -> None:
        self._sd = state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def tensor(self, key: str) -> Tensor:
        return self._sd[key]


class ShardedSource:
    """The shards a diffusers index names, and only those (a folder may hold other variants too)."""

    def __init__(self, shards: list[Checkpoint]) -> None:
        self._where = {k: s for s in shards for k in s.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def tensor(self, key: str) -> Tensor:
        return self._where[key].tensor(key)


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
    read: Callable[[], Tensor]
    scale: Callable[[], Tensor] | None = None  # per-tensor scale_weight of a scaled-fp8 weight


@dataclass(frozen=True)
class FluxLayout:
    kind: str  # one of LAYOUTS
    tensors: dict[str, PlannedTensor]  # BFL key -> how to read it


_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_BUNDLED_PARTS = {"first_stage_model.": "VAE", "vae.": "VAE", "cond_stage_model.": "text encoder",
                  "conditioner.": "text encoders", "text_encoders.": "text encoders"}


def _is_lora(keys: list[str]) -> bool:
    markers = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")
    return any(m in k for k in keys for m in markers) or any(k.endswith(".alpha") for k in keys)


def _describe_other_model(keys: list[str]) -> str | None:
    """Name the kind of model a non-FLUX file holds, when the keys make it recognisable."""
    def has(*needles: str) -> bool:
        return any(any(n in k for n in needles) for k in keys)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if _is_lora(keys):
        return "a LoRA (an add-on to a base model, not a model by itself)"
    unet = has("input_blocks.", "output_blocks.") or (starts("down_blocks.", "mid_block.") and has("time_embedding."))
    vae = starts("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "encoder.conv_in",
                 "decoder.conv_in", "first_stage_model.", "vae.")
    text = starts("cond_stage_model.", "conditioner.", "text_encoders.", "text_model.", "encoder.block.", "shared.") \
        or has(".text_model.")
    mmdit = has("joint_blocks.")
    parts = [n for n, present in (("a UNet", unet), ("an MMDiT (SD3)", mmdit), ("a VAE", vae),
                                  ("text encoders", text)) if present]
    if len(parts) >= 2:
        return "a full checkpoint bundling " + ", ".join(parts) + " (for a Stable Diffusion checkpoint loader)"
    if unet:
        return "a Stable Diffusion / SDXL UNet"
    if mmdit:
        return "a Stable Diffusion 3 MMDiT transformer"
    if vae:
        return "a VAE (autoencoder)"
    if starts("text_model.") or has(".text_model."):
        return "a CLIP text encoder"
    if starts("encoder.block.", "shared.") or has("encoder.block."):
        return "a T5 text encoder"
    if has("distilled_guidance_layer."):
        return "a Chroma model (FLUX-derived, with a different modulation layout)"
    return None


def _not_flux(name: str, keys: list[str]) -> ModelFileError:
    kind = _describe_other_model(keys)
    where = "Put a FLUX.1 transformer file (e.g. flux1-krea-dev.safetensors) in models/diffusion_models."
    if kind is not None:
        return ModelFileError(f"{name} is {kind}, not a FLUX.1 transformer. {where}")
    sample = ", ".join(sorted(keys)[:5]) or "no tensors"
    return ModelFileError(f"{name} is not a FLUX.1 transformer (none of its keys look like FLUX's double_blocks / "
                          f"transformer_blocks; first keys: {sample}). {where}")


def plan_flux_layout(source: TensorSource, name: str) -> FluxLayout:
    """Detect the layout of `source` and say how to read every BFL-named tensor from it."""
    keys = source.keys()
    if _is_lora(keys):  # checked first: LoRA keys can mention double_blocks too
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
        plan[short] = PlannedTensor(source.shape(key), source.dtype(key), lambda k=key: source.tensor(k), scale)
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
    plan: dict[str, PlannedTensor] = {}
    for r in renames:
        shapes = [source.shape(p) for p in r.diffusers]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ModelFileError(f"{name}: tensors {', '.join(r.diffusers)} have shapes {shapes} that do not fit "
                                 "together; the file is damaged or not a FLUX.1 transformer.")
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        plan[r.bfl] = PlannedTensor(shape, source.dtype(r.diffusers[0]), lambda r=r: _read_fused(source, r))
    return FluxLayout("diffusers", plan)


def _read_fused(source: TensorSource, rename: Rename) -> Tensor:
    parts = [source.tensor(p) for p in rename.diffusers]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return swap_halves(t) if rename.swap_halves else t


# ----------------------------------------------------------------------------------------------- config


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Rotary split of the head dim: FLUX's (16, 56, 56) for 128, the same proportions (rounded to even) else."""
    side = 2 * (head_dim * 7 // 32)
    return (head_dim - 2 * side, side, side)


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str) -> FluxConfig:
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


def flux_config_from_checkpoint(
        ckpt: Checkpoint | TensorSource | Mapping[str, Tensor] | str | os.PathLike[str]) -> FluxConfig:
    """The FluxConfig of a checkpoint (a path, Checkpoint, or state dict) in any accepted layout."""
    if isinstance(ckpt, (str, os.PathLike)):
        source, name = resolve_flux_source(ckpt)
    elif isinstance(ckpt, Mapping):
        source, name = StateDictSource(ckpt), "state dict"
    else:
        source, name = ckpt, str(getattr(ckpt, "path", "checkpoint"))
    layout = plan_flux_layout(source, name)
    return _config_from_shapes({k: p.shape for k, p in layout.tensors.items()}, name)


# ---------------------------------------------------------------------------------------------- loading


def _check_weight_dtype(weight_dtype: str) -> None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"Unknown weight_dtype {weight_dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}.")


def _dequantize(t: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    if scale is None:
        return t.to(dtype)
    return (t.to(torch.float32) * scale.to(t.device, torch.float32)).to(dtype)


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor scaled float8_e4m3fn: w ~= q.float() * scale, with max |w| mapped to 448."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale).to(torch.float8_e4m3fn), scale


def _convert(key: str, t: Tensor, scale: Tensor | None, weight_dtype: str, linear_weights: set[str]
             ) -> tuple[Tensor, Tensor | None]:
    """One tensor as `weight_dtype` stores it: (tensor, per-tensor scale for CastLinear or None)."""
    is_linear = key in linear_weights
    if weight_dtype == "default":
        if is_linear and t.dtype in _FP8:
            return t, scale
        if t.dtype in _FP8:
            return _dequantize(t, scale, torch.bfloat16), None
        return (t, None) if scale is None else (_dequantize(t, scale, t.dtype), None)
    if weight_dtype in ("bf16", "fp16"):
        return _dequantize(t, scale, torch.bfloat16 if weight_dtype == "bf16" else torch.float16), None
    # fp8 storage: the big Linear weights of the blocks in fp8, everything small in bf16.
    if is_linear and key.startswith(("double_blocks.", "single_blocks.")):
        if t.dtype == torch.float8_e4m3fn:
            return t, scale
        return quantize_fp8(_dequantize(t, scale, torch.float32) if scale is not None else t)
    return _dequantize(t, scale, torch.bfloat16), None


def _compute_dtype(model: Flux, weight_dtype: str) -> torch.dtype:
    if weight_dtype == "fp16":
        return torch.float16
    if weight_dtype != "default":
        return torch.bfloat16
    blocks = list(model.double_blocks) + list(model.single_blocks)
    probe = blocks[0].img_attn.qkv.weight if model.double_blocks else model.single_blocks[0].linear1.weight
    return probe.dtype if probe.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def load_flux_from_source(source: TensorSource, weight_dtype: str = "default", device: str | torch.device = "cpu",
                          name: str = "state dict") -> Flux:
    """Build a Flux from any TensorSource (a Checkpoint, or a StateDictSource of possibly meta tensors)."""
    _check_weight_dtype(weight_dtype)
    device = torch.device(device)
    layout = plan_flux_layout(source, name)
    config = _config_from_shapes({k: p.shape for k, p in layout.tensors.items()}, name)
    try:
        model = Flux(config, device="meta", operations=CastOps)
    except ValueError as err:
        raise ModelFileError(f"{name}: its shapes give an impossible FLUX config ({err}).") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(name, layout, expected)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, planned in layout.tensors.items():  # tensor by tensor: at most one converted tensor in flight
        t = planned.read().to(device)
        scale = planned.scale().to(device, torch.float32) if planned.scale is not None else None
        state[key], scale = _convert(key, t, scale, weight_dtype, linear_weights)
        if scale is not None:
            scales[key[: -len(".weight")]] = scale
    model.requires_grad_(False)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    modules = dict(model.named_modules())
    for module_name, scale in scales.items():
        modules[module_name].set_scale(scale)
    if weight_dtype == "fp8_e4m3fn_fast":
        if fp8_matmul_supported(device):
            for module in modules.values():
                if isinstance(module, CastLinear):
                    module.fast_fp8 = True
        else:
            log.warning("fp8_e4m3fn_fast: %s has no fp8 matrix units; multiplying in bf16 (as fp8_e4m3fn).",
                        device)
    model.compute_dtype = _compute_dtype(model, weight_dtype)
    model.eval()
    log.info("Loaded FLUX transformer %s (%s layout, %d double + %d single blocks, weights %s, compute %s)",
             name, layout.kind, config.depth, config.depth_single_blocks, weight_dtype, model.compute_dtype)
    return model


def _check_keys(name: str, layout: FluxLayout, expected: Mapping[str, tuple[int, ...]]) -> None:
    found = {k: p.shape for k, p in layout.tensors.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} tensors a FLUX.1 transformer does not have (e.g. {', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise ModelFileError(f"{name} does not match the FLUX.1 transformer its shapes describe: "
                             f"{'; '.join(problems)}. The file is incomplete, damaged or of a FLUX variant this "
                             "loader does not support.")


def resolve_flux_source(path: str | os.PathLike[str]) -> tuple[TensorSource, str]:
    """The tensors of a file, a diffusers transformer folder or a diffusers model folder (with transformer/)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ModelFileError(f"{indexes[0]} is not a readable safetensors index.") from None
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (path / f).is_file()]
            if absent:
                raise ModelFileError(f"{path} lacks {len(absent)} of the {len(files)} shards its index names "
                                     f"({', '.join(absent[:3])}); download the missing files.")
            return ShardedSource([Checkpoint(path / f) for f in files]), str(path)
    return Checkpoint(path), str(path)


def load_flux(path: str | os.PathLike[str], weight_dtype: str = "default",
              device: str | torch.device = "cpu") -> Flux:
    """Load a FLUX.1 transformer (any accepted layout) as an eval-mode Flux with frozen weights.

    weight_dtype: "default" (as stored; fp8 stays fp8 and computes in bf16), "bf16", "fp16",
    "fp8_e4m3fn" (block Linear weights in fp8, the rest bf16; computes in bf16) or "fp8_e4m3fn_fast"
    (the same, multiplying in fp8 on GPUs that can). `model.compute_dtype` is the dtype to feed it.
    """
    _check_weight_dtype(weight_dtype)
    source, name = resolve_flux_source(path)
    return load_flux_from_source(source, weight_dtype, device, name)


# ---------------------------------------------------------------------------------- random checkpoints

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], Tensor]]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file, making each one only when it is written (bounded memory)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, dtype, shape, _ in entries:
        count = 1
        for d in shape:
            count *= d
        size = count * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, dtype, shape, make in entries:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: made shape {tuple(t.shape)}, declared {shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(partial, path)  # never leave a half-written file under the real name


def random_flux_tensor(key: str, shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> Tensor:
    """Deterministic float32 weights for one BFL key (independent of the order they are made in).

    Made on `device` with that device's generator: CUDA draws other numbers than the CPU for the same seed.
    """
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    if key.endswith(".scale"):  # RMSNorm gains around 1
        return 1.0 + 0.1 * noise
    if len(shape) == 2:  # Linear weight: unit gain, keeps deep stacks finite (0.018 at width 3072)
        return noise / shape[1] ** 0.5
    return 0.02 * noise  # biases


class RandomFluxSource:
    """Random weights for `config` in BFL keys, each made on `device` only when the loader reads it.

    For benchmarks of the full-size model: no 23.8 GB file to write first, and at most one float32 tensor
    in flight on top of the model being built.
    """

    def __init__(self, config: FluxConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> None:
        with torch.device("meta"):
            self._shapes = {k: tuple(v.shape) for k, v in Flux(config).state_dict().items()}
        self._seed, self._dtype, self._device = seed, dtype, torch.device(device)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def tensor(self, key: str) -> Tensor:
        return random_flux_tensor(key, self._shapes[key], self._seed, self._device).to(self._dtype)


def write_random_flux_checkpoint(path: str | os.PathLike[str], config: FluxConfig, seed: int = 0,
                                 dtype: torch.dtype = torch.float32, layout: str = "bfl") -> Path:
    """Write a random-weight FLUX transformer in one of LAYOUTS; returns what `load_flux` should be given.

    "diffusers": a path ending in .safetensors gets one file; any other path becomes a diffusers model
    folder with transformer/ holding two shards, their index and config.json.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}.")
    path = Path(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(config).state_dict().items()}
    bfl = {k: (lambda k=k, s=s: random_flux_tensor(k, s, seed)) for k, s in shapes.items()}
    entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], Tensor]]] = []
    if layout in ("bfl", "comfy"):
        prefix = COMFY_PREFIX if layout == "comfy" else ""
        entries = [(prefix + k, dtype, shapes[k], make) for k, make in bfl.items()]
    elif layout == "comfy_fp8_scaled":
        for k, make in bfl.items():
            if k.startswith(("double_blocks.", "single_blocks.")) and len(shapes[k]) == 2:
                quantized = {}

                def part(i: int, k: str = k, make: Callable[[], Tensor] = make, cache: dict = quantized) -> Tensor:
                    if not cache:
                        cache["q"], cache["s"] = quantize_fp8(make())
                    return cache.pop("q") if i == 0 else cache.pop("s")

                entries.append((COMFY_PREFIX + k, torch.float8_e4m3fn, shapes[k], lambda part=part: part(0)))
                entries.append((COMFY_PREFIX + k[: -len(".weight")] + ".scale_weight", torch.float32, (),
                                lambda part=part: part(1)))
            else:
                entries.append((COMFY_PREFIX + k, dtype, shapes[k], make))
        entries.append((COMFY_PREFIX + "scaled_fp8", torch.float8_e4m3fn, (0,), lambda: torch.empty(0)))
    else:
        entries = _diffusers_entries(config, shapes, bfl, dtype)
    if layout != "diffusers" or path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, entries, {"format": "pt"})
        return path
    return _write_diffusers_folder(path, config, entries)


def _diffusers_entries(config: FluxConfig, shapes: Mapping[str, tuple[int, ...]],
                       bfl: Mapping[str, Callable[[], Tensor]], dtype: torch.dtype
                       ) -> list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], Tensor]]]:
    entries = []
    for r in diffusers_renames(config.depth, config.depth_single_blocks, config.guidance_embed, config.qkv_bias):
        full = shapes[r.bfl]
        h = config.hidden_size
        sizes = [full[0]] if len(r.diffusers) == 1 else [h, h, h, full[0] - 3 * h][: len(r.diffusers)]

        def make(r: Rename = r, i: int = 0, sizes: list[int] = sizes) -> Tensor:
            t = bfl[r.bfl]()
            t = swap_halves(t) if r.swap_halves else t
            return torch.split(t, sizes, dim=0)[i].clone()

        for i, name in enumerate(r.diffusers):
            entries.append((name, dtype, (sizes[i], *full[1:]), lambda make=make, i=i: make(i=i)))
    return entries


def _write_diffusers_folder(root: Path, config: FluxConfig, entries: list) -> Path:
    folder = root / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    half = len(entries) // 2
    shards = [entries[:half], entries[half:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard, {"format": "pt"})
        weight_map.update({e[0]: file for e in shard})
    total = sum(e[1].itemsize * int(torch.Size(e[2]).numel()) for e in entries)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks, "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads, "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim, "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim)}, indent=1))
    return root
