"""Command-line options -> the inputs of a workflow's nodes: which options a workflow can take, writing them in
(the options are fal's request fields under shorter names, written by the same field table as fal's requests),
and reading workflow files (API format, or UI format converted with ui_workflow)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..fal_api.fields import (
    LOAD_IMAGE,
    LOAD_IMAGE_MASK,
    SAFETY_CHECK,
    SAMPLER,
    SAVE_IMAGE,
    TEXT_ENCODE,
    write_inputs,
)
from ..fal_api.lora_nodes import MODEL_SOURCES, STRENGTH_RANGE, add_loras
from ..image_io.load import image_file_problem, image_size
from ..sampling.inpaint import mask_size_problem
from ..sampling.parameters import (
    CUSTOM_SIZE,
    GUIDANCE_SCALE,
    NUM_IMAGES,
    NUM_INFERENCE_STEPS,
    SEED,
    STRENGTH,
    check_side,
    nearest_multiple,
)
from .node_classes import PACK_CLASSES
from .runner import WorkflowError, is_link
from .ui_workflow import is_ui_workflow, to_api

# The `run` options that set a fal field: option name (argparse's dest) -> field.
OPTION_FIELDS = {"prompt": "prompt", "seed": "seed", "steps": "num_inference_steps", "guidance": "guidance_scale",
                 "num_images": "num_images", "acceleration": "acceleration", "strength": "strength",
                 "image_size": "image_size", "output_format": "output_format"}


def sampler_nodes(prompt: dict) -> list[dict]:
    return [n for n in prompt.values() if isinstance(n, dict) and n.get("class_type") == SAMPLER]


def is_image_to_image(prompt: dict) -> bool:
    return any(is_link(n.get("inputs", {}).get("latent")) for n in sampler_nodes(prompt))


def unused_options(prompt: dict, args: argparse.Namespace) -> list[str]:
    """The options given that the workflow has nowhere to put, each with why."""
    classes = {n.get("class_type") for n in prompt.values() if isinstance(n, dict)}
    samplers, image_to_image = sampler_nodes(prompt), is_image_to_image(prompt)
    wants = {  # option -> (given, the workflow uses it, what it needs)
        "--prompt": (args.prompt, TEXT_ENCODE in classes, "a Krea Text Encode node"),
        "--image": (args.image, LOAD_IMAGE in classes, "a LoadImage node (an image-to-image workflow)"),
        "--mask": (args.mask, LOAD_IMAGE_MASK in classes, "a LoadImageMask node (an inpainting workflow)"),
        "--strength": (args.strength, image_to_image, "an image-to-image sampler (a latent connected)"),
        "--width": (args.width, samplers and not image_to_image,
                    "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--height": (args.height, samplers and not image_to_image,
                     "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--image-size": (args.image_size, samplers and not image_to_image,
                         "a text-to-image sampler (image-to-image keeps the input image's size)"),
        "--format": (args.output_format, SAVE_IMAGE in classes, "a Krea Save Image node"),
        "--no-safety-checker": (args.no_safety_checker or None, SAFETY_CHECK in classes,
                                "a Krea Safety Check node"),
        "--lora": (getattr(args, "lora", None) or None, bool(classes & set(MODEL_SOURCES)),
                   "a model loader (Krea Model Loader) whose MODEL the LoRAs change"),
    }
    for option, name in (("--seed", "seed"), ("--steps", "steps"), ("--guidance", "guidance"),
                         ("--num-images", "num_images"), ("--acceleration", "acceleration")):
        wants[option] = (getattr(args, name), bool(samplers), "a Krea Sampler node")
    if not getattr(args, "server", None) and (args.token or args.header):
        wants["--token/--header"] = (True, False, "--server")
    if args.demo:
        wants["--models"] = (args.models, False, "no --demo (the demo builds its own models)")
        wants["--tokenizers"] = (args.tokenizers, False, "no --demo (the demo builds its own tokenizers)")
    return [f"{option} is not used by this workflow: it needs {needs}" for option, (given, used, needs)
            in wants.items() if given is not None and not used]


def apply_overrides(prompt: dict, args: argparse.Namespace, classes: dict[str, type] | None = None) -> None:
    """Write the command-line options into the inputs of the nodes they belong to; refuse options the
    workflow does not use, a --mask that does not fit --image and --set inputs its nodes do not have."""
    classes = classes if classes is not None else PACK_CLASSES
    unused = unused_options(prompt, args)
    if unused:
        raise WorkflowError("; ".join(unused) + ".")
    values: dict[str, object] = {field: getattr(args, option) for option, field in OPTION_FIELDS.items()}
    values["image_url"] = str(args.image) if args.image else None  # the file LoadImage reads
    values["mask_url"] = str(args.mask) if args.mask else None  # the file LoadImageMask reads
    values["enable_safety_checker"] = False if args.no_safety_checker else None
    if args.width is not None or args.height is not None:
        values.update(image_size=CUSTOM_SIZE, width=args.width, height=args.height)
    mask_file_problem(args)
    write_inputs(prompt, values)
    add_loras(prompt, lora_options(getattr(args, "lora", None) or []))
    for item in args.set:
        target, _, raw = item.partition("=")
        node_id, _, name = target.partition(".")
        if node_id not in prompt or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE with a node id of the workflow "
                                f"({', '.join(prompt)})")
        cls = classes.get(prompt[node_id].get("class_type"))
        if cls is not None:
            spec = cls.INPUT_TYPES()
            declared = [*spec.get("required", {}), *spec.get("optional", {})]
            if name not in declared:
                raise WorkflowError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                    f"{name!r}; its inputs are {', '.join(declared)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[node_id]["inputs"][name] = value


def lora_options(values: list[str]) -> list[tuple[str, float]]:
    """`--lora NAME[:STRENGTH]` values -> (file name in the loras folder, strength; 1 when not given)."""
    loras = []
    low, high = STRENGTH_RANGE
    for value in values:
        name, colon, tail = value.rpartition(":")
        try:
            name, strength = (name, float(tail)) if colon else (value, 1.0)
        except ValueError:  # a colon inside the name itself
            name, strength = value, 1.0
        if not name or not (low <= strength <= high):
            raise WorkflowError(f"--lora {value!r}: expected NAME[:STRENGTH], a file in the loras folder and a "
                                f"strength from {low:g} to {high:g} (e.g. --lora style.safetensors:0.8)")
        loras.append((name, strength))
    return loras


def read_workflow(path: Path) -> dict:
    """The workflow file's JSON: an API prompt or a UI-format workflow (see ui_workflow)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WorkflowError(f"cannot read the workflow {path}: {err.strerror or err}") from None
    try:
        workflow = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise WorkflowError(f"the workflow {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON "
                            "from ComfyUI") from None
    except json.JSONDecodeError as err:
        raise WorkflowError(f"the workflow {path} is not valid JSON ({err}); use the files in workflows/ or save "
                            "it from ComfyUI") from None
    if not isinstance(workflow, dict):
        raise WorkflowError(f"{path} is not a ComfyUI workflow (a JSON object of nodes)")
    return workflow


