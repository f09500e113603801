"""A request body -> a validated fal input, or the 422 body fal's FastAPI service answers with.

The endpoints' inputs as fal publishes them (fal-ai/flux/krea, .../image-to-image, and the Krea LoRA family
fal-ai/flux-krea-lora[/image-to-image|/inpainting|/stream]; endpoints.py says which endpoint takes which), with the
ranges and defaults of the pack's one parameter table (sampling.parameters). Unknown fields are ignored, as by fal.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling.parameters import (
    ACCELERATION,
    GUIDANCE_SCALE,
    IMAGE_SIZE,
    IMAGE_SIZES,
    IMAGE_TO_IMAGE_STEPS,
    LORA_ACCELERATIONS,
    LORA_GUIDANCE_SCALE,
    LORA_STRENGTH,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    NUM_IMAGES,
    NUM_INFERENCE_STEPS,
    OUTPUT_FORMAT,
    SEED,
    STRENGTH,
)
from .lora_nodes import STRENGTH_RANGE

MAX_IMAGE_URL_CHARS = 64 * 1024 * 1024  # a data URI of the largest accepted upload, base64-encoded
# fal says "any number" of LoRAs; each one is a file read and a merge before sampling, so the pack bounds them.
MAX_LORAS = 8
MAX_LORA_PATH_CHARS = 2048

Preset = Literal[tuple(IMAGE_SIZES)]  # type: ignore[valid-type]
Acceleration = Literal[ACCELERATION.choices]  # type: ignore[valid-type]
LoraAcceleration = Literal[LORA_ACCELERATIONS]  # type: ignore[valid-type]
OutputFormat = Literal[OUTPUT_FORMAT.choices]  # type: ignore[valid-type]


class ImageSize(BaseModel):
    """A custom size; sides are rounded down to a multiple of 16 (as diffusers' FLUX pipeline does), and the
    response gives the size made."""
    model_config = ConfigDict(extra="ignore")
    width: int = Field(512, gt=0, le=MAX_SIDE, strict=True)
    height: int = Field(512, gt=0, le=MAX_SIDE, strict=True)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, strict=True)
    guidance_scale: float = Field(GUIDANCE_SCALE.default, ge=GUIDANCE_SCALE.min, le=GUIDANCE_SCALE.max,
                                  allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED.min, le=SEED.max, strict=True)
    sync_mode: bool = Field(False, strict=True)
    num_images: int = Field(NUM_IMAGES.default, ge=NUM_IMAGES.min, le=NUM_IMAGES.max, strict=True)
    enable_safety_checker: bool = Field(True, strict=True)
    output_format: OutputFormat = OUTPUT_FORMAT.default
    acceleration: Acceleration = ACCELERATION.default


class TextToImageInput(_Common):
    image_size: Preset | ImageSize = IMAGE_SIZE.default
    num_inference_steps: int = Field(NUM_INFERENCE_STEPS.default, ge=NUM_INFERENCE_STEPS.min,
                                     le=NUM_INFERENCE_STEPS.max, strict=True)


class ImageToImageInput(_Common):
    image_url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS, strict=True)
    strength: float = Field(STRENGTH.default, ge=STRENGTH.min, le=STRENGTH.max, allow_inf_nan=False)
    num_inference_steps: int = Field(IMAGE_TO_IMAGE_STEPS, ge=NUM_INFERENCE_STEPS.min, le=NUM_INFERENCE_STEPS.max,
                                     strict=True)


class LoraWeight(BaseModel):
    """One LoRA of a request: a file name in the loras folder, an http(s) URL, or a Hugging Face repository
    (lora_input.py says which is which); merged at `scale` (LoraLoaderModelOnly's strength_model)."""
    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS, strict=True)
    scale: float = Field(1.0, ge=STRENGTH_RANGE[0], le=STRENGTH_RANGE[1], allow_inf_nan=False)
    force: bool = Field(False, strict=True)  # fal's: forces a LoRA's embeddings; FLUX LoRAs have none


class _LoraCommon(_Common):
    guidance_scale: float = Field(LORA_GUIDANCE_SCALE, ge=GUIDANCE_SCALE.min, le=GUIDANCE_SCALE.max,
                                  allow_inf_nan=False)
    acceleration: LoraAcceleration = ACCELERATION.default
    loras: list[LoraWeight] = Field(default_factory=list, max_length=MAX_LORAS)
    num_inference_steps: int = Field(NUM_INFERENCE_STEPS.default, ge=NUM_INFERENCE_STEPS.min,
                                     le=NUM_INFERENCE_STEPS.max, strict=True)


class LoraTextToImageInput(_LoraCommon):
    image_size: Preset | ImageSize = IMAGE_SIZE.default


class LoraStreamInput(LoraTextToImageInput):
    num_images: int = Field(1, ge=1, le=1, strict=True)  # fal: "always 1 for streaming output"


class LoraImageToImageInput(_LoraCommon):
    image_url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS, strict=True)
    strength: float = Field(LORA_STRENGTH, ge=STRENGTH.min, le=STRENGTH.max, allow_inf_nan=False)


class LoraInpaintingInput(LoraImageToImageInput):
    mask_url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS, strict=True)  # white: repaint, black: keep


FalInput = TextToImageInput | ImageToImageInput | LoraTextToImageInput | LoraImageToImageInput


class InputError(ValueError):
    """A request fal would answer with 422: `detail` is FastAPI's list of {loc, msg, type}."""

    def __init__(self, detail: list[dict]) -> None:
        super().__init__("; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail))
        self.detail = detail


def field_error(field: str, message: str, kind: str = "value_error", value: object = None) -> InputError:
    """One FastAPI-shaped error for a body field (checks that need more than the schema: the image)."""
    return InputError([{"type": kind, "loc": ["body", field], "msg": message, "input": value}])


def parse_input(schema: type[FalInput], body: object) -> FalInput:
    """`body` validated by `schema`, or InputError with every problem, located as FastAPI does."""
    if not isinstance(body, dict):
        raise InputError([{"type": "model_attributes_type", "loc": ["body"],
                           "msg": "Input should be a valid dictionary or object to extract fields from",
                           "input": _short(body)}])
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        raise InputError([{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"],
                           "input": _short(e.get("input"))} for e in err.errors(include_url=False)]) from None


def _short(value: object) -> object:
    """The offending value echoed back, cut short (a 60 MB data URI is not sent back)."""
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    if isinstance(value, (dict, list)):
        return None if len(repr(value)) > 1000 else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN is not JSON
    return value
