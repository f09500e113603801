"""`python -m comfyui_krea run` on the command line (__main__.py), each option pinned by a test that fails without
it: every option reaches the input it names (`apply_overrides`), and end-to-end runs of `main([...])` on small
random-weight models show each option's effect in the printed lines and written files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_krea.nodes.host import forget_loaded, host
from comfyui_krea.standalone.cli import main, parse_args
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.overrides import apply_overrides
from comfyui_krea.standalone.runner import WorkflowError

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
IMAGE_TO_IMAGE = ROOT / "workflows" / "api" / "krea_image_to_image.json"
INPAINTING = ROOT / "workflows" / "api" / "krea_inpainting.json"


# --------------------------------------------------------------------------------- command line: apply_overrides

def overridden(workflow: Path, *options: str) -> dict:
    prompt = json.loads(workflow.read_text())
    apply_overrides(prompt, parse_args(["run", str(workflow), *options]))
    return prompt


@pytest.mark.parametrize("options,node_id,expected", [
    (["--prompt", "a red fox"], "2", {"prompt": "a red fox"}),
    (["--seed", "123"], "3", {"seed": 123}),
    (["--width", "320", "--height", "208"], "3", {"image_size": "custom", "width": 320, "height": 208}),
    (["--width", "320"], "3", {"image_size": "custom", "width": 320, "height": 768}),
    (["--image-size", "portrait_16_9"], "3", {"image_size": "portrait_16_9"}),
    (["--steps", "7"], "3", {"num_inference_steps": 7}),
    (["--guidance", "3.25"], "3", {"guidance_scale": 3.25}),
    (["--num-images", "3"], "3", {"num_images": 3}),
    (["--acceleration", "high"], "3", {"acceleration": "high"}),
    (["--format", "webp"], "6", {"output_format": "webp"}),
    (["--no-safety-checker"], "5", {"enable_safety_checker": False}),
    (["--set", "6.quality=80"], "6", {"quality": 80}),
], ids=["prompt", "seed", "width-height", "width-only", "image-size", "steps", "guidance", "num-images",
        "acceleration", "format", "no-safety-checker", "set"])
def test_each_option_sets_its_input(options, node_id, expected):
    original = json.loads(TEXT_TO_IMAGE.read_text())
    prompt = overridden(TEXT_TO_IMAGE, *options)
    assert {name: prompt[node_id]["inputs"][name] for name in expected} == expected
    # ... and nothing else changes.
    for name in expected:
        original[node_id]["inputs"][name] = expected[name]
    assert prompt == original


def test_no_options_change_nothing():
    assert overridden(TEXT_TO_IMAGE) == json.loads(TEXT_TO_IMAGE.read_text())
    assert overridden(TEXT_TO_IMAGE)["5"]["inputs"]["enable_safety_checker"] is True


def test_image_option_sets_the_load_image_node(tmp_path):
    prompt = overridden(IMAGE_TO_IMAGE, "--image", str(tmp_path / "in.png"), "--strength", "0.6")
    (load,) = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert load["inputs"]["image"] == str(tmp_path / "in.png")
    assert prompt["3"]["inputs"]["strength"] == 0.6


def test_mask_option_sets_the_load_image_mask_node_only(tmp_path):
    prompt = overridden(INPAINTING, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"))
    (load,) = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    (mask,) = [n for n in prompt.values() if n["class_type"] == "LoadImageMask"]
    assert load["inputs"]["image"] == str(tmp_path / "in.png")
    assert mask["inputs"] == {"image": str(tmp_path / "m.png"), "channel": "red"}
    with pytest.raises(WorkflowError, match="--mask is not used by this workflow: it needs a LoadImageMask node"):
        overridden(IMAGE_TO_IMAGE, "--mask", str(tmp_path / "m.png"))


@pytest.mark.parametrize("mask_size,ok", [((112, 80), True), ((110, 84), True), ((80, 112), False)])
def test_a_mask_of_another_size_than_the_image_is_refused_from_the_headers(tmp_path, mask_size, ok):
    Image.new("RGB", (112, 80)).save(tmp_path / "in.png")
    Image.new("L", mask_size).save(tmp_path / "m.png")
    options = ("--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"))
    if ok:
        overridden(INPAINTING, *options)
        return
    with pytest.raises(WorkflowError, match="the mask is 80x112 but the image is sampled at 112x80"):
        overridden(INPAINTING, *options)


def test_set_parses_json_else_keeps_a_string_and_wins_over_options():
    prompt = overridden(TEXT_TO_IMAGE, "--seed", "5", "--set", "3.seed=6", "--set", "3.guidance_scale=2.5",
                        "--set", "2.prompt=a cat, at night", "--set", "5.enable_safety_checker=false",
                        "--set", "3.latent=[\"9\", 0]")
    assert prompt["3"]["inputs"]["seed"] == 6
    assert prompt["3"]["inputs"]["guidance_scale"] == 2.5
    assert prompt["2"]["inputs"]["prompt"] == "a cat, at night"
    assert prompt["5"]["inputs"]["enable_safety_checker"] is False
    assert prompt["3"]["inputs"]["latent"] == ["9", 0]


@pytest.mark.parametrize("item", ["99.seed=1", "3=5", "seed=5"])
def test_set_refuses_an_unknown_node_or_no_input_name(item):
    with pytest.raises(WorkflowError, match="NODE_ID.INPUT=VALUE"):
        overridden(TEXT_TO_IMAGE, "--set", item)


def test_parse_args_defaults_and_refusals(capsys):
    args = parse_args(["run", str(TEXT_TO_IMAGE)])
    assert args.models is None and args.output is None and args.tokenizers is None  # resolved by run_command
    assert not args.demo and not args.no_safety_checker and args.set == []
    assert all(getattr(args, name) is None for name in ("prompt", "seed", "width", "height", "image_size", "steps",
                                                        "guidance", "num_images", "acceleration", "strength",
                                                        "image", "output_format"))
    for bad in (["--image-size", "huge"], ["--format", "gif"], ["--seed", "x"]):
        with pytest.raises(SystemExit):
            parse_args(["run", str(TEXT_TO_IMAGE), *bad])
    assert "invalid" in capsys.readouterr().err


# -------------------------------------------------------------------------------- command line: end to end runs

@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    models, tokenizers = write_demo_models(tmp_path_factory.mktemp("cli_demo"))
    yield models, tokenizers
    forget_loaded()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Runs main() from an empty working folder (an ignored --models / --output falls back to ./models and
    ./output there), with the host's state as it was before and no tokenizer folder left from other tests."""
    saved = host.settings()
    host.restore(dataclasses.replace(saved, tokenizer_dir=None))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    host.restore(saved)


