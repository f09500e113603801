"""Model files -> light handles that load their model on first use (the loader node's outputs, and the
classifier of the safety check).

A handle is cheap to make (KreaModelLoader returns at once, and ComfyUI can cache it); `load()` builds the
torch module the first time and reuses it afterwards for the same file, dtype and device; `ready()` puts
it on its device before use. How a loaded model is kept is the host's (`host.models`, holding.py): inside
ComfyUI in the handle's own slot under a ModelPatcher, outside it in the one model cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model_loader import load_autoencoder, load_safety_checker, load_text_encoders
from .host import ModelSlot, file_key, host


@dataclass(frozen=True)
class TextEncoderHandle:
    """KREA_TEXT_ENCODER: the CLIP-L and T5-XXL files (and where their tokenizers are)."""
    clip_path: Path
    t5_path: Path
    tokenizer_dir: Path | None
    device: torch.device
    slot: ModelSlot = field(default_factory=ModelSlot, compare=False, repr=False)

    def load(self):
        # The host's own tokenizer folders (ComfyUI ships CLIP's and T5's) are the last place searched.
        shipped = host.shipped_tokenizer_dirs()
        key = (file_key(self.clip_path), file_key(self.t5_path), str(self.tokenizer_dir), str(self.device))
        return host.models.keep(
            self.slot, "text_encoder", key,
            lambda: load_text_encoders(self.clip_path, self.t5_path, self.tokenizer_dir, self.device,
                                       extra_tokenizer_dirs=[shipped] if shipped else []),
            lambda encoders: torch.nn.ModuleDict({"clip": encoders.clip, "t5": encoders.t5}))

    def ready(self) -> None:
        host.models.ready(self.slot)


@dataclass(frozen=True)
class VaeHandle:
    """KREA_VAE: the autoencoder file; it computes on `device`, its weights wait on `weights_device` (default:
    the same; inside ComfyUI the VAE's offload device)."""
    path: Path
    device: torch.device
    weights_device: torch.device | None = None
    slot: ModelSlot = field(default_factory=ModelSlot, compare=False, repr=False)

    def load(self):
        weights_device = self.weights_device if self.weights_device is not None else self.device
        key = (file_key(self.path), str(self.device))
        return host.models.keep(self.slot, "vae", key,
                                lambda: load_autoencoder(self.path, weights_device, self.device),
                                # A container: ModelPatcher sets attributes (device, ...) on the module it manages.
                                lambda vae: torch.nn.ModuleDict({"autoencoder": vae}))

    def ready(self, memory_required: int = 0) -> None:
        host.models.ready(self.slot, memory_required)


@dataclass(frozen=True)
class SafetyCheckerHandle:
    """The NSFW classifier file; a config.json beside it (or inside a model folder) is read with it."""
    path: Path
    device: torch.device
    slot: ModelSlot = field(default_factory=ModelSlot, compare=False, repr=False)

    def load(self):
        config_json = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        # A config.json added or edited later changes the model (labels, heads), so it must reload it.
        config_key = file_key(config_json) if config_json.is_file() else None
        key = (file_key(self.path), config_key, str(self.device))
        # No loader node holds the classifier: one for every safety check of the same file (shared).
        return host.models.keep(self.slot, "safety_checker", key, lambda: load_safety_checker(self.path, self.device),
                                lambda checker: checker.model, shared=True)

    def ready(self) -> None:
        host.models.ready(self.slot)
