"""KreaSafetyCheck: fal's safety checker as a node. Images an NSFW classifier flags come out black.

When the check is enabled it either runs or fails with a message saying what to install: images are
never passed through unchecked because the classifier was missing or broken.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..model_loader import WHERE_TO_GET_IT, ModelFileError
from .handles import SafetyCheckerHandle
from .host import host, model_name_problem
from .model_files import CLASSIFIER, model_file_problems

log = logging.getLogger(__name__)

FOLDER = "safety_checker"
NO_CLASSIFIER = "(no classifier found: put nsfw_image_detection.safetensors in models/safety_checker)"
IMAGES_PER_BATCH = 4  # images classified per forward pass (fal's num_images is at most 4)


def _checker_choices() -> list[str]:
    # An empty combo would make every saved workflow fail validation; the sentinel validates and, when the
    # check is enabled, fails at run time with the folder to put the classifier in.
    return host.list_models(FOLDER) or [NO_CLASSIFIER]


def _threshold_problem(threshold: object) -> str | None:
    if isinstance(threshold, float) and not math.isfinite(threshold):
        return f"threshold: {threshold!r} is not a finite number"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        return (f"threshold must be a number from 0 to 1 (an image is flagged when its NSFW probability is above "
                f"it); got {threshold!r}.")
    return None


def _no_classifier_error(checker_name: str) -> ModelFileError:
    folders = ", ".join(str(p) for p in host.model_search_paths(FOLDER)) or "(no safety_checker folder configured)"
    found = "" if checker_name == NO_CLASSIFIER else f" ({checker_name!r} is not there)"
    return ModelFileError(
        f"The safety check is enabled but no NSFW classifier was found{found}. Put {WHERE_TO_GET_IT} in "
        f"{folders}, refresh the node list and pick it in checker_name; or turn enable_safety_checker off "
        f"to pass images through unchecked."
    )


def _classifier_path(checker_name: str) -> Path:
    if checker_name == NO_CLASSIFIER:
        raise _no_classifier_error(checker_name)
    try:
        return host.model_path(FOLDER, checker_name)
    except ModelFileError as error:
        raise _no_classifier_error(checker_name) from error


def _checker_problem(checker_name: object, enable_safety_checker: object) -> str | None:
    """Why `checker_name` cannot be used (None: it can, or it is linked, or the check is off and the name stays
    inside the model folder)."""
    if checker_name is None:
        return None
    if not isinstance(checker_name, str):
        return f"checker_name must be a file name from models/{FOLDER}; got {checker_name!r}"
    problem = model_name_problem(checker_name)
    if problem is not None:
        return f"checker_name: {problem}."
    if enable_safety_checker is not True:  # disabled, or linked (known only at run time, checked then)
        return None
    if checker_name == NO_CLASSIFIER:
        return f"checker_name: {_no_classifier_error(checker_name)}"
    try:
        host.model_path(FOLDER, checker_name)
    except ModelFileError:
        return f"checker_name: {_no_classifier_error(checker_name)}"
    problems = model_file_problems([(FOLDER, checker_name, CLASSIFIER, "checker_name")])
    return "\n".join(problems) if problems else None


def _flags_json(flags: list[bool]) -> str:
    return json.dumps(flags)


def parse_flags(has_nsfw_concepts: object, count: int) -> list[bool]:
    """The flags of a has_nsfw_concepts output (a JSON list of true/false) for a batch of `count` images."""
    try:
        flags = json.loads(has_nsfw_concepts) if isinstance(has_nsfw_concepts, str) else None
    except ValueError:
        flags = None
    if not isinstance(flags, list) or len(flags) != count or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"has_nsfw_concepts must be Krea Safety Check's output for these {count} image(s): a JSON "
                         f"list of {count} true/false values; got {str(has_nsfw_concepts)[:200]!r}. Link it from "
                         "the safety check that checked these images, or leave it unlinked.")
    return flags


class KreaSafetyCheck:
    DESCRIPTION = ("Checks images with an NSFW image classifier (Falconsai/nsfw_image_detection, in "
                   "models/safety_checker), as fal's enable_safety_checker does: an image whose NSFW probability "
                   "is above the threshold is replaced by a black image of the same size. Outputs the images and "
                   "has_nsfw_concepts, a JSON list with one true/false per image.")
    CATEGORY = "Krea/image"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "has_nsfw_concepts")
    OUTPUT_TOOLTIPS = ("The images, with flagged ones replaced by black images of the same size.",
                       "JSON list of booleans, one per image in order: true where the image was flagged.")
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to check (any size, any batch size)."}),
            "enable_safety_checker": ("BOOLEAN", {
                "default": True, "label_on": "enabled", "label_off": "disabled",
                "tooltip": "When disabled, images pass unchanged, every flag is false and no model is loaded."}),
            "threshold": ("FLOAT", {
                "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "An image is flagged when its NSFW probability is above this value (fal uses 0.5)."}),
            "checker_name": (_checker_choices(), {
                "tooltip": "The NSFW classifier in models/safety_checker: the model.safetensors of "
                           "Falconsai/nsfw_image_detection, saved as nsfw_image_detection.safetensors."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, checker_name: str | None = None, enable_safety_checker: bool | None = None,
                        threshold: float | None = None) -> bool | str:
        # Taking checker_name here turns off ComfyUI's combo check for it: a workflow saved where another
        # classifier was installed must still run with the check disabled. With the check enabled,
        # the classifier is looked for and its header read now, before any model loads; a name that leaves
        # the model folder is refused either way. enable_safety_checker says whether the classifier is needed
        # (ComfyUI turns the value into a boolean before this runs, bool("yes") is True; the server-less runner
        # does not, so its type is checked too); threshold is taken because ComfyUI's own range check lets NaN
        # through. One problem a line, each starting with its input (ComfyUI lists the text under every input
        # taken).
        problems = []
        if enable_safety_checker is not None and not isinstance(enable_safety_checker, bool):
            problems.append(f"enable_safety_checker: {enable_safety_checker!r} is not a boolean")
        if threshold is not None:
            problems.append(_threshold_problem(threshold))
        problems.append(_checker_problem(checker_name, enable_safety_checker))
        found = [problem for problem in problems if problem is not None]
        return "\n".join(found) if found else True

    def check(self, images: torch.Tensor, enable_safety_checker: bool, threshold: float,
              checker_name: str) -> dict:
        problem = _threshold_problem(threshold)
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be an IMAGE batch (B, H, W, 3); got {shape}.")

        started = time.perf_counter()
        if not enable_safety_checker:
            flags = [False] * images.shape[0]
            return self._result(images, flags, enabled=False, seconds=0.0)

        handle = SafetyCheckerHandle(_classifier_path(checker_name), host.model_devices("safety_checker")[0])
        checker = handle.load()
        handle.ready()
        probabilities = []
        for batch in images.split(IMAGES_PER_BATCH):
            host.throw_if_interrupted()
            probabilities.append(checker.nsfw_probabilities(batch))
        nsfw = torch.cat(probabilities) if probabilities else torch.zeros(0)
        flags = [bool(p > threshold) for p in nsfw.tolist()]
        log.info("Safety check (threshold %.2f): P(nsfw) = %s", threshold, [round(p, 4) for p in nsfw.tolist()])

        if any(flags):
            images = images.clone()
            images[torch.tensor(flags, device=images.device)] = 0.0
        return self._result(images, flags, enabled=True, seconds=time.perf_counter() - started)

    @staticmethod
    def _result(images: torch.Tensor, flags: list[bool], enabled: bool, seconds: float) -> dict:
        has_nsfw_concepts = _flags_json(flags)
        fields = {"has_nsfw_concepts": flags, "enabled": enabled, "seconds": round(seconds, 3)}  # web/krea.js
        return {"ui": host.node_report(has_nsfw_concepts, fields), "result": (images, has_nsfw_concepts)}


NODE_CLASS_MAPPINGS = {"KreaSafetyCheck": KreaSafetyCheck}
NODE_DISPLAY_NAME_MAPPINGS = {"KreaSafetyCheck": "Krea Safety Check"}
