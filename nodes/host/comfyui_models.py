"""Model files -> what the loader hands out inside ComfyUI: the pack's transformer as ComfyUI's own MODEL (what the
sampler gets), the text encoders and VAE as ComfyUI's own CLIP and VAE; and the pack's nodes on those.

The transformer file is loaded with ComfyUI's layer classes (`comfy.ops`, chosen for how the weights are
stored) onto ComfyUI's offload device, and put at `diffusion_model` of a `comfy.model_base.Flux`, so that
its weights read `diffusion_model.double_blocks.N...` and ComfyUI's LoRA key maps, partial loading, `/free`
and out-of-memory recovery treat it as they treat ComfyUI's own FLUX. The text encoders and the VAE are
ComfyUI's own models (`comfy.sd.CLIP` of type FLUX and `comfy.sd.VAE`, as DualCLIPLoader and VAELoader make
them), built from the tensors the pack's readers find in any file the pack accepts, so ComfyUI's text, VAE,
inpainting and LoRA nodes take them. Nothing here subclasses or patches ModelPatcher or
model_management, and the pack keeps no reference of its own to the models it hands out.

A GGUF file's quantized weights are held by the pack's QuantizedLinear (ComfyUI has no GGUF layers), which
follows comfy.ops' contract; ComfyUI streams them like its own, and applies a LoRA to a streamed layer's
dequantized weight at each call. A LoRA on a resident quantized layer cannot be merged into its blocks, so
the MODEL carries two ModelPatcher callbacks (kept by its clones): after each load, every patched quantized
layer whose patches are all plain LoRAs (ComfyUI's LoRAAdapter: no mid, DoRA or reshape, strength_model 1) gets
them as low-rank factors beside its matmul (ComfyUI's scale: strength x alpha / rank, rows from the patch's
offset); any other patch list gets ComfyUI's own patch function, applied to the dequantized weight at each call.
On detach both are removed.
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
import comfy.sd  # type: ignore[import-not-found]
import comfy.supported_models  # type: ignore[import-not-found]
import comfy.text_encoders.flux  # type: ignore[import-not-found]
import comfy.weight_adapter  # type: ignore[import-not-found]
import folder_paths  # type: ignore[import-not-found]
import torch

from ...model_loader import LATENT_CHANNELS, FluxTransformer, ModelFileError, load_flux
from ...model_loader.autoencoder import FLUX_AUTOENCODER, autoencoder_weights
from ...model_loader.flux import variant_problem
from ...model_loader.lora.beside import LowRankAdapter, Piece
from ...model_loader.operations import OperationsFor, QuantizedLinear, QuantizedOps, WeightStorage
from ...model_loader.text_encoders import CLIP_L, T5EncoderConfig, clip_weights, t5_weights
from ...model_loader.text_encoders.tokenization import T5_MAX_LENGTH, FixedLengthTokenizer
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


def _low_rank_pieces(patches: list, out_features: int) -> list[Piece] | None:
    """ComfyUI's patch list of one Linear weight as low-rank pieces (row offset, up, down, scale) with its
    calculate_weight's arithmetic (weight[rows] += strength * alpha / rank * up @ down); None unless every patch is a
    plain LoRA on rows of the weight."""
    pieces = []
    for strength, adapter, strength_model, offset, function in patches:
        if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter) or strength_model != 1.0 or function is not None:
            return None
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if mid is not None or dora_scale is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
            return None
        if offset is not None and offset[0] != 0:
            return None
        row_start = offset[1] if offset is not None else 0
        if up.shape[0] != (offset[2] if offset is not None else out_features):
            return None
        scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        pieces.append((row_start, up, down, scale))
    return pieces


def _patch_resident(patcher: Any, *load_args: Any) -> None:
    """After a load: every quantized layer with patches in this MODEL runs them where ComfyUI's merge (set_weight)
    could not: plain LoRAs as low-rank factors beside its matmul, other patches through ComfyUI's own patch
    function (LowVramPatch: the same calculate_weight) on its dequantized weight at each call. A layer ComfyUI
    streams uses the patch it put in weight_function instead."""
    dtype = getattr(patcher.model.diffusion_model, "compute_dtype", torch.float32)
    for key, layer in _quantized_layers(patcher):
        layer.resident_weight_function, layer.resident_adapters = [], []
        pieces = _low_rank_pieces(patcher.patches[key], layer.out_features) if key in patcher.patches else None
        if pieces:
            layer.resident_adapters = [LowRankAdapter(layer.out_features, pieces, patcher.load_device, dtype)]
        elif key in patcher.patches:
            layer.resident_weight_function = [comfy.model_patcher.LowVramPatch(
                key, patcher.patches, layer.convert_weight, layer.set_weight)]
        layer.merge_requested = False


def _unpatch_resident(patcher: Any, *detach_args: Any) -> None:
    for _, layer in _quantized_layers(patcher):
        layer.resident_weight_function, layer.resident_adapters = [], []
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
    """A plain ModelPatcher over the pack's safety classifier."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_for_use(patcher: Any, memory_required: int) -> None:
    """Let ComfyUI make room and put the model on its device (fully, or partially when it does not fit)."""
    model_management.load_models_gpu([patcher], memory_required=memory_required)


