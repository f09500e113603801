"""KreaSaveImage: file names (counter, batch number, subfolders, the host's %width% and %height%), metadata (PNG
text, EXIF, none without a prompt, honouring ComfyUI's --disable-metadata), quality, the inputs' checks, and
atomic writes that never replace a file."""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_krea.image_io.save import _current_umask, to_pil
from comfyui_krea.nodes.host import host
from comfyui_krea.nodes.image import KreaSaveImage

PROMPT = {"3": {"class_type": "KreaSampler", "inputs": {"seed": 42, "text": "a café, 東京"}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KreaSampler"}], "links": [], "version": 0.4}
EXIF_MODEL, EXIF_MAKE = 0x0110, 0x010F


def all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


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
                                  {"workflow": WORKFLOW, "extra": [1, 2]})
    (path,) = saved_paths(result, output_dir)
    assert path.suffix == f".{extension}"
    with Image.open(path) as image:
        assert image.format == pil_format
        exif = image.getexif()
    key, _, value = exif[EXIF_MODEL].partition(":")
    assert key == "prompt" and json.loads(value) == PROMPT
    key, _, value = exif[EXIF_MAKE].partition(":")
    assert key == "workflow" and json.loads(value) == WORKFLOW
    assert exif[EXIF_MAKE - 1] == "extra:[1, 2]"  # further keys count down from Make


def jpeg_markers(path) -> list[int]:
    """The markers of a JPEG's segments from its start to the image data (0xE1: APP1, where EXIF goes)."""
    data, markers, pos = path.read_bytes(), [], 2
    while data[pos + 1] != 0xDA:  # start of scan
        markers.append(data[pos + 1])
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return markers


def test_no_metadata_without_prompt(output_dir):
    for output_format in ("png", "webp", "jpeg"):
        (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 16, 16, 3), "plain", output_format), output_dir)
        with Image.open(path) as image:
            assert "exif" not in image.info  # no EXIF block at all, not an empty one
            assert "prompt" not in getattr(image, "text", {})
    assert 0xE1 not in jpeg_markers(path)


def test_jpeg_keeps_the_prompt_when_the_workflow_is_too_big(output_dir, caplog):
    huge = {"nodes": ["x" * 1000] * 100}
    result = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "big", "jpeg", 95, PROMPT, {"workflow": huge})
    (path,) = saved_paths(result, output_dir)
    with Image.open(path) as image:
        exif = image.getexif()
    assert json.loads(exif[EXIF_MODEL].partition(":")[2]) == PROMPT
    assert EXIF_MAKE not in exif and jpeg_markers(path).count(0xE1) == 1
    assert "too large for JPEG" in caplog.text


def test_jpeg_without_room_for_the_prompt_has_no_metadata(output_dir, caplog):
    huge = {"1": {"inputs": {"text": "x" * 70_000}}}
    (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 16, 16, 3), "big", "jpeg", 95, huge), output_dir)
    assert 0xE1 not in jpeg_markers(path)
    assert "The prompt is too large for JPEG EXIF" in caplog.text


def jpeg_exif_length(prompt, workflow) -> int:
    exif = Image.Exif()  # the tags ComfyUI writes, built here with PIL alone
    exif[EXIF_MODEL], exif[EXIF_MAKE] = "prompt:" + json.dumps(prompt), "workflow:" + json.dumps(workflow)
    return len(exif.tobytes())


def test_jpeg_keeps_a_workflow_that_fills_the_exif_segment(output_dir, caplog):
    # One JPEG APP1 segment (and PIL's JPEG writer) takes at most 65533 bytes; EXIF pads each text to an even
    # length, so 65532 is the most that these tags can fill.
    workflow = {"notes": "x" * 60_000}
    workflow["notes"] += "x" * (65532 - jpeg_exif_length(PROMPT, workflow))
    assert jpeg_exif_length(PROMPT, workflow) == 65532
    (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 16, 16, 3), "fit", "jpeg", 95, PROMPT,
                                               {"workflow": workflow}), output_dir)
    with Image.open(path) as image:
        assert json.loads(image.getexif()[EXIF_MAKE].partition(":")[2]) == workflow
    assert "too large" not in caplog.text
    workflow["notes"] += "xx"  # 65534 bytes: one word too many
    (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 16, 16, 3), "fit", "jpeg", 95, PROMPT,
                                               {"workflow": workflow}), output_dir)
    with Image.open(path) as image:
        assert EXIF_MAKE not in image.getexif() and EXIF_MODEL in image.getexif()


