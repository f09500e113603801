"""FLUX's two text encoders: files on disk -> CLIP-L + T5-XXL + tokenizers -> prompt embeddings.

`load_text_encoders` opens both files memory-mapped (header checks, file-type checks, sizes read off the
shapes), builds the models on the meta device and assigns the mapped tensors, so the weights are never held
twice. The encoders live on the CPU. `TextEncoders.encode` on a GPU copies one layer's weights at a time to
it, runs the layer and drops the copy, so encoding needs about one layer of GPU memory (~0.4 GB for T5-XXL
in fp16) and leaves nothing behind for the transformer to compete with.

Accepted files: `clip_l.safetensors` (keys under `text_model.`, maybe `text_projection.weight`, ignored),
a transformers 5.x CLIPTextModel state dict (no prefix), `t5xxl_fp16.safetensors` (`shared.weight` only),
ComfyUI's `t5xxl_fp8_e4m3fn_scaled.safetensors` (fp8 weights with per-tensor `scale_weight`), and the
`text_encoder/` / `text_encoder_2/` folders of a diffusers model (sharded, with an index), or its root.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .clip import CLIPTextConfig, CLIPTextModel, build_clip
from .clip import config_from_checkpoint as clip_config_from_checkpoint
from .errors import ModelFileError
from .operations import CastOps
from .safetensors_file import Checkpoint
from .t5 import EMBEDDING_KEYS, T5EncoderConfig, T5EncoderModel, build_t5
from .t5 import config_from_checkpoint as t5_config_from_checkpoint
from .tokenization import FixedLengthTokenizer, find_tokenizer_folders, load_clip_tokenizer, load_t5_tokenizer

log = logging.getLogger(__name__)

_CLIP_MARK = "embeddings.token_embedding.weight"
_CLIP_LAYER = "encoder.layers.0.self_attn.q_proj.weight"
_T5_MARK = "encoder.final_layer_norm.weight"
_T5_BLOCK = "encoder.block.0.layer.0.SelfAttention.q.weight"
# Per-tensor weight scales (real weight = stored * scale): ComfyUI's scaled-fp8 files, and its newer naming.
_SCALE_NAMES = ("scale_weight", "weight_scale")
_SHARD = re.compile(r".+-\d{5}-of-\d{5}\.safetensors$")


# ------------------------------------------------------------------------------------------- what is this file

def describe_checkpoint(keys: Sequence[str]) -> str:
    """A short phrase naming the kind of model the keys belong to ("a FLUX transformer", "a VAE"...)."""
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") and has("single_blocks."):
        return "a FLUX transformer (a diffusion model: it belongs in models/diffusion_models)"
    if has("single_transformer_blocks.") and has("transformer_blocks."):
        return "a FLUX transformer in diffusers layout (a diffusion model: it belongs in models/diffusion_models)"
    if has("lora_") or has(".lora_A.") or has(".lora_down.") or has("lora.down"):
        return "a LoRA"
    if has("input_blocks.") and has("output_blocks."):
        return "a Stable Diffusion UNet checkpoint"
    if has("decoder.up.") or has("decoder.up_blocks.") or has("post_quant_conv"):
        return "a VAE (it belongs in models/vae)"
    if has("vision_model.") or has("classifier.") or has("vit.embeddings"):
        return "an image model (ViT / CLIP vision)"
    if has("encoder.block.") and has("SelfAttention."):
        return "a T5 text encoder"
    if has(_CLIP_MARK) and has("self_attn."):
        return "a CLIP text encoder"
    shown = ", ".join(list(keys)[:3]) or "no tensors"
    return f"no model this pack knows (first keys: {shown})"


def _prefix_of(keys: Iterable[str], mark: str, ckpt: Checkpoint, companion: str) -> str | None:
    """The prefix under which `mark` (and `companion`) are stored, e.g. '' or 'text_model.'."""
    for key in keys:
        if key.endswith(mark):
            prefix = key[: -len(mark)]
            if prefix + companion in ckpt:
                return prefix
    return None


def model_location(path: str | os.PathLike[str], subfolder: str) -> Path:
    """The file or folder holding one text encoder: a diffusers root gives its `subfolder`, a shard of a
    sharded diffusers folder gives the folder."""
    path = Path(path)
    if path.is_dir() and (path / subfolder).is_dir():
        return path / subfolder
    if path.is_file() and _SHARD.match(path.name) and any(path.parent.glob("*.safetensors.index.json")):
        return path.parent
    return path


# ---------------------------------------------------------------------------------------------------- loading

def _load_weights(model: nn.Module, ckpt: Checkpoint, key_in_file: Callable[[str], str], what: str) -> None:
    """Assign the checkpoint's memory-mapped tensors to the meta-device `model` (no copies).

    `*.scale_weight` tensors of ComfyUI's scaled-fp8 files (`*.weight_scale` in its newer files) go to the
    owning CastLinear's `set_scale`; a scaled weight of any other module is dequantized on load.
    """
    expected = model.state_dict()
    missing = [key_in_file(k) for k in expected if key_in_file(k) not in ckpt]
    if missing:
        raise ModelFileError(
            f"{ckpt.path} lacks {len(missing)} of the {len(expected)} weights of {what} "
            f"(first: {', '.join(missing[:3])}). The file is incomplete or another variant; download it again."
        )
    scalable = {name: m for name, m in model.named_modules() if hasattr(m, "set_scale")}
    state: dict[str, torch.Tensor] = {}
    scales: list[tuple[nn.Module, torch.Tensor]] = []
    for name, meta in expected.items():
        file_key = key_in_file(name)
        if tuple(ckpt.shape(file_key)) != tuple(meta.shape):
            raise ModelFileError(
                f"{ckpt.path}: {file_key} has shape {tuple(ckpt.shape(file_key))}, {what} needs "
                f"{tuple(meta.shape)}. The file is damaged or of another model."
            )
        tensor = ckpt.tensor(file_key)
        owner, _, leaf = name.rpartition(".")
        stem = file_key[: -len(leaf)]
        scale_key = next((stem + s for s in _SCALE_NAMES if stem + s in ckpt), None)
        if leaf == "weight" and scale_key is not None:
            scale = ckpt.tensor(scale_key).float()
            if owner in scalable:
                scales.append((scalable[owner], scale))
            else:
                tensor = tensor.float() * scale
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    for module, scale in scales:
        module.set_scale(scale)


def load_clip_model(path: str | os.PathLike[str], operations=CastOps) -> CLIPTextModel:
    """CLIP text tower from a file or diffusers folder (keys with or without `text_model.`)."""
    ckpt = Checkpoint(model_location(path, "text_encoder"))
    keys = ckpt.keys()
    prefix = _prefix_of(keys, _CLIP_MARK, ckpt, _CLIP_LAYER)
    if prefix is None:
        kind = describe_checkpoint(keys)
        hint = (" Pick it as the T5 file (t5_name) and clip_l.safetensors as the CLIP file."
                if kind.startswith("a T5") else " Pick clip_l.safetensors (CLIP-L) as the CLIP file.")
        raise ModelFileError(f"{ckpt.path} is not a CLIP text encoder: it looks like {kind}.{hint}")
    config = clip_config_from_checkpoint(ckpt, prefix)
    if config.width != 768 and config.layers >= 12:  # a full-size CLIP of another kind (CLIP-G, CLIP-H)
        log.warning("%s is a CLIP text encoder of width %d; FLUX expects CLIP-L (768).", ckpt.path, config.width)
    model = build_clip(config, operations)
    _load_weights(model, ckpt, lambda name: prefix + name[len("text_model."):], "a CLIP text encoder")
    log.info("Loaded CLIP text encoder %s: %d layers, width %d, %s.", ckpt.path, config.layers, config.width,
             _stored_dtype(model))
    return model


def load_t5_model(path: str | os.PathLike[str], operations=CastOps) -> T5EncoderModel:
    """T5 v1.1 encoder from a file (fp16/bf16/fp32 or ComfyUI scaled fp8) or a diffusers folder."""
    ckpt = Checkpoint(model_location(path, "text_encoder_2"))
    keys = ckpt.keys()
    prefix = _prefix_of(keys, _T5_MARK, ckpt, _T5_BLOCK)
    if prefix is None:
        kind = describe_checkpoint(keys)
        hint = (" Pick it as the CLIP file (clip_name) and t5xxl_fp16.safetensors as the T5 file."
                if kind.startswith("a CLIP") else " Pick t5xxl_fp16.safetensors (or the fp8 one) as the T5 file.")
        raise ModelFileError(f"{ckpt.path} is not a T5 text encoder: it looks like {kind}.{hint}")
    config = t5_config_from_checkpoint(ckpt, prefix)
    embedding = next(prefix + k for k in EMBEDDING_KEYS if prefix + k in ckpt)
    model = build_t5(config, operations)
    _load_weights(model, ckpt, lambda name: embedding if name == "shared.weight" else prefix + name,
                  "a T5 encoder")
    log.info("Loaded T5 encoder %s: %d blocks, d_model %d, %s%s.", ckpt.path, config.layers, config.d_model,
             _stored_dtype(model), " (scaled fp8)" if any(k.endswith("scale_weight") for k in keys) else "")
    return model


def _stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype holding most of the model's weights."""
    counts: Counter[torch.dtype] = Counter()
    for p in model.parameters():
        counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0]


