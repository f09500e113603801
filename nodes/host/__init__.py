"""The host the pack runs in, chosen once, here: ComfyUI's when its modules import, else the standalone one.

Everything the nodes need from where they run (model folders, devices, progress and cancel, save paths, how
models are held) they ask of `host`, an implementation of the Host interface (interface.py): comfyui_host.py
inside ComfyUI (with comfyui_models.py and fal_queue.py the only code that imports ComfyUI), standalone_host.py
for the command line, the fal server and tests. Nothing else in the pack asks which one it is.
"""
from __future__ import annotations

from .folders import KIND_FOLDERS, MODEL_FOLDERS, model_name_problem, with_folders
from .holding import ModelSlot, file_key, forget_loaded
from .interface import Host, LoadedTransformer
from .standalone_host import Interrupted, StandaloneHost
from .standalone_models import TextEncoderHandle, TransformerHandle, VaeHandle


def _comfyui_importable() -> bool:
    try:  # ComfyUI's modules are importable only when the pack runs inside it.
        import comfy.model_management  # type: ignore[import-not-found]  # noqa: F401
        import folder_paths  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


IN_COMFYUI = _comfyui_importable()

if IN_COMFYUI:
    from .comfyui_host import ComfyHost

    host: Host = ComfyHost()
else:
    host = StandaloneHost()


def standalone_host() -> StandaloneHost:
    """The host outside ComfyUI, whose folders and callbacks the command line and `serve` set."""
    if not isinstance(host, StandaloneHost):
        raise RuntimeError("the pack runs inside ComfyUI here: its folders and devices are ComfyUI's, not set "
                           "by the command line")
    return host


__all__ = ["IN_COMFYUI", "KIND_FOLDERS", "MODEL_FOLDERS", "Host", "Interrupted", "LoadedTransformer", "ModelSlot",
           "StandaloneHost", "TextEncoderHandle", "TransformerHandle", "VaeHandle", "file_key", "forget_loaded", "host",
           "model_name_problem", "standalone_host", "with_folders"]
