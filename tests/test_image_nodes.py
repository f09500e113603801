"""KreaEncodeImage, KreaDecode and KreaSaveImage: shapes, errors, file naming, metadata, atomic writes."""
from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.nodes.handles import VaeHandle
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage, KreaSaveImage
from conftest import TINY_AUTOENCODER

PROMPT = {"3": {"class_type": "KreaSampler", "inputs": {"seed": 42, "text": "a café, 東京"}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KreaSampler"}], "links": [], "version": 0.4}
EXIF_MODEL, EXIF_MAKE = 0x0110, 0x010F


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> VaeHandle:
    path = write_random_autoencoder_checkpoint(tmp_path_factory.mktemp("vae") / "ae.safetensors", TINY_AUTOENCODER)
    return VaeHandle(path, torch.device("cpu"))


@pytest.fixture
def output_dir(tmp_path, host_state):
    host_state.configure_standalone(output_dir=tmp_path)
    return tmp_path


def all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_registered_under_krea_image():
    for node_id, name in (("KreaEncodeImage", "Krea Encode Image"), ("KreaDecode", "Krea Decode"),
                          ("KreaSaveImage", "Krea Save Image")):
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        assert cls.CATEGORY == "Krea/image" and cls.DESCRIPTION
        assert hasattr(cls, cls.FUNCTION)
    assert KreaSaveImage.OUTPUT_NODE is True
    hidden = KreaSaveImage.INPUT_TYPES()["hidden"]
    assert hidden == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    required = KreaSaveImage.INPUT_TYPES()["required"]
    assert required["output_format"][0] == ["jpeg", "png", "webp"]
    assert required["output_format"][1]["default"] == "jpeg"
    assert required["filename_prefix"][1]["default"] == "krea/krea"
    assert (required["quality"][1]["min"], required["quality"][1]["max"], required["quality"][1]["default"]) \
        == (1, 100, 95)


def test_encode_then_decode_shapes(vae):
    image = torch.rand(2, 48, 64, 3)
    (latent,) = KreaEncodeImage().encode(vae, image)
    assert latent["samples"].shape == (2, 16, 6, 8) and latent["samples"].dtype == torch.float32
    (decoded,) = KreaDecode().decode(vae, latent)
    assert decoded.shape == (2, 48, 64, 3) and decoded.dtype == torch.float32
    assert decoded.device.type == "cpu"
    assert decoded.min() >= 0 and decoded.max() <= 1 and decoded.std() > 0


def test_encode_matches_the_autoencoder_on_minus_one_to_one(vae):
    image = torch.rand(1, 32, 32, 3)
    (latent,) = KreaEncodeImage().encode(vae, image)
    expected = vae.load().encode(image.permute(0, 3, 1, 2) * 2 - 1)
    assert torch.equal(latent["samples"], expected)


def test_encode_resizes_to_multiples_of_16(vae, caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_krea.nodes.image"):
        (latent,) = KreaEncodeImage().encode(vae, torch.rand(1, 40, 57, 3))
    assert latent["samples"].shape == (1, 16, 48 // 8, 64 // 8)  # 40 -> 48, 57 -> 64
    assert "resizing 57x40 to 64x48" in caplog.text
    (latent,) = KreaEncodeImage().encode(vae, torch.rand(1, 7, 16, 3))
    assert latent["samples"].shape == (1, 16, 2, 2)  # never below 16


def test_encode_drops_alpha(vae):
    rgb = torch.rand(1, 32, 32, 3)
    rgba = torch.cat([rgb, torch.rand(1, 32, 32, 1)], dim=-1)
    assert torch.equal(KreaEncodeImage().encode(vae, rgba)[0]["samples"],
                       KreaEncodeImage().encode(vae, rgb)[0]["samples"])


@pytest.mark.parametrize("image, message", [
    (torch.rand(1, 32, 32, 1), "grayscale"),
    (torch.rand(32, 32, 3), "without a batch dimension"),
    (torch.rand(1, 3, 32, 32), "channels-first"),
    (torch.rand(2, 1, 32, 32, 3), "4 dimensions"),
    (torch.rand(0, 32, 32, 3), "empty"),
    ([[0.0]], "must be an IMAGE"),
])
def test_wrong_images_are_refused(vae, image, message):
    with pytest.raises(ValueError, match=message):
        KreaEncodeImage().encode(vae, image)


@pytest.mark.parametrize("samples, message", [
    ({"samples": torch.zeros(1, 4, 8, 8)}, "4 channels .a Stable Diffusion"),
    ({"samples": torch.zeros(1, 16, 2, 8, 8)}, "Video"),
    (torch.zeros(1, 16, 8, 8), "must be a LATENT"),
    ({}, "must be a LATENT"),
])
def test_decode_refuses_other_latents(vae, samples, message):
    with pytest.raises(ValueError, match=message):
        KreaDecode().decode(vae, samples)


def saved_paths(result, output_dir):
    return [output_dir / r["subfolder"] / r["filename"] for r in result["ui"]["images"]]


def test_png_metadata_round_trip(output_dir):
    result = KreaSaveImage().save(torch.rand(1, 24, 32, 3), "krea/krea", "png", 95, PROMPT,
                                  {"workflow": WORKFLOW, "extra": [1, 2]})
    (path,) = saved_paths(result, output_dir)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (32, 24)
        assert json.loads(image.text["prompt"]) == PROMPT
        assert json.loads(image.text["workflow"]) == WORKFLOW
        assert json.loads(image.text["extra"]) == [1, 2]


@pytest.mark.parametrize("output_format, pil_format, extension", [("webp", "WEBP", "webp"),
                                                                   ("jpeg", "JPEG", "jpg")])
def test_exif_metadata_round_trip(output_dir, output_format, pil_format, extension):
    result = KreaSaveImage().save(torch.rand(1, 24, 32, 3), "krea/krea", output_format, 90, PROMPT,
                                  {"workflow": WORKFLOW})
    (path,) = saved_paths(result, output_dir)
    assert path.suffix == f".{extension}"
    with Image.open(path) as image:
        assert image.format == pil_format
        exif = image.getexif()
    key, _, value = exif[EXIF_MODEL].partition(":")
    assert key == "prompt" and json.loads(value) == PROMPT
    key, _, value = exif[EXIF_MAKE].partition(":")
    assert key == "workflow" and json.loads(value) == WORKFLOW


def test_no_metadata_without_prompt(output_dir):
    for output_format in ("png", "webp", "jpeg"):
        (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 16, 16, 3), "plain", output_format), output_dir)
        with Image.open(path) as image:
            assert EXIF_MODEL not in image.getexif()
            assert "prompt" not in getattr(image, "text", {})


def test_jpeg_keeps_the_prompt_when_the_workflow_is_too_big(output_dir, caplog):
    huge = {"nodes": ["x" * 1000] * 100}
    result = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "big", "jpeg", 95, PROMPT, {"workflow": huge})
    (path,) = saved_paths(result, output_dir)
    with Image.open(path) as image:
        exif = image.getexif()
    assert json.loads(exif[EXIF_MODEL].partition(":")[2]) == PROMPT
    assert EXIF_MAKE not in exif
    assert "too large for JPEG" in caplog.text


def test_quality_changes_jpeg_size_and_pixels_are_kept(output_dir):
    image = torch.rand(1, 64, 64, 3)
    (low,) = saved_paths(KreaSaveImage().save(image, "q", "jpeg", 10), output_dir)
    (high,) = saved_paths(KreaSaveImage().save(image, "q", "jpeg", 100), output_dir)
    assert low.stat().st_size < high.stat().st_size
    (png,) = saved_paths(KreaSaveImage().save(image, "q", "png", 1), output_dir)
    with Image.open(png) as saved:
        pixels = torch.from_numpy(np.array(saved)).float()
    assert torch.equal(pixels, (image[0] * 255).round())  # png ignores quality: lossless


def test_counter_naming_and_ui_result(output_dir):
    first = KreaSaveImage().save(torch.rand(2, 16, 16, 3), "krea/krea", "jpeg")
    second = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "krea/krea", "png")
    assert first == {"ui": {"images": [
        {"filename": "krea_00001_.jpg", "subfolder": "krea", "type": "output"},
        {"filename": "krea_00002_.jpg", "subfolder": "krea", "type": "output"}]}}
    assert second["ui"]["images"] == [{"filename": "krea_00003_.png", "subfolder": "krea", "type": "output"}]
    top = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "top", "webp")
    assert top["ui"]["images"] == [{"filename": "top_00001_.webp", "subfolder": "", "type": "output"}]
    assert all_files(output_dir) == ["krea/krea_00001_.jpg", "krea/krea_00002_.jpg", "krea/krea_00003_.png",
                                     "top_00001_.webp"]


