"""A request -> the size of the images it makes, refused (a 422 on the field that sets it) when one image would be
larger than the server's cap, before anything is queued.

Text-to-image makes `image_size` (a preset, or custom sides rounded down to multiples of 16); image-to-image makes
its input image's size (sides rounded to the nearest multiple of 16, as Krea Encode Image resizes). The cap is per
image, in fal's megapixels (settings.MEGAPIXEL); every endpoint row with these fields gets it.
"""
from __future__ import annotations

from ..sampling.parameters import IMAGE_SIZES, nearest_multiple, round_down_side
from .schema import ImageSize, field_error
from .settings import MAX_MEGAPIXELS_ENV, MEGAPIXEL

SIZE_FIELD = "image_size"


def pixel_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a width x height image is too large here (None: it is not): "WxH (N megapixels) is over ..."."""
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} ({width * height / MEGAPIXEL:.2f} megapixels) is over this server's limit of "
            f"{max_pixels / MEGAPIXEL:g} megapixels per image (a megapixel here is 1024x1024 pixels, as fal counts; "
            f"fal's own limit is 4; the operator sets it with --max-megapixels, or {MAX_MEGAPIXELS_ENV} inside "
            "ComfyUI)")


def check_requested_size(arguments: object, max_pixels: int) -> None:
    """InputError on image_size when the size the request asks for is over the cap (no image_size: nothing)."""
    size = getattr(arguments, SIZE_FIELD, None)
    if isinstance(size, ImageSize):
        width, height = round_down_side(size.width), round_down_side(size.height)
    elif isinstance(size, str) and size in IMAGE_SIZES:
        width, height = IMAGE_SIZES[size]
    else:
        return
    problem = pixel_problem(width, height, max_pixels)
    if problem is not None:
        raise field_error(SIZE_FIELD, f"image_size {problem}: ask for a smaller size",
                          value={"width": width, "height": height})


def check_input_size(field: str, width: int, height: int, max_pixels: int) -> None:
    """InputError on the image field when the image an input of width x height makes is over the cap."""
    made_w, made_h = nearest_multiple(width), nearest_multiple(height)
    problem = pixel_problem(made_w, made_h, max_pixels)
    if problem is not None:
        raise field_error(field, f"the image is {width}x{height}, so the request would make an image of {problem}: "
                                 "send a smaller image")
