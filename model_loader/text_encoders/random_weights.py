"""Random-weight CLIP-L and T5 encoders in the real key layouts: the fixtures tests and --demo use."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import save_tensors
from ..operations import quantize_fp8
from .clip import CLIPTextConfig, build_clip
from .t5 import T5EncoderConfig, build_t5


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 values of a plausible scale for the weight called `name`."""
    noise = torch.randn(shape, generator=generator)
    if name.endswith(("token_embedding.weight", "shared.weight")):
        return noise
    if name.endswith("position_embedding.weight"):
        return noise * 0.1
    if name.endswith("relative_attention_bias.weight"):
        return noise * 0.5
    if "norm" in name:
        return 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    return noise / shape[-1] ** 0.5  # Linear (out, in)


def _random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, tuple(t.shape), generator) for name, t in model.state_dict().items()}


def _save_sharded(tensors: Mapping[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[index * per_shard:(index + 1) * per_shard]}
        save_tensors(folder / filename, part, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def write_random_clip_checkpoint(path: str | os.PathLike[str], config: CLIPTextConfig, seed: int = 0,
                                 dtype: torch.dtype = torch.float32, layout: str = "hf") -> Path:
    """A random-weight CLIP text encoder in a real key layout; returns the path to load.

    layout "hf": one file, keys under `text_model.` plus `text_projection.weight` (like clip_l.safetensors);
    "transformers": one file, keys as transformers 5.x's CLIPTextModel.state_dict() (no prefix);
    "diffusers": `path` is the `text_encoder/` folder (model.safetensors + config.json).
    """
    path = Path(path)
    state = {k: v.to(dtype) for k, v in _random_state(build_clip(config), seed).items()}
    if layout == "hf":  # as in clip_l.safetensors: the projection FLUX does not use, old files' position_ids
        generator = torch.Generator().manual_seed(seed + 1)
        state["text_projection.weight"] = (torch.randn(config.width, config.width, generator=generator)
                                           / config.width ** 0.5).to(dtype)
        state["text_model.embeddings.position_ids"] = torch.arange(config.positions).unsqueeze(0)
        save_tensors(path, state)
    elif layout == "transformers":
        save_tensors(path, {k[len("text_model."):]: v for k, v in state.items()})
    elif layout == "diffusers":
        save_tensors(path / "model.safetensors", state, {"format": "pt"})
        (path / "config.json").write_text(json.dumps({
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": config.width,
            "intermediate_size": config.intermediate, "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads, "max_position_embeddings": config.positions,
            "vocab_size": config.vocab_size, "hidden_act": "quick_gelu", "eos_token_id": 2,
        }, indent=2))
    else:
        raise ValueError(f"unknown CLIP layout {layout!r} (hf, transformers, diffusers)")
    return path


def write_random_t5_checkpoint(path: str | os.PathLike[str], config: T5EncoderConfig, seed: int = 0,
                               dtype: torch.dtype = torch.float32, layout: str = "hf") -> Path:
    """A random-weight T5 v1.1 encoder in a real key layout; returns the path to load.

    layout "hf": one file with `shared.weight` only (like t5xxl_fp16.safetensors); "transformers": one file,
    transformers 5.x's T5EncoderModel.state_dict() (shared and encoder.embed_tokens); "comfy_fp8_scaled":
    Linear weights in float8_e4m3fn with per-tensor `scale_weight` (+ `scale_input`) and a `scaled_fp8` marker,
    the rest in `dtype`; "diffusers": `path` is the `text_encoder_2/` folder (2 shards + index + config.json).
    """
    path = Path(path)
    model = build_t5(config)
    state = _random_state(model, seed)
    if layout == "comfy_fp8_scaled":
        linear_names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        quantized: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if name in linear_names:
                quantized[name], scale = quantize_fp8(value)
                quantized[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
                quantized[name[: -len("weight")] + "scale_input"] = torch.ones(())
            else:
                quantized[name] = value.to(dtype)
        quantized["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        save_tensors(path, quantized)
        return path
    state = {k: v.to(dtype) for k, v in state.items()}
    if layout == "hf":
        save_tensors(path, state)
    elif layout == "transformers":
        save_tensors(path, {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()})
    elif layout == "diffusers":
        _save_sharded(state, path, shards=2)
        (path / "config.json").write_text(json.dumps({
            "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": config.d_model,
            "d_kv": config.d_kv, "num_heads": config.heads, "d_ff": config.d_ff, "num_layers": config.layers,
            "vocab_size": config.vocab_size, "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": config.relative_buckets,
            "relative_attention_max_distance": config.relative_max_distance,
        }, indent=2))
    else:
        raise ValueError(f"unknown T5 layout {layout!r} (hf, transformers, comfy_fp8_scaled, diffusers)")
    return path