# ------------------------------------------------------------------------------ the text encoders and the VAE

def t5_size_options(t5: T5EncoderConfig) -> dict[str, dict]:
    """ComfyUI's model option giving its T5 these sizes (it reads them from its own config file otherwise; the
    released T5-XXL files have exactly those)."""
    return {"t5xxl_model_config": {
        "d_model": t5.d_model, "d_kv": t5.d_kv, "num_heads": t5.heads, "d_ff": t5.d_ff, "num_layers": t5.layers,
        "vocab_size": t5.vocab_size, "relative_attention_num_buckets": t5.relative_buckets}}


def flux_clip(clip_path: str | os.PathLike[str], t5_path: str | os.PathLike[str]) -> Any:
    """ComfyUI's own FLUX text encoders (a `comfy.sd.CLIP`, as DualCLIPLoader with type flux makes it), its T5 sized
    as the file is and padded to 512 tokens by ComfyUI's own tokenization too (ComfyUI pads FLUX's to 256; BFL,
    diffusers and fal use 512 for FLUX.1 [dev]), so ComfyUI's text nodes give fal's sequence length."""
    clip_config, clip_tensors = clip_weights(clip_path)
    if clip_config != CLIP_L:  # ComfyUI 0.3.64 builds CLIP-L at its one size (it overrides a size given to it)
        raise ModelFileError(f"{clip_path} is a CLIP text encoder of another size ({clip_config.layers} layers of "
                             f"width {clip_config.width}); FLUX uses CLIP-L: pick clip_l.safetensors.")
    t5_config, t5_tensors = t5_weights(t5_path)
    clip = comfy.sd.load_text_encoder_state_dicts(
        [clip_tensors, t5_tensors], embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=comfy.sd.CLIPType.FLUX, model_options=t5_size_options(t5_config))
    clip.set_tokenizer_option("t5xxl_min_length", T5_MAX_LENGTH)
    return clip


def flux_vae(path: str | os.PathLike[str]) -> Any:
    """ComfyUI's own VAE (a `comfy.sd.VAE`, as VAELoader makes it) of FLUX's autoencoder file."""
    config, tensors = autoencoder_weights(path)
    if config != FLUX_AUTOENCODER:  # ComfyUI builds this one shape for a 16-channel autoencoder
        raise ModelFileError(f"{path} is an autoencoder of another size ({config}); FLUX's is ae.safetensors "
                             f"(widths {FLUX_AUTOENCODER.level_channels}). Pick that file.")
    vae = comfy.sd.VAE(sd=tensors)
    vae.throw_exception_if_invalid()
    return vae


def flux_clip_input(clip: Any) -> Any:
    """`clip` when it holds FLUX's text encoders (CLIP-L + T5-XXL), else the error saying what to connect."""
    inner = getattr(clip, "cond_stage_model", None)
    if not isinstance(clip, comfy.sd.CLIP) or not isinstance(inner, comfy.text_encoders.flux.FluxClipModel):
        what = type(inner).__name__ if inner is not None else type(clip).__name__
        raise ValueError(f"text_encoder must hold FLUX's text encoders (CLIP-L and T5-XXL): Krea Model Loader's "
                         f"text_encoder, or DualCLIPLoader with type flux. The connected one is {what}.")
    return clip


def flux_vae_input(vae: Any) -> Any:
    """`vae` when it is FLUX's autoencoder (16 latent channels, 8x), else the error saying what to connect."""
    if not isinstance(vae, comfy.sd.VAE) or vae.latent_channels != LATENT_CHANNELS or vae.latent_dim != 2 \
            or vae.spacial_compression_decode() != 8:
        what = (f"a VAE with {vae.latent_channels} latent channels" if isinstance(vae, comfy.sd.VAE)
                else type(vae).__name__)
        raise ValueError(f"vae must be FLUX's autoencoder ({LATENT_CHANNELS} latent channels): Krea Model Loader's "
                         f"vae, or VAELoader with ae.safetensors. The connected one is {what}.")
    return vae


def encode_prompt(clip: Any, prompt: str, tokenizers: tuple[FixedLengthTokenizer, FixedLengthTokenizer]) -> list:
    """CONDITIONING for `prompt` from ComfyUI's FLUX CLIP, with the pack's tokenizers' ids (diffusers' and fal's:
    T5 512 tokens, CLIP 77, the text taken literally) instead of ComfyUI's prompt syntax; ComfyUI encodes them
    (its LoRA patches and hooks on the CLIP apply)."""
    clip = flux_clip_input(clip)
    clip_tokenizer, t5_tokenizer = tokenizers
    tokens = {"l": [[(int(i), 1.0) for i in clip_tokenizer([prompt]).ids[0]]],
              "t5xxl": [[(int(i), 1.0) for i in t5_tokenizer([prompt]).ids[0]]]}
    return clip.encode_from_tokens_scheduled(tokens)


def encode_pixels(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in 0..1 -> raw latents (B, 16, H/8, W/8), as VAEEncode does."""
    return flux_vae_input(vae).encode(images)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, 16, h, w) -> IMAGE (B, 8h, 8w, 3) in 0..1 on the CPU, as VAEDecode does."""
    return flux_vae_input(vae).decode(latents).to("cpu", torch.float32).contiguous()
