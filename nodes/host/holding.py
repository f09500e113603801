"""Built models -> kept for reuse, the way the host wants them kept: the pack's one model cache, and the two
ways of holding a handle's model (`host.models`).

Outside ComfyUI (`LatestPerKind`) the module-level cache keeps the most recent model of each kind, so switching
files does not pile up models in memory. Inside ComfyUI (`UnderPatchers`) each handle holds what it loaded in its
own ModelSlot, under a plain ModelPatcher that ComfyUI loads, unloads and frees with the node outputs it caches;
the pack keeps no reference of its own (except with `shared`: the safety check's classifier has no loader node,
so the module-level cache keeps it, under its ModelPatcher). Neither imports ComfyUI: the ComfyUI host hands
`UnderPatchers` the two calls into ComfyUI's model management it needs.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ...model_loader import ModelFileError
from ...model_loader.checkpoints import file_identity
from .folders import with_folders

_lock = threading.Lock()
_loaded: dict[str, tuple[tuple[Any, ...], Any]] = {}  # kind -> (key, model)

Build = Callable[[], Any]
Modules = Callable[[Any], torch.nn.Module]  # a built model -> the module its ModelPatcher manages


file_key = file_identity  # what tells one model file from another: its resolved path, size and modification time


class ModelSlot:
    """What one holder loaded (inside ComfyUI): the key it was built for, the model and its ModelPatcher (when
    the pack made one). Holders: a handle, or a loader node (ComfyUI keeps one node instance per graph node)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.model: Any = None
        self.patcher: Any = None


def kept(slot: ModelSlot, key: tuple[Any, ...], build: Build) -> Any:
    """The model built for `key`, kept in `slot`: built again only for another key, after the old one was
    dropped (never two at once). A wrong file's error is raised as it is (the loader adds the folders)."""
    if slot.key != key:
        slot.key, slot.model, slot.patcher = None, None, None
        slot.model = build()
        slot.key = key
    return slot.model


def cached_load(kind: str, key: tuple[Any, ...], build: Build) -> Any:
    """The model of `kind` for `key`, built once; a new key replaces the previous model of that kind."""
    with _lock:
        held = _loaded.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        _loaded.pop(kind, None)  # drop the old model before building the new one
        model = build_model(build)
        _loaded[kind] = (key, model)
        return model


def forget_loaded() -> None:
    """Drop every model the module-level cache keeps (tests put the cache back as it was with it)."""
    with _lock:
        _loaded.clear()


def build_model(build: Build) -> Any:
    """`build()`, with a wrong file's error ending in the folders it and the right one belong in."""
    try:
        return build()
    except ModelFileError as err:
        raise with_folders(err) from None


class ModelHolding(Protocol):
    """How the host keeps the models that handles load (`host.models`)."""

    def keep(self, slot: ModelSlot, kind: str, key: tuple[Any, ...], build: Build, modules: Modules,
             shared: bool = False) -> Any:
        """The model of `kind` for `key`, built once; `shared`: one for every handle of the same key."""
        ...

    def ready(self, slot: ModelSlot, memory_required: int = 0) -> None:
        """Make room for the slot's model and put it on its device before use."""
        ...


class LatestPerKind:
    """Outside ComfyUI: the module-level cache; models already sit on their device."""

    def keep(self, slot: ModelSlot, kind: str, key: tuple[Any, ...], build: Build, modules: Modules,
             shared: bool = False) -> Any:
        return cached_load(kind, key, build)

    def ready(self, slot: ModelSlot, memory_required: int = 0) -> None:
        return None


Devices = Callable[[str], tuple[torch.device, torch.device]]  # kind -> (compute device, offload device)


class UnderPatchers:
    """Inside ComfyUI: each slot's model under its own ModelPatcher, made by `manage(module, load device, offload
    device)` and loaded for use by `load_for_use(patcher, memory_required)` (ComfyUI's load_models_gpu)."""

    def __init__(self, manage: Callable[[torch.nn.Module, torch.device, torch.device], Any],
                 load_for_use: Callable[[Any, int], None], devices: Devices) -> None:
        self.manage = manage
        self.load_for_use = load_for_use
        self.devices = devices

    def keep(self, slot: ModelSlot, kind: str, key: tuple[Any, ...], build: Build, modules: Modules,
             shared: bool = False) -> Any:
        if slot.key != key:
            slot.key, slot.model, slot.patcher = None, None, None

            def build_managed() -> tuple[Any, Any]:
                model = build_model(build)
                load_device, offload_device = self.devices(kind)
                return model, self.manage(modules(model), load_device, offload_device)

            model, patcher = cached_load(kind, key, build_managed) if shared else build_managed()
            slot.key, slot.model, slot.patcher = key, model, patcher
        return slot.model

    def ready(self, slot: ModelSlot, memory_required: int = 0) -> None:
        if slot.patcher is not None:
            self.load_for_use(slot.patcher, memory_required)
