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

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"
DEFAULT_LABELS = ("normal", "nsfw")
DEFAULT_LAYER_NORM_EPS = 1e-12
DEFAULT_HEAD_DIM = 64
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

_GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


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
