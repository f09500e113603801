"""The node classes the server-less runner runs: the pack's nodes and stand-ins for ComfyUI's core LoadImage and
LoadImageMask and LoraLoaderModelOnly.

`PACK_CLASSES` is what `run` and `serve` run workflows with. The fal server's runner hands each request's image
over already decoded (`decoded_image_loader`, `decoded_mask_loader`), so that it is decoded once, when the request
is checked.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image

from ..fal_api.lora_nodes import LORA_LOADER, STRENGTH_RANGE
from ..image_io.load import (
    MASK_CHANNELS,
    ImageFileError,
    channel_mask,
    image_and_mask,
    image_file_problem,
    load_image_file,
    load_mask_file,
)
from ..model_loader import FileKind, ModelFileError
from ..model_loader.lora import read_lora
from ..nodes import NODE_CLASS_MAPPINGS
from ..nodes.host import TransformerHandle, host
from ..nodes.model_files import check_model_file


class LoadImage:
    """Stand-in for ComfyUI's core LoadImage node (IMAGE, MASK) so image-to-image workflows run here too."""
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("STRING", {})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image: str | None = None) -> bool | str:
        # Before any model loads: the file is there, is an image, decodes completely and is within limits.
        if image is None:
            return True
        if not isinstance(image, str):
            return f"image must be the path of an image file, got {image!r}"
        problem = image_file_problem(Path(image))
        return f"image: {problem} (give the input image with --image)" if problem else True

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return load_image_file(Path(image))
        except ImageFileError as err:
            raise ValueError(f"LoadImage: {err} (give the input image with --image).") from None


class LoadImageMask:
    """Stand-in for ComfyUI's core LoadImageMask node (MASK of one channel) so inpainting workflows run here too."""
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("STRING", {}), "channel": (list(MASK_CHANNELS), {})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image: str | None = None) -> bool | str:
        if image is None:
            return True
        if not isinstance(image, str):
            return f"image must be the path of a mask image file, got {image!r}"
        problem = image_file_problem(Path(image))
        return f"image: {problem} (give the mask with --mask)" if problem else True

    def load_image(self, image: str, channel: str) -> tuple[torch.Tensor]:
        try:
            return (load_mask_file(Path(image), channel),)
        except ImageFileError as err:
            raise ValueError(f"LoadImageMask: {err} (give the mask with --mask).") from None


def decoded_image_loader(images: Mapping[str, Image.Image]) -> type:
    """A LoadImage whose `image` input names one of `images` (decoded and checked already): validating it
    decodes nothing, loading it only turns the decoded image into IMAGE and MASK."""

    class LoadDecodedImage(LoadImage):
        @classmethod
        def VALIDATE_INPUTS(cls, image: str | None = None) -> bool | str:
            if image is None or image in images:
                return True
            return f"image: {image!r} is not an image of this request"

        def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
            return image_and_mask(images[image])

    return LoadDecodedImage


def decoded_mask_loader(images: Mapping[str, Image.Image]) -> type:
    """A LoadImageMask whose `image` input names one of `images` (decoded and checked already, as
    decoded_image_loader's)."""

    class LoadDecodedMask(LoadImageMask):
        @classmethod
        def VALIDATE_INPUTS(cls, image: str | None = None) -> bool | str:
            if image is None or image in images:
                return True
            return f"image: {image!r} is not a mask of this request"

        def load_image(self, image: str, channel: str) -> tuple[torch.Tensor]:
            return (channel_mask(images[image], channel),)

    return LoadDecodedMask


class LoraLoaderModelOnly:
    """Stand-in for ComfyUI's core LoraLoaderModelOnly (same inputs, same MODEL out), so that workflows putting
    LoRAs in front of the sampler (`run --lora`, fal's LoRA endpoints) run here too: the LoRA is merged into the
    transformer when the sampler loads it (model_loader/lora), once per set of LoRAs and strengths."""
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        low, high = STRENGTH_RANGE
        return {"required": {"model": ("MODEL",), "lora_name": (host.list_models("loras"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": low, "max": high, "step": 0.01})}}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str | None = None) -> bool | str:
        # Before any model loads: the name stays in the loras folder, the file is there, is a LoRA (header) of a
        # format applied here. Whether it fits the base transformer is checked against the base's header by the
        # pre-flight and again when the node runs (TransformerHandle.with_lora), still before any weights load.
        if lora_name is None:
            return True
        try:
            check_model_file("loras", lora_name, frozenset({FileKind.LORA}), "lora_name")
            read_lora(host.model_path("loras", lora_name))
        except ModelFileError as err:
            return str(err) if str(err).startswith("lora_name") else f"lora_name: {err}"
        return True

    def load_lora_model_only(self, model: object, lora_name: str, strength_model: float) -> tuple[object]:
        if strength_model == 0:  # as ComfyUI: no LoRA at all
            return (model,)
        if not isinstance(model, TransformerHandle):
            raise ValueError(f"{LORA_LOADER}: the model input must be the MODEL of Krea Model Loader, got "
                             f"{type(model).__name__}.")
        return (model.with_lora(host.model_path("loras", lora_name), strength_model),)


PACK_CLASSES: dict[str, type] = {**NODE_CLASS_MAPPINGS, "LoadImage": LoadImage, "LoadImageMask": LoadImageMask,
                                  LORA_LOADER: LoraLoaderModelOnly}