def api_prompt(workflow: dict, definitions: dict[str, dict]) -> dict:
    """The API prompt of a workflow file: as it is, or converted from the UI format."""
    return to_api(workflow, definitions) if is_ui_workflow(workflow) else workflow


def option_problems(args: argparse.Namespace) -> None:
    """The options' values, checked here before the server is asked (it would refuse them too, later)."""
    for parameter, value in ((SEED, args.seed), (NUM_INFERENCE_STEPS, args.steps), (GUIDANCE_SCALE, args.guidance),
                             (NUM_IMAGES, args.num_images), (STRENGTH, args.strength)):
        if value is not None:
            parameter.check(value)
    for name, value in (("width", args.width), ("height", args.height)):
        if value is not None:
            check_side(name, value)
    for path in (args.image, args.mask):
        problem = image_file_problem(path) if path is not None else None
        if problem:
            raise WorkflowError(problem)
    mask_file_problem(args)


def mask_file_problem(args: argparse.Namespace) -> None:
    """--mask against --image, from their headers, before any model loads: the mask must fit the image as the
    sampler will check it (the image is sampled at its sides rounded to multiples of 16)."""
    if args.image is None or args.mask is None:
        return
    sizes = [image_size(path) for path in (args.image, args.mask)]
    if None in sizes:  # not readable: the loaders' own checks say why
        return
    (width, height), (mask_width, mask_height) = sizes
    problem = mask_size_problem(mask_height, mask_width, nearest_multiple(height), nearest_multiple(width))
    if problem:
        raise WorkflowError(f"--mask {args.mask}: {problem}.")
