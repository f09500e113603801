"""Model files -> light handles that load their model on first use (the loader node's outputs, and the
classifier of the safety check).

A handle is cheap to make (KreaModelLoader returns at once, and ComfyUI can cache it); `load()` builds the
torch module the first time and reuses it afterwards for the same file, dtype and device. Only the most
recent model of each kind is kept, so switching files does not pile up models in memory.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model_loader import ModelFileError
from .host import with_folders

_lock = threading.Lock()
_loaded: dict[str, tuple[tuple[Any, ...], Any]] = {}  # kind -> (key, model)


def cached_load(kind: str, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """The model of `kind` for `key`, built once; a new key replaces the previous model of that kind."""
    with _lock:
        held = _loaded.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        _loaded.pop(kind, None)  # drop the old model before building the new one
        try:
            model = build()
        except ModelFileError as err:
            raise with_folders(err) from None
        _loaded[kind] = (key, model)
        return model


def forget_loaded() -> None:
    """Drop every cached model (tests, and ComfyUI's 'free memory')."""
    with _lock:
        _loaded.clear()


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class TransformerHandle:
    """MODEL outside ComfyUI: the FLUX transformer file and how to hold its weights, loaded on first use."""
    path: Path
    weight_dtype: str
    device: torch.device

    def load(self):
        from ..model_loader import load_flux

        key = (_file_key(self.path), self.weight_dtype, str(self.device))
        return cached_load("transformer", key, lambda: load_flux(self.path, self.weight_dtype, self.device))


@dataclass(frozen=True)
class TextEncoderHandle:
    """KREA_TEXT_ENCODER: the CLIP-L and T5-XXL files (and where their tokenizers are)."""
    clip_path: Path
    t5_path: Path
    tokenizer_dir: Path | None
    device: torch.device

    def load(self):
        from ..model_loader import load_text_encoders
        from .host import comfyui_tokenizer_dirs

        # Inside ComfyUI its shipped tokenizer folders are the last place searched.
        shipped = comfyui_tokenizer_dirs()
        key = (_file_key(self.clip_path), _file_key(self.t5_path), str(self.tokenizer_dir), str(self.device))
        return cached_load(
            "text_encoder", key,
            lambda: load_text_encoders(self.clip_path, self.t5_path, self.tokenizer_dir, self.device,
                                       extra_tokenizer_dirs=[shipped] if shipped else []),
        )


@dataclass(frozen=True)
class VaeHandle:
    """KREA_VAE: the autoencoder file."""
    path: Path
    device: torch.device

    def load(self):
        from ..model_loader import load_autoencoder

        key = (_file_key(self.path), str(self.device))
        return cached_load("vae", key, lambda: load_autoencoder(self.path, self.device))


@dataclass(frozen=True)
class SafetyCheckerHandle:
    """The NSFW classifier file; a config.json beside it (or inside a model folder) is read with it."""
    path: Path
    device: torch.device

    def load(self):
        from ..model_loader import load_safety_checker

        config_json = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        # A config.json added or edited later changes the model (labels, heads), so it must reload it.
        config_key = _file_key(config_json) if config_json.is_file() else None
        key = (_file_key(self.path), config_key, str(self.device))
        return cached_load("safety_checker", key, lambda: load_safety_checker(self.path, self.device))
