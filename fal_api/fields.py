"""fal's request fields <-> the node inputs of the shipped workflows, in one table.

The fal servers write a request into the workflow with it, the command line writes its options (which are fal's
fields under shorter names) with it, and the browser's Copy/Paste as fal request (web/krea_fal.js) is tested
against it. Inputs are found by node type, not by node id, so a user's own workflow built of the same nodes
takes the same fields.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SAMPLER, TEXT_ENCODE, SAFETY_CHECK, SAVE_IMAGE, LOAD_IMAGE, LOAD_IMAGE_MASK = (
    "KreaSampler", "KreaTextEncode", "KreaSafetyCheck", "KreaSaveImage", "LoadImage", "LoadImageMask")


@dataclass(frozen=True)
class NodeInput:
    node: str  # the node's class_type
    input: str  # the input's name


FIELD_INPUTS: dict[str, NodeInput] = {
    "prompt": NodeInput(TEXT_ENCODE, "prompt"),
    "image_size": NodeInput(SAMPLER, "image_size"),
    "num_inference_steps": NodeInput(SAMPLER, "num_inference_steps"),
    "guidance_scale": NodeInput(SAMPLER, "guidance_scale"),
    "seed": NodeInput(SAMPLER, "seed"),
    "num_images": NodeInput(SAMPLER, "num_images"),
    "acceleration": NodeInput(SAMPLER, "acceleration"),
    "strength": NodeInput(SAMPLER, "strength"),
    "enable_safety_checker": NodeInput(SAFETY_CHECK, "enable_safety_checker"),
    "output_format": NodeInput(SAVE_IMAGE, "output_format"),
    "image_url": NodeInput(LOAD_IMAGE, "image"),  # the image, once fetched and checked: a file LoadImage reads
    "mask_url": NodeInput(LOAD_IMAGE_MASK, "image"),  # inpainting's mask (white = repaint), likewise
}
# A custom image_size ({"width", "height"}) is the sampler's image_size "custom" with these two inputs.
CUSTOM_SIZE_INPUTS: dict[str, NodeInput] = {"width": NodeInput(SAMPLER, "width"),
                                            "height": NodeInput(SAMPLER, "height")}
# Fields no node input holds, and why.
UNMAPPED: dict[str, str] = {"sync_mode": "how fal hands back the result; a graph has no such setting",
                            "loras": "LoRAs are LoraLoaderModelOnly nodes in front of the sampler, not a widget"}

# Where the fal server writes what is not a request field: the result files' name (results/<request id>_...).
RESULT_PREFIX = NodeInput(SAVE_IMAGE, "filename_prefix")


def write_inputs(prompt: Mapping[str, dict], values: Mapping[str, object]) -> None:
    """Write each field's value (a key of FIELD_INPUTS or CUSTOM_SIZE_INPUTS) into that input of every node of
    its type in the API `prompt`; a None value leaves the workflow's own."""
    places = {**FIELD_INPUTS, **CUSTOM_SIZE_INPUTS}
    for field, value in values.items():
        write_input(prompt, places[field], value)


def write_input(prompt: Mapping[str, dict], place: NodeInput, value: object) -> None:
    if value is None:
        return
    for node in prompt.values():
        if node.get("class_type") == place.node:
            node.setdefault("inputs", {})[place.input] = value
