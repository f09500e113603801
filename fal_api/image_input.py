"""An image-to-image request's image_url -> a checked image file in the server's uploads folder.

Accepted: a data URI (what fal_client.encode_file and the JS client make), a URL of a file this server serves (an
upload or an earlier result), and, only when the operator enabled it, an http(s) URL of another host fetched by
remote_fetch (never from a private address). The bytes are checked as an image (format, size, a complete decode)
before the request is queued; every refusal is a 422 on `image_url`.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..image_io.load import image_file_problem
from .remote_fetch import RemoteImageError, fetch_image_bytes
from .schema import field_error
from .storage import MAX_UPLOAD_BYTES, new_token

MAX_INPUT_PIXELS = 25_000_000  # 5000 x 5000: far above what FLUX makes, far below what would exhaust memory
FIELD = "image_url"

# A URL -> the file this server serves at it; None when the URL is not this server's (InputError when it is, but
# names nothing: an expired upload).
LocalLookup = Callable[[str], Path | None]
Fetch = Callable[[str], Awaitable[bytes]]


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


def write_checked_image(data: bytes, folder: Path) -> Path:
    """The bytes written as an input file once they prove to be an image within limits, else InputError."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: the size is known before decoding
            width, height = img.size
    except Image.DecompressionBombError as err:  # PIL's own guard, at twice its pixel limit
        raise field_error(FIELD, f"the image has too many pixels ({err}); at most {MAX_INPUT_PIXELS} are taken") \
            from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise field_error(FIELD, "the data is not an image PIL can read (png, jpeg, webp, ...)") from None
    if width * height > MAX_INPUT_PIXELS:
        raise field_error(FIELD, f"the image is {width}x{height}; at most {MAX_INPUT_PIXELS} pixels are taken")
    path = folder / f"input-{new_token()}"
    path.write_bytes(data)
    problem = image_file_problem(path)  # a complete decode: damaged or truncated files stop here
    if problem is not None:
        path.unlink(missing_ok=True)
        raise field_error(FIELD, problem.replace(str(path), "the image"))
    return path


async def image_file_for(url: str, folder: Path, local: LocalLookup, allow_remote: bool,
                         fetch: Fetch = fetch_image_bytes) -> Path:
    """The image of `url` as a checked file in `folder` (the caller removes it when the request ends)."""
    if url.startswith("data:"):
        return write_checked_image(decode_data_uri(url), folder)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise field_error(FIELD, "image_url must be a data URI or an http(s) URL", value=url[:200])
    served = local(url)
    if served is not None:
        return write_checked_image(served.read_bytes(), folder)
    if not allow_remote:
        raise field_error(FIELD, "this server does not fetch images from other hosts: upload the image to it "
                                 "(fal_client.upload_file / fal.storage.upload) or send a data URI; the operator "
                                 "can allow other hosts with --allow-remote-images", value=url[:200])
    try:
        data = await fetch(url)
    except RemoteImageError as err:
        raise field_error(FIELD, str(err), value=url[:200]) from None
    return write_checked_image(data, folder)

