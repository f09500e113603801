"""The shipped API workflows, end to end on small random-weight models, through the in-process runner
and the command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_krea.standalone.cli import main, parse_args
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.node_classes import PACK_CLASSES
from comfyui_krea.standalone.runner import WorkflowError, run

ROOT = Path(__file__).resolve().parent.parent
CLASSES = PACK_CLASSES


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def demo(demo_models, tmp_path, host_state):
    """The demo models, with images going to tmp_path."""
    models, tokenizers = demo_models
    host_state.configure(models_dir=models, output_dir=tmp_path, tokenizer_dir=tokenizers)
    return demo_models


def load_workflow(name: str, **sampler) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "KreaSampler":
            node["inputs"].update({"image_size": "custom", "width": 128, "height": 96, "num_inference_steps": 3,
                                   **sampler})
    return prompt


def saved_files(uis: dict, out: Path) -> list[Path]:
    return [out / img["subfolder"] / img["filename"] for ui in uis.values() for img in ui.get("images", [])]


def test_text_to_image_workflow_writes_images_deterministically(demo, tmp_path):
    first = saved_files(run(load_workflow("krea_text_to_image", num_images=2), CLASSES), tmp_path)
    second = saved_files(run(load_workflow("krea_text_to_image", num_images=2), CLASSES), tmp_path)
    assert len(first) == 2 and len(second) == 2 and not set(first) & set(second)
    for a, b in zip(first, second):
        assert a.suffix == ".jpg"
        assert a.read_bytes() == b.read_bytes()
        with Image.open(a) as img:
            assert img.size == (128, 96)
    assert first[0].read_bytes() != first[1].read_bytes()


def test_image_to_image_workflow(demo, tmp_path):
    source = tmp_path / "input.png"
    pixels = (np.random.default_rng(0).random((80, 112, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(source)
    prompt = load_workflow("krea_image_to_image", num_inference_steps=40)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = str(source)
        if node["class_type"] == "KreaSaveImage":
            node["inputs"]["output_format"] = "png"
    uis = run(prompt, CLASSES)
    (path,) = saved_files(uis, tmp_path)
    with Image.open(path) as img:
        assert img.size == (112, 80)  # the input's size (already multiples of 16)
        assert json.loads(img.text["prompt"])["3"]["class_type"] == "KreaSampler"
    sampler_ui = next(ui for node_id, ui in uis.items() if prompt[node_id]["class_type"] == "KreaSampler")
    # 40 steps at strength 0.95: the last 38 run
    assert "38 of 38 steps" in sampler_ui["text"][0]


@pytest.mark.parametrize("change,message", [
    ({"num_inference_steps": 51}, "num_inference_steps: 51 is bigger than the maximum 50"),
    ({"guidance_scale": 0.5}, "guidance_scale: 0.5 is smaller than the minimum 1.0"),
    ({"num_images": 5}, "num_images: 5 is bigger than the maximum 4"),
    ({"width": 1000}, "width must be a multiple of 16"),
    ({"strength": 0}, "strength: 0 is smaller than the minimum 0.01"),
    ({"height": 14144}, "height must be a multiple of 16 between 16 and 14142"),
])
def test_bad_values_refused_before_any_model_loads(tmp_path, host_state, change, message):
    # No models at all: a refusal about the value proves nothing was loaded first.
    host_state.configure(models_dir=tmp_path / "none", output_dir=tmp_path)
    with pytest.raises(WorkflowError, match=message):
        run(load_workflow("krea_text_to_image", **change), CLASSES)
    assert not any(tmp_path.rglob("*.jpg"))


def test_missing_model_file_names_the_folder_searched(demo):
    prompt = load_workflow("krea_text_to_image")
    prompt["1"]["inputs"]["model_name"] = "flux1-krea-dev-missing.safetensors"
    with pytest.raises(WorkflowError) as err:
        run(prompt, CLASSES)
    assert "flux1-krea-dev-missing.safetensors" in str(err.value)
    assert str(demo[0] / "diffusion_models") in str(err.value)


def test_command_line_demo(tmp_path, capsys, host_state):
    code = main(["run", str(ROOT / "workflows/api/krea_text_to_image.json"), "--demo", "--output", str(tmp_path),
                 "--steps", "2", "--seed", "7", "--prompt", "a red fox", "--format", "png"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "RANDOM-WEIGHT" in out.err and "noise" in out.err
    (line,) = [text for text in out.out.splitlines() if text.startswith("saved ")]
    path = Path(line.removeprefix("saved "))
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as img:
        prompt = json.loads(img.text["prompt"])
    assert prompt["2"]["inputs"]["prompt"] == "a red fox" and prompt["3"]["inputs"]["seed"] == 7


def test_command_line_runs_the_ui_workflow_as_its_api_form(capsys, tmp_path):
    """The shipped UI-format file, converted as the frontend would, makes the very image of the API-format file."""
    pixels = []
    for name in ("workflows/krea_text_to_image.json", "workflows/api/krea_text_to_image.json"):
        out = tmp_path / name.replace("/", "_")
        assert main(["run", str(ROOT / name), "--demo", "--output", str(out), "--steps", "2", "--seed", "7",
                     "--format", "png"]) == 0, capsys.readouterr().err
        (line,) = [text for text in capsys.readouterr().out.splitlines() if text.startswith("saved ")]
        with Image.open(line.removeprefix("saved ")) as img:
            pixels.append(np.asarray(img).copy())
    assert np.array_equal(*pixels)


def test_command_line_runs_the_inpainting_ui_workflow_as_its_api_form(capsys, tmp_path):
    """The shipped inpainting workflow, UI and API format, with --image and --mask: the same image."""
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))).save(tmp_path / "mask.png")
    pixels = []
    for name in ("workflows/krea_inpainting.json", "workflows/api/krea_inpainting.json"):
        out = tmp_path / name.replace("/", "_")
        assert main(["run", str(ROOT / name), "--demo", "--output", str(out), "--steps", "2", "--format", "png",
                     "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]) == 0, \
            capsys.readouterr().err
        stdout = capsys.readouterr().out
        assert "inpainting: 50% of the image repainted" in stdout  # the gradient's right half is >= 0.5
        (line,) = [text for text in stdout.splitlines() if text.startswith("saved ")]
        with Image.open(line.removeprefix("saved ")) as img:
            pixels.append(np.asarray(img).copy())
    assert np.array_equal(*pixels)


def test_command_line_choices_are_the_parameter_table(capsys):
    args = parse_args(["run", "workflow.json", "--image-size", "portrait_16_9", "--acceleration", "high",
                       "--format", "webp"])
    assert (args.image_size, args.acceleration, args.output_format) == ("portrait_16_9", "high", "webp")
    for option, value in (("--acceleration", "turbo"), ("--image-size", "huge"), ("--format", "gif")):
        with pytest.raises(SystemExit):
            parse_args(["run", "workflow.json", option, value])
        assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- inpainting

class CaptureLatents:
    """A test-only output node: hands the sampler's latent and the encoded input back through its ui."""
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {}), "source": ("LATENT", {})}}

    def capture(self, samples: dict, source: dict) -> dict:
        return {"ui": {"latents": [samples["samples"], source["samples"]]}}