def saved_paths(stdout: str) -> list[Path]:
    return [Path(line.removeprefix("saved ")) for line in stdout.splitlines() if line.startswith("saved ")]


def printed(stdout: str, label: str) -> list[str]:
    return [line.removeprefix(f"{label}: ") for line in stdout.splitlines() if line.startswith(f"{label}: ")]


def test_cli_options_reach_the_run_and_its_files(demo_models, cli, capsys):
    models, tokenizers = demo_models
    out = cli / "images"
    code = main(["run", str(TEXT_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
                 "--output", str(out), "--prompt", "a red fox", "--seed", "123", "--width", "80", "--height", "48",
                 "--steps", "3", "--guidance", "3.25", "--num-images", "2", "--acceleration", "high",
                 "--format", "png", "--set", "6.filename_prefix=cli/fox"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    (sampler,) = printed(stdout, "sampler")
    assert sampler.startswith("acceleration high: ") and sampler.endswith(" reused")
    assert "of 3 steps computed fully" in sampler
    paths = saved_paths(stdout)
    assert paths == [out / "cli" / "fox_00001_.png", out / "cli" / "fox_00002_.png"]
    assert not (cli / "output").exists()
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (80, 48)
            embedded = json.loads(image.text["prompt"])
    assert embedded["2"]["inputs"]["prompt"] == "a red fox"
    assert {k: embedded["3"]["inputs"][k] for k in ("seed", "image_size", "width", "height", "num_inference_steps",
                                                   "guidance_scale", "num_images", "acceleration")} == {
        "seed": 123, "image_size": "custom", "width": 80, "height": 48, "num_inference_steps": 3,
        "guidance_scale": 3.25, "num_images": 2, "acceleration": "high"}
    assert "sampling [" in stderr and "3/3" in stderr  # the progress line


def test_cli_seed_and_guidance_change_the_image(demo_models, cli, capsys):
    models, tokenizers = demo_models

    def pixels(*options: str) -> np.ndarray:
        code = main(["run", str(TEXT_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
                     "--output", str(cli), "--width", "64", "--height", "48", "--steps", "2", "--format", "png",
                     "--no-safety-checker", *options])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        (path,) = saved_paths(stdout)
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.int16)

    base = pixels("--seed", "1")
    assert np.abs(pixels("--seed", "2") - base).mean() > 1
    assert np.abs(pixels("--seed", "1", "--guidance", "9") - base).mean() > 0.1


def test_cli_no_safety_checker_disables_the_check(demo_models, cli, capsys):
    # With threshold 0 the enabled checker flags every image and blacks it out; disabled, nothing is flagged.
    models, tokenizers = demo_models
    common = ["run", str(TEXT_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
              "--output", str(cli), "--width", "64", "--height", "48", "--steps", "2", "--set", "5.threshold=0.0"]
    results = {}
    for name, extra in (("checked", []), ("unchecked", ["--no-safety-checker"])):
        code = main([*common, *extra])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        (path,) = saved_paths(stdout)
        assert path.suffix == ".jpg"  # the workflow's format when --format is not given
        with Image.open(path) as image:
            results[name] = (printed(stdout, "has_nsfw_concepts"), np.asarray(image),
                             json.loads(image.getexif()[0x0110].partition(":")[2]))
    flags, image, embedded = results["checked"]
    assert flags == ["[true]"] and image.max() <= 8  # black, up to JPEG ringing
    assert embedded["5"]["inputs"]["enable_safety_checker"] is True
    flags, image, embedded = results["unchecked"]
    assert flags == ["[false]"] and image.max() > 64
    assert embedded["5"]["inputs"]["enable_safety_checker"] is False


def test_cli_image_and_strength(demo_models, cli, capsys):
    models, tokenizers = demo_models
    source = cli / "input.png"
    Image.fromarray((np.random.default_rng(0).random((80, 112, 3)) * 255).astype(np.uint8)).save(source)
    common = ["run", str(IMAGE_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
              "--output", str(cli), "--steps", "4", "--no-safety-checker", "--image", str(source)]
    for strength, steps_run in (("0.5", 2), ("0.25", 1)):
        code = main([*common, "--strength", strength])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        assert printed(stdout, "sampler") == [f"acceleration none: {steps_run} of {steps_run} steps computed fully"]
        (path,) = saved_paths(stdout)
        with Image.open(path) as image:
            assert image.size == (112, 80)  # the input image's size


def test_cli_refuses_a_wrong_mask_before_any_model_is_looked_for(cli, capsys):
    Image.new("RGB", (112, 80)).save(cli / "in.png")
    Image.new("L", (64, 64)).save(cli / "m.png")
    code = main(["run", str(INPAINTING), "--models", str(cli / "no-models"), "--image", str(cli / "in.png"),
                 "--mask", str(cli / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and "the mask is 64x64 but the image is sampled at 112x80" in err
    assert "not found" not in err  # no model was looked for


def test_cli_without_image_for_image_to_image_fails_cleanly(demo_models, cli, capsys):
    models, tokenizers = demo_models
    code = main(["run", str(IMAGE_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
                 "--output", str(cli), "--steps", "2"])
    assert code == 2
    assert "example.png not found" in capsys.readouterr().err


def test_cli_needs_models_and_tokenizers_where_it_is_told(demo_models, cli, capsys):
    # (test_cli_options_reach_the_run_and_its_files shows that the run succeeds with both options.)
    models, tokenizers = demo_models
    small = ["--width", "64", "--height", "48", "--steps", "1", "--output", str(cli)]
    # Without --tokenizers: none beside the model files, so the text encoder cannot tokenize. (First: main()
    # keeps a tokenizer folder given in an earlier call of the same process.)
    assert main(["run", str(TEXT_TO_IMAGE), "--models", str(models), *small]) == 2
    assert "No CLIP tokenizer" in capsys.readouterr().err
    # Without --models: ./models of the (empty) working folder.
    assert main(["run", str(TEXT_TO_IMAGE), "--tokenizers", str(tokenizers), *small]) == 2
    err = capsys.readouterr().err
    assert "flux1-krea-dev.safetensors" in err and str(cli / "models" / "diffusion_models") in err


def test_cli_demo_builds_its_own_models(cli, capsys):
    code = main(["run", str(TEXT_TO_IMAGE), "--demo", "--output", str(cli / "out"), "--width", "64", "--height",
                 "48", "--steps", "2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "RANDOM-WEIGHT" in stderr
    (path,) = saved_paths(stdout)
    assert path.parent.parent == cli / "out" and path.is_file()
    assert not (cli / "models").exists()
    # The same run without --demo looks for real models in ./models and finds none.
    assert main(["run", str(TEXT_TO_IMAGE), "--output", str(cli / "out"), "--width", "64", "--height", "48",
                 "--steps", "2"]) == 2
    assert "not found" in capsys.readouterr().err
