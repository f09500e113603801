"""Model files -> light handles that load their model on first use (the loader node's outputs, and the
classifier of the safety check).

A handle is cheap to make (KreaModelLoader returns at once, and ComfyUI can cache it); `load()` builds the
torch module the first time and reuses it afterwards for the same file, dtype and device; `ready()` puts
it on its device before use.

Inside ComfyUI the handle itself holds what it loaded, under a plain ModelPatcher that `ready()` loads with
`load_models_gpu`: ComfyUI unloads it to make room for other models and frees it with the node outputs it
caches, and the pack keeps no reference of its own (the safety check's classifier aside: it has no loader
node, so the module-level cache keeps it, under its ModelPatcher). Outside ComfyUI that module-level cache
keeps the most recent model of each kind, so switching files does not pile up models in memory.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model_loader import ModelFileError
from . import host
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
        model = _build(build)
        _loaded[kind] = (key, model)
        return model


class Held:
    """Inside ComfyUI: what one handle loaded, and the ModelPatcher ComfyUI manages it with."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.model: Any = None
        self.patcher: Any = None


def held_load(held: Held, kind: str, key: tuple[Any, ...], build: Callable[[], Any],
              modules: Callable[[Any], torch.nn.Module], keep_globally: bool = False) -> Any:
    """`build()` once per key. Outside ComfyUI through the module-level cache; inside, kept by `held` (and by
    the module-level cache too with `keep_globally`) under a ModelPatcher over `modules(model)`."""
    if not host.IN_COMFYUI:
        return cached_load(kind, key, build)
    if held.key != key:
        held.key, held.model, held.patcher = None, None, None

        def build_managed() -> tuple[Any, Any]:
            model = _build(build)
            load_device, offload_device = host.model_devices(kind)
            return model, host.models.managed_model(modules(model), load_device, offload_device)

        model, patcher = cached_load(kind, key, build_managed) if keep_globally else build_managed()
        held.key, held.model, held.patcher = key, model, patcher
    return held.model


def held_ready(held: Held, memory_required: int = 0) -> None:
    """Inside ComfyUI: let ComfyUI make room and load the held model onto its device before use."""
    if host.IN_COMFYUI and held.patcher is not None:
        host.models.load_for_use(held.patcher, memory_required)


def _build(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except ModelFileError as err:
        raise with_folders(err) from None


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
    held: Held = field(default_factory=Held, compare=False, repr=False)

    def load(self):
        from ..model_loader import load_text_encoders

        # Inside ComfyUI its shipped tokenizer folders are the last place searched.
        shipped = host.comfyui_tokenizer_dirs()
        key = (_file_key(self.clip_path), _file_key(self.t5_path), str(self.tokenizer_dir), str(self.device))
        return held_load(
            self.held, "text_encoder", key,
            lambda: load_text_encoders(self.clip_path, self.t5_path, self.tokenizer_dir, self.device,
                                       extra_tokenizer_dirs=[shipped] if shipped else []),
            lambda encoders: torch.nn.ModuleDict({"clip": encoders.clip, "t5": encoders.t5}))

    def ready(self) -> None:
        held_ready(self.held)


@dataclass(frozen=True)
class VaeHandle:
    """KREA_VAE: the autoencoder file."""
    path: Path
    device: torch.device
    held: Held = field(default_factory=Held, compare=False, repr=False)

    def load(self):
        from ..model_loader import load_autoencoder

        compute_device, weights_device = host.model_devices("vae")
        key = (_file_key(self.path), str(self.device))
        if not host.IN_COMFYUI:
            compute_device = weights_device = self.device
        return held_load(self.held, "vae", key,
                         lambda: load_autoencoder(self.path, weights_device, compute_device),
                         # A container: ModelPatcher sets attributes (device, ...) on the module it manages.
                         lambda vae: torch.nn.ModuleDict({"autoencoder": vae}))

    def ready(self, memory_required: int = 0) -> None:
        held_ready(self.held, memory_required)


@dataclass(frozen=True)
class SafetyCheckerHandle:
    """The NSFW classifier file; a config.json beside it (or inside a model folder) is read with it."""
    path: Path
    device: torch.device
    held: Held = field(default_factory=Held, compare=False, repr=False)

    def load(self):
        from ..model_loader import load_safety_checker

        config_json = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        # A config.json added or edited later changes the model (labels, heads), so it must reload it.
        config_key = _file_key(config_json) if config_json.is_file() else None
        key = (_file_key(self.path), config_key, str(self.device))
        return held_load(self.held, "safety_checker", key, lambda: load_safety_checker(self.path, self.device),
                         lambda checker: checker.model, keep_globally=True)

    def ready(self) -> None:
        held_ready(self.held)
