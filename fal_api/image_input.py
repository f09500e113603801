"""An image-to-image request's image_url -> its image, checked and decoded once, before the request is queued.

Accepted: a data URI (what fal_client.encode_file and the JS client make), a URL of a file this server serves (an
upload or an earlier result), and, only when the operator enabled it, an http(s) URL of another host fetched by
remote_fetch (never from a private address). The bytes are checked as an image (format, size, a complete decode)
and the decoded image is handed on to the backend, which gives it to the workflow's LoadImage without decoding it
again (or writes the bytes where a host's own LoadImage reads them). Every refusal is a 422 on `image_url`.
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


def decode_data_uri(url: str) -> bytes:
    """The bytes of `data:[<type>][;base64],<data>`, or InputError."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise field_error(FIELD, "the data URI has no ',' before its data", value=url[:80])
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise field_error(FIELD, "the data URI's base64 data is damaged", value=url[:80]) from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > MAX_UPLOAD_BYTES:
        raise field_error(FIELD, f"the image is {len(data)} bytes; at most {MAX_UPLOAD_BYTES} are taken")
    if not data:
        raise field_error(FIELD, "the data URI holds no data", value=url[:80])
    return data


def checked_image(data: bytes) -> InputImage:
    """The bytes once they prove to be an image within limits (told from the header, then one complete decode),
    else InputError."""
    try:
        return InputImage(data, decoded_image(io.BytesIO(data), "image_url's data", max_pixels=MAX_INPUT_PIXELS))
    except ImageFileError as err:
        raise field_error(FIELD, str(err)) from None


async def image_for(url: str, local: LocalLookup, allow_remote: bool, fetch: Fetch = fetch_image_bytes) -> InputImage:
    """The image of `url`, checked and decoded."""
    if url.startswith("data:"):
        return checked_image(decode_data_uri(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise field_error(FIELD, "image_url must be a data URI or an http(s) URL", value=url[:200])
    served = local(url)
    if served is not None:
        return checked_image(served.read_bytes())
    if not allow_remote:
        raise field_error(FIELD, "this server does not fetch images from other hosts: upload the image to it "
                                 "(fal_client.upload_file / fal.storage.upload) or send a data URI; the operator "
                                 "can allow other hosts with --allow-remote-images", value=url[:200])
    try:
        data = await fetch(url)
    except RemoteImageError as err:
        raise field_error(FIELD, str(err), value=url[:200]) from None
    return checked_image(data)
