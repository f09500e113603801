"""The pack's transformer as ComfyUI's own MODEL, under ComfyUI's memory management; what the sampler gets.

The transformer file is loaded with ComfyUI's layer classes (`comfy.ops`, chosen for how the weights are
stored) onto ComfyUI's offload device, and put at `diffusion_model` of a `comfy.model_base.Flux`, so that
its weights read `diffusion_model.double_blocks.N...` and ComfyUI's LoRA key maps, partial loading, `/free`
and out-of-memory recovery treat it as they treat ComfyUI's own FLUX. Nothing here subclasses or patches
ModelPatcher or model_management, and the pack keeps no reference of its own to the model it hands out.

A GGUF file's quantized weights are held by the pack's QuantizedLinear (ComfyUI has no GGUF layers), which
follows comfy.ops' contract; ComfyUI streams them like its own, and applies a LoRA to a streamed layer's
dequantized weight at each call. A LoRA on a resident quantized layer cannot be merged into its blocks, so
the MODEL carries two ModelPatcher callbacks (kept by its clones): after each load, every patched quantized
layer gets ComfyUI's own patch function to apply at each call; on detach they are removed.
Imported only inside ComfyUI (by comfyui_host.py).
"""
from __future__ import annotations

import os
from typing import Any

import comfy.model_base  # type: ignore[import-not-found]
import comfy.model_management as model_management  # type: ignore[import-not-found]
import comfy.model_patcher  # type: ignore[import-not-found]
import comfy.ops  # type: ignore[import-not-found]
import comfy.patcher_extension  # type: ignore[import-not-found]
import comfy.supported_models  # type: ignore[import-not-found]
import torch

from ...model_loader import FluxTransformer, load_flux
from ...model_loader.operations import OperationsFor, QuantizedLinear, QuantizedOps, WeightStorage
from .interface import LoadedTransformer

_CALLBACK_KEY = "krea_gguf_lora"


def comfy_operations(load_device: torch.device) -> OperationsFor:
    """ComfyUI's layer classes for a storage, as ComfyUI picks them for its own FLUX (comfy.ops.pick_operations):
    its scaled-fp8 layers for per-tensor scaled weights (so LoRA is merged in real units), its fp8 matmul
    layers for fp8_e4m3fn_fast, casting layers where storage and compute dtypes differ."""

    def choose(storage: WeightStorage) -> Any:
        if storage.quantized:  # GGUF blocks: the pack's layers (comfy.ops contract)
            return QuantizedOps
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
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
    if any(isinstance(m, QuantizedLinear) and m.quant_type is not None for m in transformer.modules()):
        patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, _CALLBACK_KEY, _patch_resident)
        patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, _CALLBACK_KEY, _unpatch_resident)
    return patcher


def _quantized_layers(patcher: Any) -> list[tuple[str, QuantizedLinear]]:
    return [(f"{name}.weight", m) for name, m in patcher.model.named_modules()
            if isinstance(m, QuantizedLinear) and m.quant_type is not None]


def _patch_resident(patcher: Any, *load_args: Any) -> None:
    """After a load: every quantized layer with patches in this MODEL applies ComfyUI's own patch function
    (LowVramPatch: the same calculate_weight) to its dequantized weight at each call, where ComfyUI's merge
    (set_weight) could not; a layer ComfyUI streams uses the one it put in weight_function instead."""
    for key, layer in _quantized_layers(patcher):
        layer.resident_weight_function = []
        if key in patcher.patches:
            layer.resident_weight_function = [comfy.model_patcher.LowVramPatch(
                key, patcher.patches, layer.convert_weight, layer.set_weight)]
        layer.merge_requested = False


def _unpatch_resident(patcher: Any, *detach_args: Any) -> None:
    for _, layer in _quantized_layers(patcher):
        layer.resident_weight_function = []
        layer.merge_requested = False


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
