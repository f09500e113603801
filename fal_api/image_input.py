"""An image-to-image request's image_url (or inpainting's mask_url) -> its image, checked and decoded once, before
the request is queued.

Accepted: a data URI (what fal_client.encode_file and the JS client make), a URL of a file this server serves (an
upload or an earlier result), and, only when the operator enabled it, an http(s) URL of another host fetched by
remote_fetch (never from a private address). The bytes are checked as an image (format, size, a complete decode)
and the decoded image is handed on to the backend, which gives it to the workflow's LoadImage without decoding it
again (or writes the bytes where a host's own LoadImage reads them). An image that would make a larger image than the
server's cap (size_limit.py) is refused from its header, before it is decoded. Every refusal is a 422 on the field
that named the image.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..image_io.load import ImageFileError, decoded_image
from .remote_fetch import RemoteImageError, fetch_image_bytes
from .schema import field_error
from .size_limit import check_input_size
from .storage import MAX_UPLOAD_BYTES, new_token

MAX_INPUT_PIXELS = 25_000_000  # 5000 x 5000: far above what FLUX makes, far below what would exhaust memory
FIELD = "image_url"

# A URL -> the file this server serves at it; None when the URL is not this server's (InputError when it is, but
# names nothing: an expired upload).
LocalLookup = Callable[[str], Path | None]
Fetch = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True, eq=False)
class InputImage:
    """A request's input image: the bytes as sent, and the image decoded from them (in full, checked)."""
    data: bytes
    image: Image.Image

    def write(self, folder: Path) -> Path:
        """The bytes as a new file in `folder` (for a LoadImage that reads files); the caller removes it."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input-{new_token()}"
        path.write_bytes(self.data)
        return path


def decode_data_uri(url: str, field: str = FIELD) -> bytes:
    """The bytes of `data:[<type>][;base64],<data>`, or InputError on `field`."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise field_error(field, "the data URI has no ',' before its data", value=url[:80])
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise field_error(field, "the data URI's base64 data is damaged", value=url[:80]) from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > MAX_UPLOAD_BYTES:
        raise field_error(field, f"the image is {len(data)} bytes; at most {MAX_UPLOAD_BYTES} are taken")
    if not data:
        raise field_error(field, "the data URI holds no data", value=url[:80])
    return data


def checked_image(data: bytes, max_pixels: int | None = None, field: str = FIELD) -> InputImage:
    """The bytes once they prove to be an image within limits (told from the header, then one complete decode),
    else InputError; `max_pixels`: the most pixels the image it makes may have (the server's cap)."""
    if max_pixels is not None:
        size = header_size(data)
        if size is not None:  # not an image: the decode below says so
            check_input_size(field, *size, max_pixels)
    try:
        return InputImage(data, decoded_image(io.BytesIO(data), f"{field}'s data", max_pixels=MAX_INPUT_PIXELS))
    except ImageFileError as err:
        raise field_error(field, str(err)) from None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header alone; None when the bytes are not an image PIL can open."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


async def image_for(url: str, local: LocalLookup, allow_remote: bool, fetch: Fetch = fetch_image_bytes,
                    max_pixels: int | None = None, field: str = FIELD) -> InputImage:
    """The image of `url` (the request's `field`), checked (within `max_pixels` once made a multiple of 16) and
    decoded."""
    if url.startswith("data:"):
        return checked_image(decode_data_uri(url, field), max_pixels, field)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError as err:
        raise field_error(field, f"{field} is not a valid URL: {err}", value=url[:200]) from None
    if parts.scheme not in ("http", "https"):
        raise field_error(field, f"{field} must be a data URI or an http(s) URL", value=url[:200])
    served = local(url)
    if served is not None:
        return checked_image(served.read_bytes(), max_pixels, field)
    if not allow_remote:
        raise field_error(field, "this server does not fetch images from other hosts: upload the image to it "
                                 "(fal_client.upload_file / fal.storage.upload) or send a data URI; the operator "
                                 "can allow other hosts with --allow-remote-images", value=url[:200])
    try:
        data = await fetch(url)
    except RemoteImageError as err:
        raise field_error(field, str(err), value=url[:200]) from None
    return checked_image(data, max_pixels, field)