def test_no_temporary_files_are_left(output_dir):
    KreaSaveImage().save(torch.rand(3, 16, 16, 3), "krea/krea", "webp", 80, PROMPT, {"workflow": WORKFLOW})
    assert all_files(output_dir) == [f"krea/krea_0000{i}_.webp" for i in (1, 2, 3)]


def test_a_failed_write_leaves_nothing(output_dir, monkeypatch):
    def half_write(self, stream, **kwargs):
        stream.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        KreaSaveImage().save(torch.rand(1, 16, 16, 3), "krea/krea", "png")
    assert all_files(output_dir) == []


def test_unwritable_output_folder_is_named(output_dir, monkeypatch):
    (output_dir / "blocked").write_text("a file where the folder should be")
    with pytest.raises(OSError, match="output folder .*blocked"):
        KreaSaveImage().save(torch.rand(1, 16, 16, 3), "blocked/krea", "png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match=f"Cannot write images to the output folder {output_dir / 'krea'}"):
        KreaSaveImage().save(torch.rand(1, 16, 16, 3), "krea/krea", "png")


@pytest.mark.parametrize("kwargs, message", [
    ({"quality": 0}, "quality must be an integer from 1 to 100"),
    ({"quality": 101}, "quality must be an integer from 1 to 100"),
    ({"output_format": "gif"}, "output_format 'gif' is not one of jpeg, png, webp"),
    ({"filename_prefix": ""}, "filename_prefix must not be empty"),
    ({"filename_prefix": "../outside"}, "outside the output folder"),
])
def test_bad_save_inputs_are_refused(output_dir, kwargs, message):
    arguments = {"images": torch.rand(1, 16, 16, 3), "filename_prefix": "krea/krea", "output_format": "png",
                 "quality": 95, **kwargs}
    with pytest.raises(ValueError, match=message):
        KreaSaveImage().save(**arguments)
    assert all_files(output_dir) == []


def test_save_refuses_wrong_image_shapes(output_dir):
    with pytest.raises(ValueError, match="grayscale"):
        KreaSaveImage().save(torch.rand(1, 16, 16, 1), "krea/krea")
    assert not os.listdir(output_dir)


def test_saved_files_get_ordinary_permissions(output_dir):
    import stat

    ui = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "perm/p", "png")
    path = output_dir / "perm" / ui["ui"]["images"][0]["filename"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


# ------------------------------------------------------------------------------ no file is ever replaced (issue 14)

def test_a_name_taken_since_the_folder_scan_is_not_replaced(output_dir, monkeypatch):
    # Two runs that scanned the folder at the same moment both get counter 1 from the host: the second one
    # must take the next free name instead of replacing the first one's image.
    from comfyui_krea.nodes import host

    scanned = host.save_image_path
    monkeypatch.setattr(host, "save_image_path", lambda prefix, w, h: (*scanned(prefix, w, h)[:2], 1,
                                                                       scanned(prefix, w, h)[3]))
    first = KreaSaveImage().save(torch.zeros(2, 16, 16, 3), "race/r", "png")["ui"]["images"]
    second = KreaSaveImage().save(torch.ones(2, 16, 16, 3), "race/r", "png")["ui"]["images"]
    assert [i["filename"] for i in first] == ["r_00001_.png", "r_00002_.png"]
    assert [i["filename"] for i in second] == ["r_00003_.png", "r_00004_.png"]
    pixels = [np.asarray(Image.open(output_dir / "race" / f"r_0000{n}_.png")).max() for n in (1, 2, 3, 4)]
    assert pixels == [0, 0, 255, 255]  # the first run's images are still there
    assert all_files(output_dir) == [f"race/r_0000{n}_.png" for n in (1, 2, 3, 4)]


def test_batch_num_prefix_does_not_overwrite_the_previous_run(output_dir):
    for value in (0.0, 1.0):
        KreaSaveImage().save(torch.full((2, 16, 16, 3), value), "b/x_%batch_num%", "png")
    files = all_files(output_dir)
    assert len(files) == 4, files
    assert sorted(np.asarray(Image.open(output_dir / f)).max() for f in files) == [0, 0, 255, 255]


SAVER = """
import sys, torch
from comfyui_krea.nodes import host
from comfyui_krea.nodes.image import KreaSaveImage
host.configure_standalone(output_dir=sys.argv[1])
value = float(sys.argv[2])
for _ in range(12):
    KreaSaveImage().save(torch.full((2, 8, 8, 3), value), "same/img", "png")
"""


def test_two_processes_saving_to_one_folder_keep_every_image(output_dir):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-c", SAVER, str(output_dir), str(value)], env=env,
                             stderr=subprocess.PIPE, text=True) for value in (0.0, 1.0)]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()
    files = all_files(output_dir)
    assert len(files) == 48 and len(set(files)) == 48, files  # 2 processes x 12 saves x 2 images
    values = [int(np.asarray(Image.open(output_dir / f)).max()) for f in files]
    assert values.count(0) == 24 and values.count(255) == 24
