"""The NSFW image classifier behind the safety check: a ViT with the layout of Falconsai/nsfw_image_detection.

The checkpoint is Hugging Face's `ViTForImageClassification` as saved on disk (`vit.embeddings.*`,
`vit.encoder.layer.N.attention.attention.query.*`, ..., `vit.layernorm.*`, `classifier.*`); the module
attribute names below ARE those keys, so the file loads strictly with no remapping. Width, depth, patch and
image size are read off the tensor shapes; heads, labels, layer-norm epsilon and activation come from a
`config.json` beside the file when there is one (Falconsai ships one), else from ViT's defaults
(64-wide heads, labels normal/nsfw, eps 1e-12, exact GELU).

Preprocessing is that model's `ViTImageProcessor` (preprocessor_config.json: resize to 224x224 with PIL
bilinear, rescale 1/255, normalize mean = std = 0.5) applied to the 8-bit image a user would save: an
IMAGE in 0..1 is rounded to uint8 as diffusers' `numpy_to_pil` does, resized by Pillow itself, and
rescaled in float64 then cast to float32 as transformers does, so `pixel_values` are bit-identical to
the PIL-backend processor's. (torch's antialiased bilinear differs from Pillow by one grey level in up to
a quarter of the pixels when upscaling, so Pillow is used rather than imitated.)
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import ModelFileError
from .safetensors_file import Checkpoint

log = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"
DEFAULT_LABELS = ("normal", "nsfw")
DEFAULT_LAYER_NORM_EPS = 1e-12
DEFAULT_HEAD_DIM = 64
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
WHERE_TO_GET_IT = ("the model.safetensors of Falconsai/nsfw_image_detection, saved as "
                   "nsfw_image_detection.safetensors (the name the shipped workflows use; its config.json "
                   "beside it is optional)")

_GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_LAYER_KEY = re.compile(r"^vit\.encoder\.layer\.(\d+)\.")
# Keys a ViTForImageClassification file may hold that this classifier does not use.
_IGNORED_PREFIXES = ("vit.pooler.",)


@dataclass(frozen=True)
class SafetyCheckerConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    labels: tuple[str, ...] = DEFAULT_LABELS
    layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def nsfw_index(self) -> int:
        lowered = [label.lower() for label in self.labels]
        if NSFW_LABEL not in lowered:
            raise ValueError(f"labels {list(self.labels)} have no {NSFW_LABEL!r} label")
        return lowered.index(NSFW_LABEL)


# Falconsai/nsfw_image_detection: ViT-base/16 at 224 px (85.8M parameters).
FALCONSAI_NSFW_CONFIG = SafetyCheckerConfig(
    hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=16, image_size=224)
# A tiny classifier for demos: heads = hidden / 64, so its file needs no config.json.
DEMO_SAFETY_CONFIG = SafetyCheckerConfig(
    hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128, patch_size=16, image_size=224)


# ---------------------------------------------------------------------------------------------------------
# Model (attribute names = checkpoint keys)


class _PatchEmbeddings(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.projection = operations.Conv2d(config.num_channels, config.hidden_size,
                                            kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, C, S, S) -> (B, (S/p)^2, hidden), patches in row-major order
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(config, operations)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings


class _SelfAttention(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.query = operations.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = operations.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = operations.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, D/heads)
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return out.transpose(1, 2).reshape(b, n, d)


class _Dense(nn.Module):
    """A module holding one `dense` Linear, so that keys read `...output.dense.weight`."""

    def __init__(self, in_features: int, out_features: int, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.dense = operations.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class _Attention(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.attention = _SelfAttention(config, operations)
        self.output = _Dense(config.hidden_size, config.hidden_size, operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.layernorm_before = operations.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = _Attention(config, operations)
        self.layernorm_after = operations.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = _Dense(config.hidden_size, config.intermediate_size, operations)
        self.output = _Dense(config.intermediate_size, config.hidden_size, operations)
        self.gelu_approximation = _GELU_APPROXIMATION[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        hidden = F.gelu(self.intermediate(self.layernorm_after(x)), approximate=self.gelu_approximation)
        return x + self.output(hidden)


class _Encoder(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_EncoderLayer(config, operations) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


class _ViT(nn.Module):
    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config, operations)
        self.encoder = _Encoder(config, operations)
        self.layernorm = operations.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


class ViTImageClassifier(nn.Module):
    """ViTForImageClassification: logits from the final-norm state of the [CLS] token."""

    def __init__(self, config: SafetyCheckerConfig, operations: types.SimpleNamespace = nn) -> None:
        super().__init__()
        self.config = config
        self.vit = _ViT(config, operations)
        self.classifier = operations.Linear(config.hidden_size, len(config.labels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, S, S) normalized -> logits (B, num_labels)."""
        return self.classifier(self.vit(pixel_values)[:, 0])


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) floats in 0..1 -> uint8 RGB (B, H, W, 3), rounded as diffusers' numpy_to_pil does."""
    if images.ndim != 4:
        raise ValueError(f"images must be an IMAGE batch (B, H, W, C); got a tensor of shape {tuple(images.shape)}.")
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]  # the colour of an RGBA image, as Pillow's RGBA -> RGB conversion keeps it
    elif channels != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels in the last dimension; got {channels}.")
    images = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0)
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) in 0..1 -> pixel_values (B, 3, S, S) float32: ViTImageProcessor's exact output."""
    resized = []
    for rgb in to_uint8(images).numpy():
        picture = Image.fromarray(np.ascontiguousarray(rgb))  # (H, W, 3) uint8 -> RGB
        resized.append(np.asarray(picture.resize((image_size, image_size), Image.Resampling.BILINEAR)))
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    # transformers rescales in float64 and casts to float32, then normalizes in float32
    scaled = (pixels.to(torch.float64) * (1.0 / 255.0)).to(torch.float32)
    return (scaled - PIXEL_MEAN) / PIXEL_STD


