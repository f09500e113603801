"""Image files -> IMAGE (1, H, W, 3) and MASK, as ComfyUI's LoadImage and LoadImageMask read them (image_io.load):
pixel values, which images count as transparent, 32-bit integer images, the size limits at their edges, and
messages that name the file. The mask loaders' channels and the upright size are in test_inpainting.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_krea.image_io.load import (
    ImageFileError,
    decoded_image,
    image_and_mask,
    image_file_problem,
    load_image_file,
    load_mask_file,
)
from comfyui_krea.sampling.parameters import MAX_SIDE


def _saved(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_pixels_are_float32_rgb_in_zero_to_one(tmp_path):
    Image.new("RGB", (3, 2), (255, 128, 0)).save(tmp_path / "rgb.png")
    pixels, mask = load_image_file(tmp_path / "rgb.png")
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 2, 3, 3)
    assert torch.equal(pixels[0, 1, 2], torch.tensor([1.0, 128 / 255, 0.0]))
    assert mask.shape == (1, 64, 64) and mask.max() == 0  # opaque: ComfyUI's empty mask


def test_the_mask_is_one_minus_the_alpha(tmp_path):
    image = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    image.putpixel((1, 0), (10, 20, 30, 51))  # alpha 0.2: mostly transparent, mostly repainted
    image.save(tmp_path / "rgba.png")
    pixels, mask = load_image_file(tmp_path / "rgba.png")
    assert pixels.shape == (1, 1, 2, 3)  # the alpha is the mask, not a fourth channel
    assert torch.allclose(mask, torch.tensor([[[0.0, 0.8]]]))
    gray = Image.new("LA", (2, 1), (200, 255))
    gray.putpixel((0, 0), (200, 0))
    pixels, mask = load_image_file(_saved(gray, tmp_path / "la.png"))
    assert torch.equal(pixels[0, 0, 0], torch.full((3,), 200 / 255)) and mask.tolist() == [[[1.0, 0.0]]]


def test_a_palette_image_with_a_transparent_entry_has_a_mask(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    pixels, mask = load_image_file(_saved(palette, tmp_path / "p.png", transparency=0))
    assert mask.tolist() == [[[1.0, 0.0]]]  # entry 0 (red) transparent: repaint
    assert pixels[0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    _, opaque = load_image_file(_saved(palette, tmp_path / "opaque.png"))
    assert opaque.shape == (1, 64, 64) and opaque.max() == 0


@pytest.mark.parametrize("mode,colour", [("RGB", (1, 2, 3)), ("L", 7)])
def test_a_transparent_colour_outside_a_palette_is_ignored_as_comfyui_does(tmp_path, mode, colour):
    # ComfyUI's LoadImage reads the transparency of alpha channels and palettes only.
    path = _saved(Image.new(mode, (4, 4), colour), tmp_path / "keyed.png", transparency=colour)
    with Image.open(path) as reopened:
        assert "transparency" in reopened.info
    _, mask = load_image_file(path)
    assert mask.shape == (1, 64, 64) and mask.max() == 0


def test_32_bit_integer_images_are_divided_by_255_as_comfyui_does(tmp_path):
    values = Image.new("I", (3, 1), 0)
    for x, value in enumerate((25500, 65025, 100_000)):  # 100, 255, clipped to 255
        values.putpixel((x, 0), value)
    path = _saved(values, tmp_path / "int32.tif")
    with Image.open(path) as reopened:
        assert reopened.mode == "I"
    pixels, _ = load_image_file(path)
    assert torch.equal(pixels[0, 0, :, 0], torch.tensor([100 / 255, 1.0, 1.0]))
    assert torch.equal(load_mask_file(path, "red")[0, 0], torch.tensor([100 / 255, 1.0, 1.0]))
    assert load_mask_file(path, "alpha").max() == 0  # opaque


def test_the_longest_side_may_be_max_side(tmp_path):
    path = _saved(Image.new("L", (MAX_SIDE, 1)), tmp_path / "wide.png")
    assert image_file_problem(path) is None
    assert load_image_file(path)[0].shape == (1, 1, MAX_SIDE, 3)
    too_wide = _saved(Image.new("L", (1, MAX_SIDE + 1)), tmp_path / "tall.png")
    assert f"is 1x{MAX_SIDE + 1}; the longest side may be at most {MAX_SIDE}" in image_file_problem(too_wide)


def test_a_pixel_limit_takes_an_image_of_exactly_that_many_pixels(tmp_path):
    path = _saved(Image.new("RGB", (4, 4)), tmp_path / "square.png")
    decoded_image(path, "square", max_pixels=16).close()
    with pytest.raises(ImageFileError, match="square is 4x4; at most 15 pixels are taken"):
        decoded_image(path, "square", max_pixels=15)


def test_problems_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    assert image_file_problem(broken).startswith(f"input image {broken} ")
    for load in (load_image_file, lambda path: load_mask_file(path, "red")):
        with pytest.raises(ImageFileError, match=f"^input image {broken} "):
            load(broken)
    assert image_file_problem(tmp_path / "gone.png") == f"input image {tmp_path / 'gone.png'} not found"
    assert image_file_problem(tmp_path) == f"input image {tmp_path} is not a file"
    with pytest.raises(ImageFileError, match="is not a file"):
        load_image_file(tmp_path)
    with pytest.raises(ImageFileError, match="not found"):
        load_mask_file(tmp_path / "gone.png", "alpha")


def test_pixels_are_what_comfyui_reads():
    # The pixel rule of ComfyUI's LoadImage (RGB / 255 as float32), on every mode a file can give.
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA")
    for mode in ("RGBA", "RGB", "L", "LA", "P", "CMYK"):
        image = rgba.convert(mode)
        expected = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
        pixels, _ = image_and_mask(image)
        assert np.array_equal(pixels[0].numpy(), expected), mode
