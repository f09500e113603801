"""Krea node pack: FLUX.1 Krea [dev] for ComfyUI. Exports only; nothing heavy happens at import."""

WEB_DIRECTORY = "./web"

# ComfyUI and pip import this file as a package. pytest, when the checkout's folder name is not a valid
# module name (e.g. "comfyui-krea"), imports it as a lone module for its package node: no parent package,
# so no relative imports and nothing to export then (tests import the pip-installed `comfyui_krea`).
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.host import host

    host.register_routes()  # inside ComfyUI: fal's protocol under /fal of its server; elsewhere nothing

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