# ---------------------------------------------------------------------------------------------------------
# The checker


class SafetyChecker:
    """A loaded NSFW classifier: images in, P(nsfw) per image out."""

    def __init__(self, model: ViTImageClassifier, device: torch.device, source: Path) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.source = source

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, self.config.image_size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE (B, H, W, C) in 0..1 -> logits (B, num_labels) float32 on the CPU."""
        pixel_values = self.pixel_values(images).to(self.device)
        with torch.inference_mode():
            return self.model(pixel_values).float().cpu()

    def nsfw_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE (B, H, W, C) in 0..1, any size -> P(nsfw) (B,) float32 on the CPU."""
        if images.shape[0] == 0:
            return torch.zeros(0)
        return torch.softmax(self.logits(images), dim=-1)[:, self.config.nsfw_index]


# ---------------------------------------------------------------------------------------------------------
# Loading


def _describe_other_model(keys: list[str]) -> str | None:
    """What a checkpoint that is not a ViT image classifier looks like, when it can be told."""
    key_set = set(keys)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    def starts(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("lora_") or has(".lora.") or has("lora_A") or has("lora_down"):
        return "a LoRA (it belongs in models/loras)"
    if has("double_blocks.") or has("single_blocks.") or has("single_transformer_blocks."):
        return "the FLUX transformer (a diffusion model; it belongs in models/diffusion_models)"
    if (has("decoder.conv_in.") or has("encoder.conv_in.") or starts("first_stage_model.")
            or has("post_quant_conv.")):
        return "a VAE / autoencoder (it belongs in models/vae)"
    if starts("model.diffusion_model.") or has("input_blocks.") or has("down_blocks.0.resnets"):
        return "a diffusion model's UNet or transformer (it belongs in models/diffusion_models)"
    if has("concept_embeds") or has("special_care_embeds"):
        return ("the CLIP-based Stable Diffusion safety checker (CompVis/stable-diffusion-safety-checker), "
                "which this node does not run")
    if has("vision_model.") or starts("visual.") or has("image_encoder."):
        return "a CLIP vision model (an image encoder, not an NSFW classifier)"
    if has("SelfAttention.") or "shared.weight" in key_set or has("encoder.block."):
        return "a T5 text encoder (it belongs in models/text_encoders)"
    if has("text_model.") or has("token_embedding.") or has("text_projection"):
        return "a CLIP text encoder (it belongs in models/text_encoders)"
    if has("embeddings.cls_token") and not has("classifier.weight"):
        return "a ViT backbone without a classification head (ViTModel), not an NSFW classifier"
    return None


def _not_a_classifier(path: Path, keys: list[str]) -> ModelFileError:
    what = _describe_other_model(keys)
    sample = ", ".join(repr(k) for k in sorted(keys)[:3])
    looks = f"It looks like {what}." if what else f"Its {len(keys)} tensors ({sample}, ...) are not a ViT's."
    return ModelFileError(
        f"{path} is not an NSFW image classifier (ViTForImageClassification). {looks} "
        f"Put {WHERE_TO_GET_IT} in models/safety_checker and pick it in the node."
    )


def _config_json_path(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / "config.json"


def _read_config_json(path: Path, hidden_size: int, num_layers: int) -> dict:
    """The HF config.json beside the file (or in its folder), when it describes this checkpoint."""
    config_path = _config_json_path(path)
    if not config_path.is_file():
        return {}
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("Ignoring %s: it is not readable JSON (%s).", config_path, error)
        return {}
    if not isinstance(data, dict):
        log.warning("Ignoring %s: it is not a model config.", config_path)
        return {}
    # A config.json of another model in the same folder must not change this one.
    if data.get("hidden_size", hidden_size) != hidden_size or data.get("num_hidden_layers", num_layers) != num_layers:
        log.warning("Ignoring %s: it describes another model (hidden_size %s, %s layers; the file has %s, %s).",
                    config_path, data.get("hidden_size"), data.get("num_hidden_layers"), hidden_size, num_layers)
        return {}
    return data


def _labels_from(id2label: object, num_labels: int, path: Path) -> tuple[str, ...]:
    if not isinstance(id2label, dict):
        raise ModelFileError(f"{path}: config.json has an id2label that is not a mapping ({id2label!r}).")
    try:
        by_index = {int(i): str(label) for i, label in id2label.items()}
    except ValueError:
        raise ModelFileError(f"{path}: config.json id2label has keys that are not label indices.") from None
    if sorted(by_index) != list(range(num_labels)):
        raise ModelFileError(
            f"{path}: config.json names labels {sorted(by_index)} but the classifier has {num_labels} outputs.")
    return tuple(by_index[i] for i in range(num_labels))


def read_safety_checker_config(checkpoint: Checkpoint) -> SafetyCheckerConfig:
    """The classifier's config, read off the tensor shapes and the config.json beside the file."""
    path = checkpoint.path
    keys = checkpoint.keys()
    required = ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight")
    if not all(k in checkpoint for k in required):
        raise _not_a_classifier(path, keys)

    hidden_size = checkpoint.shape("vit.embeddings.cls_token")[-1]
    _, num_channels, patch_h, patch_w = checkpoint.shape("vit.embeddings.patch_embeddings.projection.weight")
    num_positions = checkpoint.shape("vit.embeddings.position_embeddings")[1]
    grid = math.isqrt(num_positions - 1)
    if patch_h != patch_w or grid * grid != num_positions - 1:
        raise ModelFileError(
            f"{path}: a ViT with {patch_h}x{patch_w} patches and {num_positions - 1} position embeddings is not "
            f"a square-image classifier like Falconsai/nsfw_image_detection; this node cannot run it.")
    layer_ids = sorted({int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ModelFileError(f"{path}: the ViT encoder layers are missing or not numbered 0..N-1 ({layer_ids[:8]}).")
    num_layers = len(layer_ids)
    intermediate_size = checkpoint.shape("vit.encoder.layer.0.intermediate.dense.weight")[0] \
        if "vit.encoder.layer.0.intermediate.dense.weight" in checkpoint else 4 * hidden_size
    num_labels = checkpoint.shape("classifier.weight")[0]

    hf = _read_config_json(path, hidden_size, num_layers)
    try:
        num_heads = int(hf.get("num_attention_heads", 0)) or max(1, hidden_size // DEFAULT_HEAD_DIM)
        layer_norm_eps = float(hf.get("layer_norm_eps", DEFAULT_LAYER_NORM_EPS))
    except (TypeError, ValueError):
        raise ModelFileError(f"{_config_json_path(path)}: num_attention_heads or layer_norm_eps is not a number; "
                             f"fix or remove that config.json.") from None
    if num_heads < 1 or hidden_size % num_heads:
        raise ModelFileError(
            f"{path}: hidden size {hidden_size} does not split into {num_heads} attention heads; put the model's "
            f"config.json (with num_attention_heads) beside the file.")
    if "id2label" in hf:
        labels = _labels_from(hf["id2label"], num_labels, path)
    elif num_labels == len(DEFAULT_LABELS):
        labels = DEFAULT_LABELS
    else:
        raise ModelFileError(
            f"{path}: the classifier has {num_labels} labels and no config.json names them; this node needs a "
            f"two-label normal/nsfw classifier such as Falconsai/nsfw_image_detection.")
    if NSFW_LABEL not in (label.lower() for label in labels):
        raise ModelFileError(
            f"{path} classifies images into {list(labels)[:10]}, with no {NSFW_LABEL!r} label: it is another image "
            f"classifier. Put {WHERE_TO_GET_IT} in models/safety_checker.")
    hidden_act = str(hf.get("hidden_act", "gelu"))
    if hidden_act not in _GELU_APPROXIMATION:
        raise ModelFileError(f"{path}: config.json asks for activation {hidden_act!r}; only GELU ViTs are supported.")
    return SafetyCheckerConfig(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        patch_size=patch_h,
        image_size=grid * patch_h,
        num_channels=num_channels,
        labels=labels,
        layer_norm_eps=layer_norm_eps,
        qkv_bias="vit.encoder.layer.0.attention.attention.query.bias" in checkpoint,
        hidden_act=hidden_act,
    )


def load_safety_checker(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> SafetyChecker:
    """Load an NSFW classifier file (or HF model folder) onto `device`; weights are computed in float32.

    The module is built on the meta device and its parameters are the memory-mapped tensors of the file
    (float32 files on the CPU hold no second copy); other dtypes or devices are converted tensor by tensor.
    """
    path = Path(path)
    device = torch.device(device)
    checkpoint = Checkpoint(path)
    config = read_safety_checker_config(checkpoint)
    with torch.device("meta"):
        model = ViTImageClassifier(config)
    expected = set(model.state_dict())
    present = {k for k in checkpoint.keys() if not k.startswith(_IGNORED_PREFIXES)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        what = _describe_other_model(checkpoint.keys())
        looks = f" It looks like {what}." if what else ""
        raise ModelFileError(
            f"{path} is not a complete ViT image classifier: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.{looks} "
            f"Put {WHERE_TO_GET_IT} in models/safety_checker.")
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(expected):
        if checkpoint.shape(key) != expected_shapes[key]:
            raise ModelFileError(
                f"{path}: tensor {key!r} has shape {checkpoint.shape(key)}, expected {expected_shapes[key]}: "
                f"the file is damaged or of another model.")
        if not checkpoint.dtype(key).is_floating_point:
            raise ModelFileError(f"{path}: tensor {key!r} is {checkpoint.dtype(key)}, not a floating-point weight.")
    state = {k: checkpoint.tensor(k).to(device=device, dtype=torch.float32) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    log.info("Loaded the NSFW classifier %s (%d layers, hidden %d, %d heads, labels %s) on %s.",
             path, config.num_layers, config.hidden_size, config.num_heads, list(config.labels), device)
    return SafetyChecker(model, device, path)


# ---------------------------------------------------------------------------------------------------------
# Random checkpoints (tests, the CLI demo)


def random_safety_state_dict(config: SafetyCheckerConfig, seed: int = 0,
                             bias_towards: str | None = None) -> dict[str, torch.Tensor]:
    """Random weights in the checkpoint layout, scaled so that logits are O(1) and depend on the image.

    `bias_towards` ("nsfw", "normal", or any label): a head that always says that label (zero classifier
    weight, bias +12 for it and -12 for the others, so its probability rounds to 1 in float32).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    h, inner, p, c = config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels
    state: dict[str, torch.Tensor] = {
        "vit.embeddings.cls_token": normal(1, 1, h, std=0.5),
        "vit.embeddings.position_embeddings": normal(1, config.num_patches + 1, h, std=0.5),
        "vit.embeddings.patch_embeddings.projection.weight": normal(h, c, p, p, std=1.0 / math.sqrt(c * p * p)),
        "vit.embeddings.patch_embeddings.projection.bias": normal(h, std=0.1),
    }

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        state[f"{name}.weight"] = normal(fan_out, fan_in, std=1.0 / math.sqrt(fan_in))
        if bias:
            state[f"{name}.bias"] = normal(fan_out, std=0.1)

    def layer_norm(name: str) -> None:
        state[f"{name}.weight"] = 1.0 + normal(h, std=0.1)
        state[f"{name}.bias"] = normal(h, std=0.1)

    for i in range(config.num_layers):
        block = f"vit.encoder.layer.{i}"
        for projection in ("query", "key", "value"):
            linear(f"{block}.attention.attention.{projection}", h, h, bias=config.qkv_bias)
        linear(f"{block}.attention.output.dense", h, h)
        linear(f"{block}.intermediate.dense", h, inner)
        linear(f"{block}.output.dense", inner, h)
        layer_norm(f"{block}.layernorm_before")
        layer_norm(f"{block}.layernorm_after")
    layer_norm("vit.layernorm")
    num_labels = len(config.labels)
    linear("classifier", h, num_labels)
    if bias_towards is not None:
        if bias_towards not in config.labels:
            raise ValueError(f"bias_towards must be one of the labels {list(config.labels)}; got {bias_towards!r}.")
        state["classifier.weight"] = torch.zeros(num_labels, h)
        state["classifier.bias"] = torch.full((num_labels,), -12.0)
        state["classifier.bias"][config.labels.index(bias_towards)] = 12.0
    return {k: v.contiguous() for k, v in state.items()}


def hf_config_json(config: SafetyCheckerConfig) -> dict:
    """The transformers ViTConfig (config.json) of a classifier."""
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): label for i, label in enumerate(config.labels)},
        "label2id": {label: i for i, label in enumerate(config.labels)},
    }


def _needs_config_json(config: SafetyCheckerConfig) -> bool:
    defaults = SafetyCheckerConfig(**{**asdict(config), "num_heads": max(1, config.hidden_size // DEFAULT_HEAD_DIM),
                                      "labels": DEFAULT_LABELS, "layer_norm_eps": DEFAULT_LAYER_NORM_EPS,
                                      "hidden_act": "gelu"})
    return defaults != config


def write_random_safety_checkpoint(path: str | os.PathLike[str], config: SafetyCheckerConfig, seed: int = 0,
                                   bias_towards: str | None = None,
                                   write_config_json: bool | None = None) -> Path:
    """Write a random classifier in the Falconsai file layout to `path` (a .safetensors file).

    A config.json is written beside it when `write_config_json` is True, or (None) when the shapes alone
    would not give back `config` (heads other than hidden/64, other labels, eps or activation).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_safety_state_dict(config, seed, bias_towards)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
    if write_config_json or (write_config_json is None and _needs_config_json(config)):
        _config_json_path(path).write_text(json.dumps(hf_config_json(config), indent=2), encoding="utf-8")
    return path
