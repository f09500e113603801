"""Random-weight NSFW classifiers in the Falconsai file layout: the fixtures tests and --demo use."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import save_tensors
from .model import DEFAULT_HEAD_DIM, DEFAULT_LABELS, DEFAULT_LAYER_NORM_EPS, SafetyCheckerConfig


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
    path = Path(path)
    save_tensors(path, random_safety_state_dict(config, seed, bias_towards), {"format": "pt"})
    if write_config_json or (write_config_json is None and _needs_config_json(config)):
        (path.parent / "config.json").write_text(json.dumps(hf_config_json(config), indent=2), encoding="utf-8")
    return path
