"""FLUX's two text encoders: files on disk -> CLIP-L + T5-XXL + tokenizers -> prompt embeddings.

`load_text_encoders` opens both files memory-mapped (header checks, file-type checks, sizes read off the
shapes), builds the models on the meta device and assigns the mapped tensors, so the weights are never held
twice. The encoders live on the CPU. `TextEncoders.encode` on a GPU copies one layer's weights at a time to
it, runs the layer and drops the copy, so encoding needs about one layer of GPU memory (~0.4 GB for T5-XXL
in fp16) and leaves nothing behind for the transformer to compete with.

Accepted files: `clip_l.safetensors` (keys under `text_model.`, maybe `text_projection.weight`, ignored),
a transformers 5.x CLIPTextModel state dict (no prefix), `t5xxl_fp16.safetensors` (`shared.weight` only),
ComfyUI's `t5xxl_fp8_e4m3fn_scaled.safetensors` (fp8 weights with per-tensor `scale_weight`), encoder-only
T5 GGUF files (`t5-v1_1-xxl-encoder-Q8_0.gguf`: llama.cpp's names; block-quantized Linear weights stay
quantized, a quantized embedding is dequantized to fp16), and the `text_encoder/` / `text_encoder_2/`
folders of a diffusers model (sharded, with an index), or its root.
`clip_weights` / `t5_weights` give the same checked tensors under the released files' names, for another
implementation of the encoders (ComfyUI's own, inside ComfyUI; a GGUF file's tensors dequantized to fp16).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..checkpoints import Checkpoint, FileKind, RenamedSource, first_keys, identify, open_checkpoint
from ..compute_dtypes import text_encoder_compute_dtype
from ..errors import ModelFileError
from ..operations import CastOps, QuantizedLinear, QuantizedOps
from .clip import CLIPTextConfig, CLIPTextModel, build_clip
from .clip import config_from_checkpoint as clip_config_from_checkpoint
from .t5 import EMBEDDING_KEYS, T5EncoderConfig, T5EncoderModel, build_t5, transformers_name
from .t5 import config_from_checkpoint as t5_config_from_checkpoint
from .tokenization import FixedLengthTokenizer, find_tokenizer_folders, load_clip_tokenizer, load_t5_tokenizer

log = logging.getLogger(__name__)

_CLIP_MARK = "embeddings.token_embedding.weight"
_CLIP_LAYER = "encoder.layers.0.self_attn.q_proj.weight"
_T5_MARK = "encoder.final_layer_norm.weight"
_T5_BLOCK = "encoder.block.0.layer.0.SelfAttention.q.weight"
# Per-tensor weight scales (real weight = stored * scale): ComfyUI's scaled-fp8 files, and its newer naming.
_SCALE_NAMES = ("scale_weight", "weight_scale")


def _wrong_encoder(ckpt: Checkpoint, expected: FileKind, swapped_hint: str, pick_hint: str) -> ModelFileError:
    """`ckpt` is not the `expected` encoder: say what it is, and which file to pick (`swapped_hint` when it is
    the other encoder of the pair)."""
    keys = ckpt.keys()
    kind = identify(keys)
    looks = f"{kind.description} (first keys: {first_keys(keys)})" if kind is FileKind.UNKNOWN else kind.description
    other = FileKind.T5_TEXT if expected is FileKind.CLIP_TEXT else FileKind.CLIP_TEXT
    hint = swapped_hint if kind is other else pick_hint
    return ModelFileError(f"{ckpt.path} is not a {expected.short}: it looks like {looks}.{hint}", found=kind,
                          expected=expected)


def _prefix_of(keys: Iterable[str], mark: str, ckpt: Checkpoint, companion: str) -> str | None:
    """The prefix under which `mark` (and `companion`) are stored, e.g. '' or 'text_model.'."""
    for key in keys:
        if key.endswith(mark):
            prefix = key[: -len(mark)]
            if prefix + companion in ckpt:
                return prefix
    return None


# ---------------------------------------------------------------------------------------------------- loading

def _file_tensors(model: nn.Module, ckpt: Checkpoint, key_in_file: Callable[[str], str],
                  what: str) -> dict[str, str]:
    """Each of `model`'s (meta-device) tensor names -> its key in the file; refuses an incomplete file or one of
    other shapes."""
    expected = model.state_dict()
    keys = {name: key_in_file(name) for name in expected}
    missing = [key for key in keys.values() if key not in ckpt]
    if missing:
        raise ModelFileError(
            f"{ckpt.path} lacks {len(missing)} of the {len(expected)} weights of {what} "
            f"(first: {', '.join(missing[:3])}). The file is incomplete or another variant; download it again."
        )
    for name, meta in expected.items():
        if tuple(ckpt.shape(keys[name])) != tuple(meta.shape):
            raise ModelFileError(
                f"{ckpt.path}: {keys[name]} has shape {tuple(ckpt.shape(keys[name]))}, {what} needs "
                f"{tuple(meta.shape)}. The file is damaged or of another model."
            )
    return keys


def _load_weights(model: nn.Module, ckpt: Checkpoint, key_in_file: Callable[[str], str], what: str) -> None:
    """Assign the checkpoint's memory-mapped tensors to the meta-device `model` (no copies).

    `*.scale_weight` tensors of ComfyUI's scaled-fp8 files (`*.weight_scale` in its newer files) go to the
    owning CastLinear's `set_scale`; a scaled weight of any other module is dequantized on load.
    """
    scalable = {name: m for name, m in model.named_modules() if hasattr(m, "set_scale")}
    modules = dict(model.named_modules())
    quant_type = getattr(ckpt, "quant_type", None)  # GGUF files: which tensors are block-quantized
    state: dict[str, torch.Tensor] = {}
    scales: list[tuple[nn.Module, torch.Tensor]] = []
    for name, file_key in _file_tensors(model, ckpt, key_in_file, what).items():
        owner, _, leaf = name.rpartition(".")
        quant = quant_type(file_key) if quant_type is not None else None
        if quant is not None:
            module = modules.get(owner)
            if leaf == "weight" and isinstance(module, QuantizedLinear):
                module.hold_quantized(quant)  # kept as the file's blocks, dequantized per call
                state[name] = ckpt.raw(file_key)
            else:  # an embedding: looked up, not multiplied; dequantized once, in fp16 (T5's own dtype)
                state[name] = ckpt.tensor(file_key).to(torch.float16)
            continue
        tensor = ckpt.tensor(file_key)
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
    return _clip_from(open_checkpoint(path, "text_encoder"), operations)


def _clip_prefix(ckpt: Checkpoint) -> str:
    prefix = _prefix_of(ckpt.keys(), _CLIP_MARK, ckpt, _CLIP_LAYER)
    if prefix is None:
        raise _wrong_encoder(ckpt, FileKind.CLIP_TEXT,
                             " Pick it as the T5 file and clip_l.safetensors as the CLIP file.",
                             " Pick clip_l.safetensors (CLIP-L) as the CLIP file.")
    return prefix


def _clip_from(ckpt: Checkpoint, operations) -> CLIPTextModel:
    prefix = _clip_prefix(ckpt)
    config = clip_config_from_checkpoint(ckpt, prefix)
    if config.width != 768 and config.layers >= 12:  # a full-size CLIP of another kind (CLIP-G, CLIP-H)
        log.warning("%s is a CLIP text encoder of width %d; FLUX expects CLIP-L (768).", ckpt.path, config.width)
    model = build_clip(config, operations)
    _load_weights(model, ckpt, lambda name: prefix + name[len("text_model."):], "a CLIP text encoder")
    log.info("Loaded CLIP text encoder %s: %d layers, width %d, %s.", ckpt.path, config.layers, config.width,
             _stored_dtype(model))
    return model


def clip_weights(path: str | os.PathLike[str]) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """The CLIP text encoder of any file or folder `load_clip_model` takes, for another implementation of it
    (ComfyUI's): its config and its memory-mapped tensors named as in `clip_l.safetensors` (`text_model.*`,
    checked complete; `text_projection.weight` too when the file has it)."""
    ckpt = open_checkpoint(path, "text_encoder")
    prefix = _clip_prefix(ckpt)
    config = clip_config_from_checkpoint(ckpt, prefix)
    keys = _file_tensors(build_clip(config), ckpt, lambda name: prefix + name[len("text_model."):],
                         "a CLIP text encoder")
    tensors = {name: ckpt.tensor(key) for name, key in keys.items()}
    projection = prefix.removesuffix("text_model.") + "text_projection.weight"  # stored beside, unused by FLUX
    if projection in ckpt:
        tensors["text_projection.weight"] = ckpt.tensor(projection)
    return config, tensors


def load_t5_model(path: str | os.PathLike[str], operations=CastOps) -> T5EncoderModel:
    """T5 v1.1 encoder from a file (fp16/bf16/fp32 or ComfyUI scaled fp8) or a diffusers folder."""
    return _t5_from(open_checkpoint(path, "text_encoder_2"), operations)


def _t5_source(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint under transformers' names: a GGUF file in llama.cpp's names renamed, others as they are."""
    if any(k.startswith("enc.blk.") for k in ckpt.keys()):
        return RenamedSource(ckpt, {transformers_name(k): k for k in ckpt.keys()})
    return ckpt


