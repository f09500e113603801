"""Image files <-> IMAGE tensors, without ComfyUI: saving with the workflow embedded, and reading input images.

`save` writes what Krea Save Image saves (metadata as ComfyUI writes it, never a half-written file); `load`
reads an image file into IMAGE and MASK as ComfyUI's LoadImage does, for the server-less runner.
"""
