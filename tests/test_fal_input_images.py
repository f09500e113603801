"""fal_api.image_input without a server: an image_url or mask_url (a data URI, a URL of a file this server serves,
another host's URL when allowed) -> the bytes as sent and the image decoded from them, every refusal a 422 on the
field that named the image; data URIs read as RFC 2397 says (urllib's own data: handler is the oracle); an input
image written for a host's LoadImage is those bytes, in a new file."""
from __future__ import annotations

import asyncio
import base64
import io
import urllib.request

import pytest
from PIL import Image

from comfyui_krea.fal_api import image_input
from comfyui_krea.fal_api.image_input import (
    MAX_INPUT_PIXELS,
    InputImage,
    checked_image,
    decode_data_uri,
    image_for,
)
from comfyui_krea.fal_api.remote_fetch import RemoteImageError
from comfyui_krea.fal_api.schema import InputError


def png(width: int = 24, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 140, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


def problem_of(call) -> dict:
    with pytest.raises(InputError) as caught:
        call()
    [problem] = caught.value.detail
    return problem


@pytest.mark.parametrize("uri", ["data:,a,b%2Cc", "data:text/plain;charset=utf-8,caf%C3%A9 au lait",
                                 "data:;base64,QUJD", "data:image/png;base64,iVBORw0KGgo=", "data:,%00%FF"])
def test_data_uris_read_as_urllibs_data_handler_reads_them(uri):
    with urllib.request.urlopen(uri) as oracle:  # noqa: S310 - a data: URL, read in-process
        assert decode_data_uri(uri) == oracle.read()


def test_base64_with_characters_outside_its_alphabet_is_refused_not_skipped():
    problem = problem_of(lambda: decode_data_uri("data:image/png;base64,QU!JD", "mask_url"))
    assert problem["loc"] == ["body", "mask_url"] and "base64" in problem["msg"]


def test_a_data_uri_of_exactly_the_upload_limit_is_taken_and_one_byte_more_is_refused(monkeypatch):
    monkeypatch.setattr(image_input, "MAX_UPLOAD_BYTES", 4096)  # the limit as a small one: fast to send
    assert len(decode_data_uri("data:," + "a" * 4096)) == 4096
    problem = problem_of(lambda: decode_data_uri("data:;base64," + base64.b64encode(b"a" * 4097).decode()))
    assert problem["loc"] == ["body", "image_url"] and "4097 bytes; at most 4096" in problem["msg"]


def test_a_checked_image_is_the_bytes_as_sent_and_their_decoded_image():
    data = png(24, 16)
    checked = checked_image(data)
    assert checked.data == data and checked.image.size == (24, 16)
    assert checked.image.getpixel((3, 5)) == (30, 140, 220)


def test_an_image_over_the_input_pixel_limit_is_refused_even_without_a_server_cap():
    side = int(MAX_INPUT_PIXELS ** 0.5) + 8  # a 1-bit png: small to send, over the limit once decoded
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    problem = problem_of(lambda: checked_image(buffer.getvalue(), field="mask_url"))
    assert problem["loc"] == ["body", "mask_url"] and str(MAX_INPUT_PIXELS) in problem["msg"]


def test_bytes_that_are_no_image_are_refused_naming_the_fields_data():
    problem = problem_of(lambda: checked_image(b"not an image at all", field="mask_url"))
    assert problem["loc"] == ["body", "mask_url"] and "mask_url's data" in problem["msg"]


def image_of(url: str, local=lambda url: None, allow_remote: bool = False, fetch=None, max_pixels: int | None = None,
             field: str = "mask_url") -> InputImage:
    extra = {"fetch": fetch} if fetch is not None else {}
    return asyncio.run(image_for(url, local, allow_remote, max_pixels=max_pixels, field=field, **extra))


@pytest.mark.parametrize("url", ["data:image/png;base64,@@@", "data:image/png;base64,"
                                 + base64.b64encode(b"no image").decode()])
def test_a_data_uri_is_refused_on_the_field_that_sent_it(url):
    assert problem_of(lambda: image_of(url))["loc"] == ["body", "mask_url"]


def test_a_served_file_is_read_from_this_server_for_http_and_https_urls(tmp_path):
    served = tmp_path / "upload.png"
    served.write_bytes(png(24, 16))
    files = {"http://127.0.0.1:8188/files/upload.png": served, "https://fal.example/files/upload.png": served}
    for url in files:
        image = image_of(url, local=files.get)
        assert image.data == served.read_bytes() and image.image.size == (24, 16)


def test_a_served_file_is_checked_on_its_field_against_the_cap(tmp_path):
    (tmp_path / "big.png").write_bytes(png(64, 64))
    (tmp_path / "text.png").write_bytes(b"not an image")
    local = {"http://s/big.png": tmp_path / "big.png", "http://s/text.png": tmp_path / "text.png"}.get
    assert problem_of(lambda: image_of("http://s/big.png", local, max_pixels=32 * 32))["loc"] == ["body", "mask_url"]
    assert problem_of(lambda: image_of("http://s/text.png", local))["loc"] == ["body", "mask_url"]
    assert image_of("http://s/big.png", local, max_pixels=64 * 64).image.size == (64, 64)


def test_another_hosts_image_is_fetched_from_its_url_and_checked_on_its_field():
    bodies = {"https://images.example/a.png": png(24, 16), "https://images.example/big.png": png(64, 64),
              "https://images.example/text": b"not an image"}

    async def fetch(url: str) -> bytes:
        if url not in bodies:
            raise RemoteImageError(f"image_url host answered HTTP 404 for {url!r}")
        return bodies[url]

    image = image_of("https://images.example/a.png", allow_remote=True, fetch=fetch)
    assert image.data == bodies["https://images.example/a.png"] and image.image.size == (24, 16)
    for url, cap in [("https://images.example/big.png", 32 * 32), ("https://images.example/text", None),
                     ("https://images.example/gone.png", None)]:
        refused = problem_of(lambda u=url, c=cap: image_of(u, allow_remote=True, fetch=fetch, max_pixels=c))
        assert refused["loc"] == ["body", "mask_url"]


def test_an_input_image_is_written_for_a_hosts_loadimage_as_the_bytes_sent_in_a_new_file(tmp_path):
    data = png()
    image = checked_image(data)
    folder = tmp_path / "input" / "fal"  # made when missing, with its parents
    first, second = image.write(folder), image.write(folder)
    assert first.parent == folder and second.parent == folder and first != second
    assert first.read_bytes() == data and second.read_bytes() == data