def _t5_prefix(ckpt: Checkpoint) -> str:
    prefix = _prefix_of(ckpt.keys(), _T5_MARK, ckpt, _T5_BLOCK)
    if prefix is None:
        raise _wrong_encoder(ckpt, FileKind.T5_TEXT,
                             " Pick it as the CLIP file and t5xxl_fp16.safetensors as the T5 file.",
                             " Pick t5xxl_fp16.safetensors (or the fp8 one) as the T5 file.")
    return prefix


def _t5_keys(ckpt: Checkpoint, prefix: str) -> Callable[[str], str]:
    """The model's tensor name -> the file's key (the token embedding is stored as either of its tied names)."""
    embedding = next(prefix + k for k in EMBEDDING_KEYS if prefix + k in ckpt)
    return lambda name: embedding if name == "shared.weight" else prefix + name


def _t5_from(ckpt: Checkpoint, operations) -> T5EncoderModel:
    source = _t5_source(ckpt)
    if source is not ckpt:  # a GGUF file: its block-quantized Linear weights stay quantized
        ckpt, operations = source, QuantizedOps
    keys = ckpt.keys()
    prefix = _t5_prefix(ckpt)
    config = t5_config_from_checkpoint(ckpt, prefix)
    model = build_t5(config, operations)
    _load_weights(model, ckpt, _t5_keys(ckpt, prefix), "a T5 encoder")
    log.info("Loaded T5 encoder %s: %d blocks, d_model %d, %s%s.", ckpt.path, config.layers, config.d_model,
             _stored_dtype(model), " (scaled fp8)" if any(k.endswith("scale_weight") for k in keys) else "")
    return model


