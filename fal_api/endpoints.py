"""The endpoints this server answers, one row each: fal's id -> the input schema, the shipped workflow it runs,
which of its fields name input images, and whether it streams (server-sent events: previews, then the result).

A new fal endpoint is a new row (and, where no shipped workflow does what it asks, a new workflow); the routes, the
queue, the status and result calls (under each row's app) and the response are the same for every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .schema import (
    FalInput,
    ImageToImageInput,
    LoraImageToImageInput,
    LoraInpaintingInput,
    LoraStreamInput,
    LoraTextToImageInput,
    TextToImageInput,
    parse_input,
)

TEXT_TO_IMAGE = "fal-ai/flux/krea"
IMAGE_TO_IMAGE = "fal-ai/flux/krea/image-to-image"
LORA_TEXT_TO_IMAGE = "fal-ai/flux-krea-lora"
LORA_IMAGE_TO_IMAGE = "fal-ai/flux-krea-lora/image-to-image"
LORA_INPAINTING = "fal-ai/flux-krea-lora/inpainting"
LORA_STREAM = "fal-ai/flux-krea-lora/stream"
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"


@dataclass(frozen=True)
class Endpoint:
    id: str  # what the clients name: fal-ai/flux/krea
    schema: type[FalInput]  # the request body
    workflow: Path  # the shipped API workflow a request runs, with the request's values written in
    image_fields: tuple[str, ...] = ()  # request fields that name an input image, fetched and checked first
    streams: bool = False  # a run answers with server-sent events: a preview per step, then the output

    @property
    def app(self) -> str:
        """owner/alias (fal-ai/flux): the by-id queue calls (.../requests/<id>) name the app, not the endpoint."""
        return "/".join(self.id.split("/")[:2])

    def parse(self, body: object) -> FalInput:
        """The validated request, or InputError (fal's 422)."""
        return parse_input(self.schema, body)


ENDPOINTS: dict[str, Endpoint] = {endpoint.id: endpoint for endpoint in (
    Endpoint(TEXT_TO_IMAGE, TextToImageInput, WORKFLOWS / "krea_text_to_image.json"),
    Endpoint(IMAGE_TO_IMAGE, ImageToImageInput, WORKFLOWS / "krea_image_to_image.json", image_fields=("image_url",)),
    # The LoRA family: the same workflows, with the request's LoRAs put in front of the sampler (lora_nodes.py).
    Endpoint(LORA_TEXT_TO_IMAGE, LoraTextToImageInput, WORKFLOWS / "krea_text_to_image.json"),
    Endpoint(LORA_IMAGE_TO_IMAGE, LoraImageToImageInput, WORKFLOWS / "krea_image_to_image.json",
             image_fields=("image_url",)),
    Endpoint(LORA_INPAINTING, LoraInpaintingInput, WORKFLOWS / "krea_inpainting.json",
             image_fields=("image_url", "mask_url")),
    Endpoint(LORA_STREAM, LoraStreamInput, WORKFLOWS / "krea_text_to_image.json", streams=True),
)}
APPS = frozenset(endpoint.app for endpoint in ENDPOINTS.values())
