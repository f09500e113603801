"""The classifier file of the safety check -> a light handle that loads its model on first use.

`load()` builds the torch module the first time and reuses it afterwards for the same file and device; `ready()`
puts it on its device before use. How a loaded model is kept is the host's (`host.models`, holding.py): inside
ComfyUI under a ModelPatcher, outside it in the one model cache. (The loader's MODEL, CLIP and VAE are the host's:
`host.transformer_model`, `text_encoder_model`, `vae_model`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model_loader import load_safety_checker
from .host import ModelSlot, file_key, host


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