def inpainting_run(source: Path, mask: Path) -> tuple[dict, dict]:
    prompt = load_workflow("krea_inpainting", num_inference_steps=8)
    for node in prompt.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            node["inputs"]["image"] = str(source if node["class_type"] == "LoadImage" else mask)
        if node["class_type"] == "KreaSaveImage":
            node["inputs"]["output_format"] = "png"
    prompt["99"] = {"class_type": "CaptureLatents", "inputs": {"samples": ["3", 0], "source": ["8", 0]}}
    return prompt, run(prompt, {**CLASSES, "CaptureLatents": CaptureLatents})


def test_inpainting_workflow_keeps_the_unmasked_region(demo, tmp_path):
    """The shipped inpainting workflow on files: an image and a black-and-white mask (white = repaint, the right 48
    of 112 columns). In latent space the kept region is the input's latent exactly; in pixels the output is
    measured against the same workflow with an all-black mask (nothing repainted: the input's latent decoded)."""
    source, mask, empty = tmp_path / "input.png", tmp_path / "mask.png", tmp_path / "empty.png"
    Image.fromarray((np.random.default_rng(0).random((80, 112, 3)) * 255).astype(np.uint8)).save(source)
    pixels = np.zeros((80, 112), np.uint8)
    pixels[:, 64:] = 255
    Image.fromarray(pixels).save(mask)
    Image.fromarray(np.zeros((80, 112), np.uint8)).save(empty)
    prompt, uis = inpainting_run(source, mask)
    samples, encoded = uis["99"]["latents"]
    per_column = (samples - encoded).abs().amax(dim=(0, 1, 2))  # 14 latent columns
    assert per_column[:8].max() < 1e-5 and per_column[8:].min() > 0.1
    sampler_ui = next(ui for node_id, ui in uis.items() if prompt[node_id]["class_type"] == "KreaSampler")
    assert "inpainting: 43% of the image repainted" in sampler_ui["text"][0]  # 48 of 112 columns
    (inpainted,) = saved_files(uis, tmp_path)
    _, empty_uis = inpainting_run(source, empty)
    samples, encoded = empty_uis["99"]["latents"]
    assert (samples - encoded).abs().max() < 1e-5
    (kept,) = saved_files(empty_uis, tmp_path)
    with Image.open(inpainted) as a, Image.open(kept) as b:
        difference = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=(0, 2))
    outside, inside = difference[:48].mean(), difference[64:].mean()  # 16 px from the border on the kept side
    # Measured: outside 49.9, inside 73.8 (of 255). The kept latent is exact, but the autoencoder's decoder
    # normalizes over the whole image (GroupNorm) and attends across it, so kept pixels move when the repainted
    # part changes; the demo's random weights and the random transformer's large latents there (about 6x the
    # input's) make that move large. With trained weights the repainted latent has the image's statistics.
    assert outside < 0.8 * inside, (outside, inside)