# ----------------------------------------------------------------------------- running on a GPU, layer by layer

@contextmanager
def weights_streamed_to(device: torch.device, parts: Sequence[nn.Module]) -> Iterator[None]:
    """While active, each part's weights are copied to `device` as the part is called and dropped when it
    returns; the modules keep their CPU (memory-mapped) tensors throughout. No-op when already there."""
    swapped: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

    def bring(module: nn.Module, args) -> None:
        moved = []
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in store.items():
                    if tensor is not None and tensor.device != device:
                        moved.append((store, name, tensor))
                        store[name] = tensor.to(device, non_blocking=True)
        swapped[id(module)] = moved

    def release(module: nn.Module, args, output) -> None:
        for store, name, tensor in swapped.pop(id(module), []):
            store[name] = tensor

    handles = []
    for part in parts:
        handles.append(part.register_forward_pre_hook(bring))
        handles.append(part.register_forward_hook(release))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for moved in swapped.values():  # a part that raised mid-call
            for store, name, tensor in moved:
                store[name] = tensor
        swapped.clear()


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """float32 on the CPU; on CUDA bf16 for bf16 weights, else fp16 (exact for fp16 and fp8 weights;
    the T5 code keeps fp16 from overflowing)."""
    if device.type != "cuda":
        return torch.float32
    if stored == torch.bfloat16 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class TextEncoders:
    """CLIP-L + T5 with their tokenizers. `encode(prompts)` -> (t5 (B, 512, 4096), pooled (B, 768)), CPU float32."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, clip_tokenizer: FixedLengthTokenizer,
                 t5_tokenizer: FixedLengthTokenizer, device: torch.device) -> None:
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.device = torch.device(device)
        self.clip_dtype = compute_dtype(self.device, _stored_dtype(clip))
        self.t5_dtype = compute_dtype(self.device, _stored_dtype(t5))

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        clip_ids = self.clip_tokenizer(prompts).ids.to(self.device)
        t5_ids = self.t5_tokenizer(prompts).ids.to(self.device)
        with torch.no_grad():
            with weights_streamed_to(self.device, self.clip.streamed_parts()):
                _, pooled = self.clip(clip_ids, self.clip_dtype)
            with weights_streamed_to(self.device, self.t5.streamed_parts()):
                sequence = self.t5(t5_ids, self.t5_dtype)
        sequence, pooled = sequence.float().cpu(), pooled.float().cpu()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the per-layer copies back for the transformer
        return sequence, pooled


def load_text_encoders(clip_path: str | os.PathLike[str], t5_path: str | os.PathLike[str],
                       tokenizer_dir: str | os.PathLike[str] | None, device: torch.device, *,
                       extra_tokenizer_dirs: Iterable[Mapping[str, str | os.PathLike[str]]] = (),
                       operations=CastOps) -> TextEncoders:
    """Both encoders and tokenizers. `tokenizer_dir` None: the diffusers `tokenizer/` + `tokenizer_2/` beside
    the model files, then `extra_tokenizer_dirs` ({"clip": folder, "t5": folder} each)."""
    clip_location = model_location(clip_path, "text_encoder")
    t5_location = model_location(t5_path, "text_encoder_2")
    clip = load_clip_model(clip_location, operations)
    t5 = load_t5_model(t5_location, operations)
    folders = find_tokenizer_folders(tokenizer_dir, clip_location, t5_location, extra_tokenizer_dirs)
    clip_tokenizer = load_clip_tokenizer(folders.clip)
    t5_tokenizer = load_t5_tokenizer(folders.t5)
    for name, tokenizer, vocab in (("CLIP", clip_tokenizer, clip.config.vocab_size),
                                   ("T5", t5_tokenizer, t5.config.vocab_size)):
        if tokenizer.vocab_size > vocab:
            raise ModelFileError(
                f"The {name} tokenizer in {tokenizer.source} has {tokenizer.vocab_size} tokens but the {name} "
                f"model has only {vocab} embeddings: the tokenizer belongs to another model."
            )
    return TextEncoders(clip, t5, clip_tokenizer, t5_tokenizer, device)


# --------------------------------------------------------------------------- random checkpoints (tests, --demo)

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


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: a half-written file never carries the final name."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=dict(metadata or {}))
    os.replace(partial, path)


def _save_sharded(tensors: Mapping[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[index * per_shard:(index + 1) * per_shard]}
        _save(part, folder / filename, {"format": "pt"})
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
        _save(state, path)
    elif layout == "transformers":
        _save({k[len("text_model."):]: v for k, v in state.items()}, path)
    elif layout == "diffusers":
        _save(state, path / "model.safetensors", {"format": "pt"})
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
                scale = value.abs().amax().clamp(min=1e-12) / 448.0  # e4m3's largest value
                quantized[name] = (value / scale).to(torch.float8_e4m3fn)
                quantized[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
                quantized[name[: -len("weight")] + "scale_input"] = torch.ones(())
            else:
                quantized[name] = value.to(dtype)
        quantized["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        _save(quantized, path)
        return path
    state = {k: v.to(dtype) for k, v in state.items()}
    if layout == "hf":
        _save(state, path)
    elif layout == "transformers":
        _save({**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()}, path)
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
