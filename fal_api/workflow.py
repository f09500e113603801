"""A validated fal input -> the shipped API workflow with its values written in; the workflow's outputs -> fal's
response (`images` [{url, width, height, content_type}], `timings`, `seed`, `has_nsfw_concepts`, `prompt`).

The workflows are the files in workflows/api/, the same ones users run in ComfyUI and with `run`: a request is
nothing but those workflows with other widget values. Inputs are found by node type, not by node id.
"""
from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image

from ..sampling.parameters import CUSTOM_SIZE, SIZE_MULTIPLE
from .jobs import Job, ResultFile
from .schema import ImageSize, ImageToImageInput, TextToImageInput

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
TEXT_TO_IMAGE_WORKFLOW = WORKFLOWS / "krea_text_to_image.json"
IMAGE_TO_IMAGE_WORKFLOW = WORKFLOWS / "krea_image_to_image.json"
CONTENT_TYPES = {".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
RESULTS_SUBFOLDER = "fal"  # results are saved as <output folder>/fal/<request id>_00001_.jpeg


def round_side(value: int) -> int:
    """A custom side rounded down to the transformer's multiple of 16 (at least 16), as diffusers' pipeline does."""
    return max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)


@functools.cache
def shipped_workflow(path: Path) -> dict:
    """A shipped API workflow, read once per process (each request works on a copy)."""
    return json.loads(path.read_text())


def workflow_for(arguments: TextToImageInput | ImageToImageInput, seed: int, request_id: str,
                 image: str | None = None) -> dict:
    """The API workflow of the request; `image` is what the LoadImage node reads (image-to-image)."""
    image_to_image = isinstance(arguments, ImageToImageInput)
    prompt = copy.deepcopy(shipped_workflow(IMAGE_TO_IMAGE_WORKFLOW if image_to_image else TEXT_TO_IMAGE_WORKFLOW))
    sampler = {"num_inference_steps": arguments.num_inference_steps, "guidance_scale": arguments.guidance_scale,
               "seed": seed, "num_images": arguments.num_images, "acceleration": arguments.acceleration}
    if image_to_image:
        sampler["strength"] = arguments.strength
    elif isinstance(arguments.image_size, ImageSize):
        sampler.update(image_size=CUSTOM_SIZE, width=round_side(arguments.image_size.width),
                       height=round_side(arguments.image_size.height))
    else:
        sampler["image_size"] = arguments.image_size
    values = {
        "KreaTextEncode": {"prompt": arguments.prompt},
        "KreaSampler": sampler,
        "KreaSafetyCheck": {"enable_safety_checker": arguments.enable_safety_checker},
        "KreaSaveImage": {"output_format": arguments.output_format,
                          "filename_prefix": f"{RESULTS_SUBFOLDER}/{request_id}"},
        "LoadImage": {"image": image},
    }
    for node in prompt.values():
        for name, value in values.get(node["class_type"], {}).items():
            if value is not None:
                node["inputs"][name] = value
    return prompt


def saved_images(prompt: Mapping[str, dict], uis: Mapping[str, dict]) -> tuple[list[dict], list[bool]]:
    """The saved images ({filename, subfolder, type}) and the safety flags, from the nodes' `ui` outputs."""
    images: list[dict] = []
    flags: list[bool] = []
    for node_id, ui in uis.items():
        kind = prompt.get(node_id, {}).get("class_type")
        if kind == "KreaSaveImage":
            images += ui.get("images", [])
        elif kind == "KreaSafetyCheck":
            for text in ui.get("text", []):
                flags += [bool(flag) for flag in json.loads(text)]
    return images, flags


def fal_output(job: Job, files: list[Path], flags: list[bool], inference_s: float,
               url_of: Callable[[int, str], str]) -> dict:
    """fal's response for the saved `files`. sync_mode returns data URIs and keeps nothing (fal: "the output
    data won't be available in the request history"); otherwise each file is served at url_of(index, suffix)."""
    images = []
    for index, path in enumerate(files):
        suffix = path.suffix.lower()
        content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
        with Image.open(path) as img:
            width, height = img.size
        if job.arguments.sync_mode:
            url = f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
            path.unlink(missing_ok=True)
        else:
            job.files.append(ResultFile(path, content_type, suffix))
            url = url_of(index, suffix)
        images.append({"url": url, "width": width, "height": height, "content_type": content_type})
    if len(flags) != len(images):
        flags = (flags + [False] * len(images))[:len(images)]  # no safety node ran: nothing was flagged
    return {"images": images, "timings": {"inference": round(inference_s, 3)}, "seed": job.seed,
            "has_nsfw_concepts": flags, "prompt": job.arguments.prompt}


def finish(job: Job, prompt: Mapping[str, dict], uis: Mapping[str, dict], output_dir: Path,
           inference_s: float) -> None:
    """End `job` with the response made from what its workflow saved under `output_dir`."""
    images, flags = saved_images(prompt, uis)
    root = output_dir.resolve()
    files = []
    for image in images:
        path = (root / image.get("subfolder", "") / image["filename"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise FileNotFoundError(f"the workflow reported {image['filename']!r}, which is not in {root}")
        files.append(path)
    base = job.base_url

    def url_of(index: int, suffix: str) -> str:
        return f"{base}/results/{job.id}/{index}{suffix}"

    job.complete(output=fal_output(job, files, flags, inference_s, url_of))