def png_zlib_level_class(path) -> int:
    """FLEVEL of the first IDAT's zlib header: 0 for levels 0-1, 1 for 2-5, 2 for 6, 3 for 7-9 (RFC 1950)."""
    data = path.read_bytes()
    start = data.index(b"IDAT") + 4
    return data[start + 1] >> 6


def test_png_is_compressed_at_comfyuis_level(output_dir):
    (path,) = saved_paths(KreaSaveImage().save(torch.rand(1, 32, 32, 3), "level", "png"), output_dir)
    assert png_zlib_level_class(path) == 1  # ComfyUI's SaveImage uses compress_level 4
    Image.open(path).save(output_dir / "pil_default.png")
    assert png_zlib_level_class(output_dir / "pil_default.png") == 2  # PIL's own default, 6: told apart


def test_quality_changes_jpeg_and_webp_size_and_png_pixels_are_kept(output_dir):
    image = torch.rand(1, 64, 64, 3)
    for output_format in ("jpeg", "webp"):
        (low,) = saved_paths(KreaSaveImage().save(image, "q", output_format, 10), output_dir)
        (high,) = saved_paths(KreaSaveImage().save(image, "q", output_format, 100), output_dir)
        assert low.stat().st_size < high.stat().st_size, output_format
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
    ui = KreaSaveImage().save(torch.rand(1, 16, 16, 3), "perm/p", "png")
    path = output_dir / "perm" / ui["ui"]["images"][0]["filename"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_reading_the_umask_leaves_it_as_it_was():
    old = os.umask(0o027)
    try:
        assert _current_umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_to_pil_clamps_and_rounds_in_float32():
    assert np.asarray(to_pil(torch.tensor([[[-0.5, 0.5, 1.5]]]))).tolist() == [[[0, 128, 255]]]
    half = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert np.array_equal(np.asarray(to_pil(half)), np.asarray(to_pil(half.float())))


# --------------------------------------------------------------------- defaults, names and the inputs' checks

def test_save_defaults_and_batch_numbers_in_names(output_dir):
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    KreaSaveImage().save(images)
    KreaSaveImage().save(images, "b/img_%batch_num%", "png")
    files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    # png by default: ComfyUI's editor restores the workflow of a dropped png (or webp), not of a jpeg
    assert files == ["b/img_0_00001_.png", "b/img_1_00002_.png", "krea/krea_00001_.png", "krea/krea_00002_.png"]
    KreaSaveImage().save(images[:1], "q/explicit", "png", 95)
    assert (output_dir / "krea/krea_00001_.png").read_bytes() == (output_dir / "q/explicit_00001_.png").read_bytes()


def test_linked_safety_flags_are_listed_with_each_image(output_dir):
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    saved = KreaSaveImage().save(images, "flags/f", "png", has_nsfw_concepts="[true, false]")["ui"]["images"]
    assert [(entry["filename"], entry["has_nsfw_concept"]) for entry in saved] == [
        ("f_00001_.png", True), ("f_00002_.png", False)]
    assert "has_nsfw_concept" not in KreaSaveImage().save(images[:1], "flags/g", "png")["ui"]["images"][0]


@pytest.mark.parametrize("flags", ["[true]", "[true, 1]", "not json", '{"a": true}', "[true, false, true]"])
def test_flags_that_are_not_one_per_image_are_refused_before_anything_is_written(output_dir, flags):
    with pytest.raises(ValueError, match="has_nsfw_concepts must be Krea Safety Check's output for these 2 image"):
        KreaSaveImage().save(torch.rand(2, 16, 16, 3), "refused/r", "png", has_nsfw_concepts=flags)
    assert not (output_dir / "refused").exists()


def test_save_gives_the_host_the_images_width_and_height(output_dir, monkeypatch):
    asked = []
    real = host.save_image_path

    def save_image_path(prefix, width, height):  # ComfyUI's fills %width% and %height% in the prefix
        asked.append((width, height))
        return real(prefix, width, height)

    monkeypatch.setattr(host, "save_image_path", save_image_path)
    KreaSaveImage().save(torch.zeros(1, 8, 12, 3), "wh/x", "png")
    assert asked == [(12, 8)]


def test_save_quality_must_be_a_whole_number_not_a_boolean(output_dir):
    with pytest.raises(ValueError, match="quality must be an integer from 1 to 100, got True"):
        KreaSaveImage().save(torch.zeros(1, 8, 8, 3), "x", "jpeg", True)


def test_save_prefix_validation(output_dir):
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix=None) is True  # linked: checked when the node runs
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix=5).startswith("filename_prefix must be a non-empty text")
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix="  ").startswith("filename_prefix must be a non-empty text")


