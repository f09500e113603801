"""Model files -> what the loader hands out outside ComfyUI as MODEL, CLIP and VAE: handles that load the pack's own
modules on first use, through the one model cache, and what the pack's nodes do with them.

A handle is cheap to make (the loader returns at once); `load()` builds the torch module the first time and
reuses it afterwards for the same file, dtype and device (holding.py `cached_load`: the latest model of each kind).
Inside ComfyUI the loader hands out ComfyUI's own types instead (comfyui_models.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ...model_loader import load_autoencoder, load_flux, load_text_encoders
from ...model_loader.autoencoder.model import InterruptCheck
from ...model_loader.flux import config_from_checkpoint
from ...model_loader.lora import LoraChoice, plan_lora, read_lora, set_loras
from .holding import cached_load, file_key

TileProgress = Callable[[int, int], None]  # update(done, total), once per VAE tile
Handle = TypeVar("Handle")


@dataclass(frozen=True)
class TransformerHandle:
    """MODEL outside ComfyUI: the FLUX transformer file, how to hold its weights and the LoRAs to merge into them,
    loaded on first use."""
    path: Path
    weight_dtype: str
    device: torch.device
    loras: tuple[LoraChoice, ...] = ()  # in the order the workflow applies them

    def load(self):
        # The base is cached without its LoRAs: another set is merged into the same module (set_loras puts the
        # previous set's layers back first), so changing LoRAs never reads the base file again.
        key = (file_key(self.path), self.weight_dtype, str(self.device))
        module = cached_load("transformer", key, lambda: load_flux(self.path, self.weight_dtype, self.device))
        return set_loras(module, self.loras)

    def with_lora(self, path: Path, strength: float) -> TransformerHandle:
        """This MODEL with one more LoRA after its others. The file is checked against the base's header (format,
        layers, shapes) first; nothing loads."""
        plan_lora(read_lora(path), config_from_checkpoint(self.path))
        return dataclasses.replace(self, loras=(*self.loras, LoraChoice(path, strength)))


@dataclass(frozen=True)
class TextEncoderHandle:
    """CLIP outside ComfyUI: the CLIP-L and T5-XXL files, the tokenizer folder the user named (None: beside the
    files) and the host's own tokenizer folders ({"clip": ..., "t5": ...}), searched last."""
    clip_path: Path
    t5_path: Path
    tokenizer_dir: Path | None
    device: torch.device
    shipped_tokenizers: Mapping[str, Path] | None = None

    def load(self):
        key = (file_key(self.clip_path), file_key(self.t5_path), str(self.tokenizer_dir), str(self.device),
               str(self.shipped_tokenizers))
        return cached_load("text_encoder", key, lambda: load_text_encoders(
            self.clip_path, self.t5_path, self.tokenizer_dir, self.device,
            extra_tokenizer_dirs=[self.shipped_tokenizers] if self.shipped_tokenizers else []))

    def encode(self, prompt: str) -> list:
        """CONDITIONING: [[T5 sequence (1, 512, 4096), {"pooled_output": CLIP pooled (1, 768)}]] on the CPU."""
        sequence, pooled = self.load().encode([prompt])
        return [[sequence, {"pooled_output": pooled}]]


@dataclass(frozen=True)
class VaeHandle:
    """VAE outside ComfyUI: the autoencoder file; it computes on `device`."""
    path: Path
    device: torch.device

    def load(self):
        key = (file_key(self.path), str(self.device))
        return cached_load("vae", key, lambda: load_autoencoder(self.path, self.device))

    def encode(self, images: torch.Tensor, progress: TileProgress,
               interrupt: InterruptCheck | None = None) -> torch.Tensor:
        """IMAGE (B, H, W, 3) in 0..1, sides multiples of 8 -> raw latents (B, 16, H/8, W/8) float32;
        `interrupt` is checked before every block of every tile."""
        pixels = images.permute(0, 3, 1, 2) * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.load().encode(pixels, callback=progress, interrupt=interrupt)

    def decode(self, latents: torch.Tensor, progress: TileProgress,
               interrupt: InterruptCheck | None = None) -> torch.Tensor:
        """Raw latents (B, 16, h, w) -> IMAGE (B, 8h, 8w, 3) float32 in 0..1 on the CPU."""
        pixels = self.load().decode(latents.float(), callback=progress, interrupt=interrupt)  # (B, 3, H, W)
        images = ((pixels + 1.0) * 0.5).clamp_(0.0, 1.0).permute(0, 2, 3, 1)
        return images.to("cpu", torch.float32).contiguous()


def as_handle(value: object, kind: type[Handle], input_name: str) -> Handle:
    """`value` when it is a handle of `kind`, else the error naming the input and what to connect."""
    if isinstance(value, kind):
        return value
    source = {TextEncoderHandle: "the text_encoder output of Krea Model Loader",
              VaeHandle: "the vae output of Krea Model Loader"}[kind]
    raise ValueError(f"{input_name} must be {source}; got {type(value).__name__}.")