def t5_weights(path: str | os.PathLike[str]) -> tuple[T5EncoderConfig, dict[str, torch.Tensor]]:
    """The T5 encoder of any file or folder `load_t5_model` takes, for another implementation of it (ComfyUI's):
    its config and its memory-mapped tensors under transformers' T5EncoderModel names (`shared.weight`,
    `encoder.*`), checked complete, with what a scaled-fp8 file stores beside them (`*.scale_weight`, the
    `scaled_fp8` marker) as stored; an encoder-only GGUF file's quantized tensors dequantized to fp16."""
    ckpt = _t5_source(open_checkpoint(path, "text_encoder_2"))
    prefix = _t5_prefix(ckpt)
    config = t5_config_from_checkpoint(ckpt, prefix)
    keys = _file_tensors(build_t5(config), ckpt, _t5_keys(ckpt, prefix), "a T5 encoder")
    quant_type = getattr(ckpt, "quant_type", None)

    def read(key: str) -> torch.Tensor:  # a GGUF file's quantized tensor comes dequantized: fp16, T5's own dtype
        tensor = ckpt.tensor(key)
        return tensor.to(torch.float16) if quant_type is not None and quant_type(key) else tensor

    stored = {key: read(key) for key in ckpt.keys() if key.startswith(prefix)}  # each read once
    # Whatever else is stored beside the weights (scales, the file-wide marker) under its own name.
    tensors = {key[len(prefix):]: tensor for key, tensor in stored.items()}
    tensors.update((name, stored[key]) for name, key in keys.items())
    return config, tensors


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


class TextEncoders:
    """CLIP-L + T5 with their tokenizers. `encode(prompts)` -> (t5 (B, 512, 4096), pooled (B, 768)), CPU float32."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, clip_tokenizer: FixedLengthTokenizer,
                 t5_tokenizer: FixedLengthTokenizer, device: torch.device) -> None:
        self.clip = clip
        self.t5 = t5
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.device = torch.device(device)
        self.clip_dtype = text_encoder_compute_dtype(self.device, _stored_dtype(clip))
        self.t5_dtype = text_encoder_compute_dtype(self.device, _stored_dtype(t5))

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
    clip_file, t5_file = open_checkpoint(clip_path, "text_encoder"), open_checkpoint(t5_path, "text_encoder_2")
    clip, t5 = _clip_from(clip_file, operations), _t5_from(t5_file, operations)
    # The tokenizers are looked for beside the file or folder each encoder was found in.
    folders = find_tokenizer_folders(tokenizer_dir, clip_file.path, t5_file.path, extra_tokenizer_dirs)
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