def test_save_ignores_a_workflow_that_is_not_a_dict_and_honours_disabled_metadata(output_dir, monkeypatch):
    image = torch.zeros(1, 8, 8, 3)
    out = KreaSaveImage().save(image, "m/a", "png", prompt={"1": {}}, extra_pnginfo="not a workflow")
    saved = Image.open(output_dir / "m" / out["ui"]["images"][0]["filename"])
    assert set(saved.text) == {"prompt"}
    monkeypatch.setattr(host, "metadata_enabled", lambda: False)  # ComfyUI's --disable-metadata
    out = KreaSaveImage().save(image, "m/b", "png", prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    assert Image.open(output_dir / "m" / out["ui"]["images"][0]["filename"]).text == {}


# ------------------------------------------------------------------------------ no file is ever replaced (issue 14)

def test_a_name_taken_since_the_folder_scan_is_not_replaced(output_dir, monkeypatch):
    # Two runs that scanned the folder at the same moment both get counter 1 from the host: the second one
    # must take the next free name instead of replacing the first one's image.
    from comfyui_krea.nodes.host import host

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
from comfyui_krea.nodes.host import host
from comfyui_krea.nodes.image import KreaSaveImage
host.configure(output_dir=sys.argv[1])
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


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_taken_name_sends_the_image_to_the_next_free_one(output_dir, monkeypatch, hard_links):
    scanned = host.save_image_path  # a folder scan out of date: counter 1, although another run took it since
    monkeypatch.setattr(host, "save_image_path", lambda prefix, w, h: (*scanned(prefix, w, h)[:2], 1,
                                                                       scanned(prefix, w, h)[3]))
    if not hard_links:  # some network and FAT file systems: the name is claimed by an exclusive create instead

        def no_link(source, target):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    (output_dir / "r").mkdir()
    (output_dir / "r" / "r_00001_.png").write_bytes(b"another run's image")
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(2))
    (path,) = saved_paths(KreaSaveImage().save(image, "r/r", "png"), output_dir)
    assert path.name == "r_00002_.png"
    assert (output_dir / "r" / "r_00001_.png").read_bytes() == b"another run's image"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(to_pil(image[0])))  # complete
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert all_files(output_dir) == ["r/r_00001_.png", "r/r_00002_.png"]


def test_an_image_is_written_to_a_hidden_temporary_file_in_its_own_folder(output_dir, monkeypatch):
    # In the output folder itself, so that naming it is a link or rename within one file system; hidden, and
    # named as a temporary file, while it is incomplete.
    seen, real_fsync = [], os.fsync

    def fsync(fd):
        seen.append([p.name for p in (output_dir / "t").iterdir()])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    KreaSaveImage().save(torch.rand(1, 8, 8, 3), "t/t", "png")
    assert len(seen) == 1 and len(seen[0]) == 1 and re.fullmatch(r"\.krea-\w+\.tmp", seen[0][0]), seen
