"""The pack's transformer as ComfyUI's own MODEL, under ComfyUI's memory management; what the sampler gets.

The transformer file is loaded with ComfyUI's layer classes (`comfy.ops`, chosen for how the weights are
stored) onto ComfyUI's offload device, and put at `diffusion_model` of a `comfy.model_base.Flux`, so that
its weights read `diffusion_model.double_blocks.N...` and ComfyUI's LoRA key maps, partial loading, `/free`
and out-of-memory recovery treat it as they treat ComfyUI's own FLUX. Nothing here subclasses or patches
ModelPatcher or model_management, and the pack keeps no reference of its own to the model it hands out.
Imported only inside ComfyUI (by comfyui_host.py).
"""
from __future__ import annotations

import os
from typing import Any

import comfy.model_base  # type: ignore[import-not-found]
import comfy.model_management as model_management  # type: ignore[import-not-found]
import comfy.model_patcher  # type: ignore[import-not-found]
import comfy.ops  # type: ignore[import-not-found]
import comfy.supported_models  # type: ignore[import-not-found]
import torch

from ...model_loader import FluxTransformer, load_flux
from ...model_loader.flux import variant_problem
from ...model_loader.operations import OperationsFor, WeightStorage
from .interface import LoadedTransformer


def comfy_operations(load_device: torch.device) -> OperationsFor:
    """ComfyUI's layer classes for a storage, as ComfyUI picks them for its own FLUX (comfy.ops.pick_operations):
    its scaled-fp8 layers for per-tensor scaled weights (so LoRA is merged in real units), its fp8 matmul
    layers for fp8_e4m3fn_fast, casting layers where storage and compute dtypes differ."""

    def choose(storage: WeightStorage) -> Any:
        fp8_compute = storage.fast_fp8 and model_management.supports_fp8_compute(load_device)
        if storage.scaled:
            return comfy.ops.scaled_fp8_ops(fp8_matrix_mult=fp8_compute, scale_input=False)
        return comfy.ops.pick_operations(storage.dtype, storage.compute_dtype, load_device=load_device,
                                         fp8_optimizations=storage.fast_fp8)
    return choose


def comfy_default_dtype(load_device: torch.device):
    """What weight_dtype "default" stores a bf16/fp16/fp32 file in: ComfyUI's own choice for its FLUX on this
    device (float32 on a CPU, the file's half dtype on GPUs that compute in it), --bf16-unet and the like
    included, so the pack's model uses what ComfyUI's own would."""
    supported = [torch.bfloat16, torch.float16, torch.float32]  # what ComfyUI's FLUX config supports

    def choose(stored: torch.dtype) -> torch.dtype:
        chosen = model_management.unet_dtype(load_device, supported_dtypes=supported, weight_dtype=stored)
        return chosen if chosen in supported else stored
    return choose


def transformer_model(path: str | os.PathLike[str], weight_dtype: str) -> Any:
    """A standard MODEL (a ModelPatcher) whose diffusion_model IS the pack's transformer, weights on the offload
    device."""
    load_device, offload_device = model_management.get_torch_device(), model_management.unet_offload_device()
    transformer = load_flux(path, weight_dtype, device=offload_device, compute_device=load_device,
                            operations=comfy_operations(load_device), default_dtype=comfy_default_dtype(load_device))
    c = transformer.config
    model_config = comfy.supported_models.Flux({
        "image_model": "flux", "guidance_embed": c.guidance_embed, "in_channels": c.in_channels // 4,
        "out_channels": c.out_channels // 4, "patch_size": 2, "vec_in_dim": c.vec_in_dim,
        "context_in_dim": c.context_in_dim, "hidden_size": c.hidden_size, "mlp_ratio": c.mlp_ratio,
        "num_heads": c.num_heads, "depth": c.depth, "depth_single_blocks": c.depth_single_blocks,
        "axes_dim": list(c.axes_dim), "theta": c.theta, "qkv_bias": c.qkv_bias,
        "disable_unet_model_creation": True,  # the holder gets our transformer instead of building its own
    })
    manual_cast = transformer.compute_dtype if transformer.compute_dtype != transformer.storage_dtype else None
    model_config.set_inference_dtype(transformer.storage_dtype, manual_cast)
    holder = comfy.model_base.Flux(model_config, device=offload_device)
    transformer.dtype = transformer.storage_dtype  # BaseModel.get_dtype() reads diffusion_model.dtype
    holder.diffusion_model = transformer
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)


def describe_model(model: Any) -> str:
    """What a MODEL input holds, for messages ("SDXL", "Flux", ...)."""
    inner = getattr(model, "model", None)
    if inner is None:
        return type(model).__name__
    config = getattr(inner, "model_config", None)
    return f"{type(inner).__name__} ({type(config).__name__})" if config is not None else type(inner).__name__


def load_transformer(model: Any, latent_shape: tuple[int, ...], extra_bytes: int) -> LoadedTransformer:
    """Load a FLUX MODEL for sampling `latent_shape` (B, 16, H/8, W/8) with ComfyUI's memory management:
    other models are unloaded first, and a model that does not fit is loaded partially."""
    holder = getattr(model, "model", None)
    if not isinstance(model, comfy.model_patcher.ModelPatcher) or not isinstance(holder, comfy.model_base.Flux):
        raise ValueError(f"Krea Sampler needs a FLUX.1 MODEL (Krea Model Loader, or ComfyUI's Load Diffusion Model "
                         f"with a FLUX.1 file); the connected model is {describe_model(model)}.")
    # The variant is known from the config ComfyUI holds: refused before any weight moves (unet_config counts
    # latent channels, 2x2 patches packed into each token).
    unet_config = holder.model_config.unet_config
    problem = variant_problem(unet_config.get("in_channels", 16) * unet_config.get("patch_size", 2) ** 2)
    if problem is not None:
        raise ValueError(problem)
    memory_required = holder.memory_required(latent_shape) + extra_bytes
    model_management.load_models_gpu([model], memory_required=memory_required)
    module = holder.diffusion_model
    dtype = holder.manual_cast_dtype or holder.get_dtype()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    return LoadedTransformer(module=module, device=model.load_device, compute_dtype=dtype,
                             is_pack_model=isinstance(module, FluxTransformer),
                             streamed=bool(getattr(holder, "model_lowvram", False)))


def managed_model(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> Any:
    """A plain ModelPatcher over one of the pack's other models (text encoders, VAE, classifier)."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_for_use(patcher: Any, memory_required: int) -> None:
    """Let ComfyUI make room and put the model on its device (fully, or partially when it does not fit)."""
    model_management.load_models_gpu([patcher], memory_required=memory_required)
