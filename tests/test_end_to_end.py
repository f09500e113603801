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
        assert a.suffix == ".png"  # the shipped workflows' format: ComfyUI restores a dropped png
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


def test_command_line_choices_are_the_parameter_table(capsys):
    args = parse_args(["run", "workflow.json", "--image-size", "portrait_16_9", "--acceleration", "high",
                       "--format", "webp"])
    assert (args.image_size, args.acceleration, args.output_format) == ("portrait_16_9", "high", "webp")
    for option, value in (("--acceleration", "turbo"), ("--image-size", "huge"), ("--format", "gif")):
        with pytest.raises(SystemExit):
            parse_args(["run", "workflow.json", option, value])
        assert "invalid choice" in capsys.readouterr().err
