"""A validated fal input -> the endpoint's shipped API workflow with its values written in; the workflow's outputs ->
fal's response (`images` [{url, width, height, content_type}], `timings`, `seed`, `has_nsfw_concepts`, `prompt`).

The workflows are the files in workflows/api/, the same ones users run in ComfyUI and with `run`: a request is
nothing but those workflows with other widget values, written by the one field table (fields.py).
"""
from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image

from ..image_io.save import SAFETY_FLAG
from ..sampling.parameters import CUSTOM_SIZE, round_down_side
from .endpoints import Endpoint
from .fields import FIELD_INPUTS, RESULT_PREFIX, write_input, write_inputs
from .jobs import Job, ResultFile
from .schema import FalInput, ImageSize

CONTENT_TYPES = {".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
RESULTS_SUBFOLDER = "fal"  # results are saved as <output folder>/fal/<request id>_00001_.jpeg


@functools.cache
def shipped_workflow(path: Path) -> dict:
    """A shipped API workflow, read once per process (each request works on a copy)."""
    return json.loads(path.read_text())


def workflow_for(endpoint: Endpoint, arguments: FalInput, seed: int, request_id: str,
                 images: Mapping[str, str] | None = None) -> dict:
    """The API workflow of the request; `images`: for each of the endpoint's image fields, what its LoadImage node
    reads (the backend's image_reference)."""
    prompt = copy.deepcopy(shipped_workflow(endpoint.workflow))
    values: dict[str, object] = {name: getattr(arguments, name, None) for name in FIELD_INPUTS
                                 if name not in endpoint.image_fields}
    values["seed"] = seed  # the request's, or the one drawn for it
    if isinstance(values.get("image_size"), ImageSize):  # custom sides, rounded down to what the model takes
        size = values.pop("image_size")
        values.update(image_size=CUSTOM_SIZE, width=round_down_side(size.width), height=round_down_side(size.height))
    values.update(images or {})
    write_inputs(prompt, values)
    write_input(prompt, RESULT_PREFIX, f"{RESULTS_SUBFOLDER}/{request_id}")
    return prompt


def saved_images(prompt: Mapping[str, dict], uis: Mapping[str, dict]) -> tuple[list[dict], list[bool]]:
    """The saved images ({filename, subfolder, type}) and their safety flags, from the save node's `ui` output:
    the shipped workflows link the safety check's has_nsfw_concepts into it, so each image entry carries its flag
    (also when ComfyUI reused a cached safety check that did not run again)."""
    images: list[dict] = []
    for node_id, ui in uis.items():
        if prompt.get(node_id, {}).get("class_type") == "KreaSaveImage":
            images += ui.get("images", [])
    return images, [bool(image.get(SAFETY_FLAG, False)) for image in images]


def fal_output(job: Job, files: list[Path], flags: list[bool], inference_s: float,
               url_of: Callable[[int, str], str]) -> dict:
    """fal's response for the saved `files` and their safety `flags` (one each: saved_images gives an image
    no safety check flagged False). sync_mode returns data URIs and keeps nothing (fal: "the output data won't be
    available in the request history"); otherwise each file is served at url_of(index, suffix)."""
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
