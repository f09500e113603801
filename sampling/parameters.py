"""fal's `flux/krea` request parameters -> the one table of sizes, ranges, defaults and choices.

The node inputs (INPUT_TYPES), the range checks run before any model loads, and the command line's choices and
help all read this table, so a range or a default is written here and nowhere else. Values follow the hosted
endpoints `fal-ai/flux/krea` (text-to-image) and `fal-ai/flux/krea/image-to-image`; the error messages name the
parameter, the allowed range and the value given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .step_cache import THRESHOLDS

Number = int | float


@dataclass(frozen=True)
class NumericParameter:
    """An INT or FLOAT parameter: its inclusive range, its default and the widget step (None: the UI's own)."""
    name: str
    min: Number
    max: Number
    default: Number
    step: Number | None = None

    def check(self, value: Number) -> None:
        if not self.min <= value <= self.max:
            raise ValueError(f"{self.name} must be between {self.min} and {self.max}, got {value}.")


@dataclass(frozen=True)
class ChoiceParameter:
    """A parameter with a fixed list of values, the first shown in the UI first."""
    name: str
    choices: tuple[str, ...]
    default: str

    def check(self, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"{self.name} {value!r} is not one of {', '.join(self.choices)}.")


# fal's image_size presets, (width, height).
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
CUSTOM_SIZE = "custom"  # the image_size that takes width and height instead of a preset
IMAGE_SIZE = ChoiceParameter("image_size", (*IMAGE_SIZES, CUSTOM_SIZE), default="landscape_4_3")

SIZE_MULTIPLE = 16  # the transformer packs 2x2 latent pixels, and a latent pixel is 8 image pixels
MAX_SIDE = 14142  # the longest custom side (14142 x 14142 is about 200 megapixels)
# T5 reads 512 tokens (about 2,000 characters of English, 512 of CJK) and CLIP 77: nothing past that changes the
# image. Ten times as much still takes any prompt that could, and bounds what one request can make the tokenizers,
# the logs and the request body carry; longer prompts are refused before they are tokenized.
MAX_PROMPT_CHARS = 20_000
# The custom-size widgets start at the default preset's size.
WIDTH = NumericParameter("width", SIZE_MULTIPLE, MAX_SIDE, IMAGE_SIZES[IMAGE_SIZE.default][0], step=SIZE_MULTIPLE)
HEIGHT = NumericParameter("height", SIZE_MULTIPLE, MAX_SIDE, IMAGE_SIZES[IMAGE_SIZE.default][1], step=SIZE_MULTIPLE)

NUM_INFERENCE_STEPS = NumericParameter("num_inference_steps", 1, 50, default=28)
IMAGE_TO_IMAGE_STEPS = 40  # the image-to-image endpoint's num_inference_steps default
GUIDANCE_SCALE = NumericParameter("guidance_scale", 1.0, 20.0, default=4.5, step=0.1)
SEED = NumericParameter("seed", 0, 2**64 - 1, default=0)  # ComfyUI's seed range (fal: any integer)
NUM_IMAGES = NumericParameter("num_images", 1, 4, default=1)
STRENGTH = NumericParameter("strength", 0.01, 1.0, default=0.95, step=0.01)  # image-to-image only
ACCELERATION = ChoiceParameter("acceleration", tuple(THRESHOLDS), default="none")
# fal's Krea LoRA endpoints (fal-ai/flux-krea-lora/...): other defaults, and no "high" acceleration.
LORA_GUIDANCE_SCALE = 3.5
LORA_STRENGTH = 0.85
LORA_ACCELERATIONS = ("none", "regular")
# fal offers jpeg and png; webp is this pack's addition (ComfyUI reads its metadata too).
OUTPUT_FORMAT = ChoiceParameter("output_format", ("jpeg", "png", "webp"), default="jpeg")


def nearest_multiple(side: int, multiple: int = SIZE_MULTIPLE) -> int:
    """A side made a multiple of 16 (at least 16) by rounding to the nearest, halves up: what Krea Encode Image
    resizes an input image to."""
    return max(multiple, (side + multiple // 2) // multiple * multiple)


def round_down_side(side: int) -> int:
    """A custom side rounded down to a multiple of 16 (at least 16), as fal's server and diffusers' pipeline do."""
    return max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)


def range_problem(name: str, value: Number, minimum: Number | None, maximum: Number | None) -> str | None:
    """Why `value` is out of range, worded as ComfyUI words its own range check (None: within)."""
    if minimum is not None and value < minimum:
        return f"{name}: {value} is smaller than the minimum {minimum}"
    if maximum is not None and value > maximum:
        return f"{name}: {value} is bigger than the maximum {maximum}"
    return None


def number_problem(name: str, value: object, minimum: Number | None = None, maximum: Number | None = None,
                   whole: bool = False) -> str | None:
    """Why `value` cannot be the number input `name` (None: it can): not a number (a boolean is not), not
    finite, not whole where a whole number is asked for (a float cannot hold every seed up to 2^64 - 1), or out
    of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}: {value!r} is not a number"
    if not math.isfinite(value):
        return f"{name}: {value!r} is not a finite number"
    if whole and not isinstance(value, int):
        return f"{name}: {value!r} is not an integer (write it without a decimal point)"
    return range_problem(name, value, minimum, maximum)


def check_side(name: str, value: int) -> None:
    """A custom width or height: a multiple of 16 from 16 to MAX_SIDE."""
    if not SIZE_MULTIPLE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIDE}, "
                         f"got {value}.")


def resolve_size(image_size: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) of a preset, or the checked custom width and height."""
    if image_size == CUSTOM_SIZE:
        check_side(WIDTH.name, width)
        check_side(HEIGHT.name, height)
        return width, height
    IMAGE_SIZE.check(image_size)
    return IMAGE_SIZES[image_size]


def check_ranges(num_inference_steps: int, guidance_scale: float, seed: int, num_images: int,
                 strength: float) -> None:
    """The numeric ranges, refused before any model is loaded (ComfyUI checks them too; the command line
    and direct callers rely on this)."""
    for parameter, value in ((NUM_INFERENCE_STEPS, num_inference_steps), (GUIDANCE_SCALE, guidance_scale),
                             (SEED, seed), (NUM_IMAGES, num_images), (STRENGTH, strength)):
        parameter.check(value)
