"""Command-line options bound for a workflow's inputs (standalone/overrides.py): their values checked before anything
is asked of a server (a side off the 16-pixel grid, an --image or --mask that is no readable image, a mask that does
not fit the image), options the workflow has nowhere to put refused with what they need, --set and --lora values
parsed or refused with the expected form, and workflow files read or refused naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comfyui_krea.fal_api.lora_nodes import LORA_LOADER
from comfyui_krea.standalone.cli import parse_args
from comfyui_krea.standalone.overrides import (
    api_prompt,
    apply_overrides,
    is_image_to_image,
    lora_options,
    mask_file_problem,
    option_problems,
    read_workflow,
    sampler_nodes,
    unused_options,
)
from comfyui_krea.standalone.runner import WorkflowError

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
IMAGE_TO_IMAGE = ROOT / "workflows" / "api" / "krea_image_to_image.json"
INPAINTING = ROOT / "workflows" / "api" / "krea_inpainting.json"


def _args(*options: str):
    return parse_args(["run", str(TEXT_TO_IMAGE), "--server", "http://127.0.0.1:8188", *options])


@pytest.mark.parametrize(("options", "message"), [
    (["--width", "50", "--height", "64"], "width must be a multiple of 16 between 16 and 14142, got 50."),
    (["--width", "64", "--height", "50"], "height must be a multiple of 16 between 16 and 14142, got 50."),
    (["--height", "14144"], "height must be a multiple of 16 between 16 and 14142, got 14144."),
    (["--width", "0"], "width must be a multiple of 16 between 16 and 14142, got 0."),
], ids=["width", "height", "height-too-long", "width-zero"])
def test_a_side_off_the_grid_is_refused_naming_the_option_it_came_from(options, message):
    # the user reads which of the two options to fix: the message must name that one
    with pytest.raises(ValueError) as refused:
        option_problems(_args(*options))
    assert str(refused.value) == message


def test_sides_on_the_grid_and_readable_images_pass(tmp_path):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 48)).save(image)
    Image.new("L", (64, 48)).save(mask)
    assert option_problems(_args("--width", "16", "--height", "14128", "--image", str(image), "--mask",
                                 str(mask))) is None


@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_an_image_option_naming_no_file_is_refused_with_the_path(tmp_path, option):
    absent = tmp_path / "absent.png"
    with pytest.raises(WorkflowError) as refused:
        option_problems(_args(option, str(absent)))
    assert str(refused.value) == f"input image {absent} not found"


@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_an_image_option_naming_a_folder_is_refused_as_not_a_file(tmp_path, option):
    with pytest.raises(WorkflowError) as refused:
        option_problems(_args(option, str(tmp_path)))
    assert str(refused.value) == f"input image {tmp_path} is not a file"


@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_an_image_option_naming_a_text_file_is_refused_as_not_an_image(tmp_path, option):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(WorkflowError) as refused:
        option_problems(_args(option, str(text)))
    assert str(refused.value) == f"input image {text} is not an image file PIL can read (png, jpeg, webp, ...)"


def test_a_readable_image_with_an_unreadable_mask_is_refused_for_the_mask(tmp_path):
    # the image passes, so the refusal can only come from the mask's own check
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(image)
    absent = tmp_path / "absent_mask.png"
    with pytest.raises(WorkflowError) as refused:
        option_problems(_args("--image", str(image), "--mask", str(absent)))
    assert str(refused.value) == f"input image {absent} not found"


# ------------------------------------------------------------ options a workflow has nowhere to put (refused)

EVERY_WORKFLOW_OPTION = ["--prompt", "a fox", "--image", "in.png", "--mask", "m.png", "--strength", "0.5",
                         "--width", "64", "--height", "48", "--image-size", "square", "--format", "webp",
                         "--no-safety-checker", "--lora", "style.safetensors", "--seed", "1", "--steps", "2",
                         "--guidance", "3", "--num-images", "2", "--acceleration", "high"]
TEXT_TO_IMAGE_SIZE = "a text-to-image sampler (image-to-image keeps the input image's size)"


def _unused(workflow: dict, *options: str) -> list[str]:
    return unused_options(workflow, parse_args(["run", "workflow.json", *options]))


def _not_used(option: str, needs: str) -> str:
    return f"{option} is not used by this workflow: it needs {needs}"


def test_every_option_is_refused_by_a_workflow_with_no_node_for_it_each_saying_what_it_needs():
    save_only = {"9": {"class_type": "KreaSaveImage", "inputs": {}}}
    assert _unused(save_only, *[o for o in EVERY_WORKFLOW_OPTION if o not in ("--format", "webp")]) == [
        _not_used("--prompt", "a Krea Text Encode node"),
        _not_used("--image", "a LoadImage node (an image-to-image workflow)"),
        _not_used("--mask", "a LoadImageMask node (an inpainting workflow)"),
        _not_used("--strength", "an image-to-image sampler (a latent connected)"),
        _not_used("--width", TEXT_TO_IMAGE_SIZE),
        _not_used("--height", TEXT_TO_IMAGE_SIZE),
        _not_used("--image-size", TEXT_TO_IMAGE_SIZE),
        _not_used("--no-safety-checker", "a Krea Safety Check node"),
        _not_used("--lora", "a model loader (Krea Model Loader) whose MODEL the LoRAs change"),
        _not_used("--seed", "a Krea Sampler node"),
        _not_used("--steps", "a Krea Sampler node"),
        _not_used("--guidance", "a Krea Sampler node"),
        _not_used("--num-images", "a Krea Sampler node"),
        _not_used("--acceleration", "a Krea Sampler node"),
    ]
    assert _unused({}, "--format", "png") == [_not_used("--format", "a Krea Save Image node")]


def test_the_shipped_workflows_take_the_options_of_their_kind():
    text_to_image, image_to_image = (json.loads(p.read_text()) for p in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE))
    assert _unused(text_to_image, *[o for o in EVERY_WORKFLOW_OPTION
                                    if o not in ("--image", "in.png", "--mask", "m.png", "--strength", "0.5")]) == []
    assert _unused(image_to_image, *[o for o in EVERY_WORKFLOW_OPTION
                                     if o not in ("--mask", "m.png", "--width", "64", "--height", "48",
                                                  "--image-size", "square")]) == []
    assert _unused(json.loads(INPAINTING.read_text()), "--image", "in.png", "--mask", "m.png") == []
    # a text-to-image workflow has no input image to make stronger; image-to-image keeps the input's size
    assert _unused(text_to_image, "--strength", "0.5", "--image", "in.png") == [
        _not_used("--image", "a LoadImage node (an image-to-image workflow)"),
        _not_used("--strength", "an image-to-image sampler (a latent connected)")]
    assert _unused(image_to_image, "--width", "64", "--image-size", "square") == [
        _not_used("--width", TEXT_TO_IMAGE_SIZE), _not_used("--image-size", TEXT_TO_IMAGE_SIZE)]


def test_server_only_and_local_only_options_are_refused_where_they_do_nothing():
    workflow = json.loads(TEXT_TO_IMAGE.read_text())
    assert _unused(workflow, "--token", "t") == [_not_used("--token/--header", "--server")]
    assert _unused(workflow, "--header", "X-A: b") == [_not_used("--token/--header", "--server")]
    assert _unused(workflow, "--server", "http://127.0.0.1:8188", "--token", "t", "--header", "X-A: b") == []
    assert _unused(workflow, "--demo", "--models", "m", "--tokenizers", "t") == [
        _not_used("--models", "no --demo (the demo builds its own models)"),
        _not_used("--tokenizers", "no --demo (the demo builds its own tokenizers)")]
    assert _unused(workflow, "--demo") == [] and _unused(workflow, "--models", "m", "--tokenizers", "t") == []


def test_apply_overrides_refuses_all_unused_options_in_one_sentence():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    with pytest.raises(WorkflowError) as refused:
        apply_overrides(prompt, parse_args(["run", "w.json", "--strength", "0.5", "--image", "in.png"]))
    assert str(refused.value) == (_not_used("--image", "a LoadImage node (an image-to-image workflow)") + "; "
                                  + _not_used("--strength", "an image-to-image sampler (a latent connected)") + ".")
    assert prompt == json.loads(TEXT_TO_IMAGE.read_text())  # nothing written


def test_only_a_sampler_with_a_linked_latent_is_image_to_image():
    image_to_image = json.loads(IMAGE_TO_IMAGE.read_text())
    assert is_image_to_image(image_to_image) and not is_image_to_image(json.loads(TEXT_TO_IMAGE.read_text()))
    assert sampler_nodes(image_to_image) == [image_to_image["3"]]
    image_to_image["3"]["inputs"]["latent"] = "8"  # not a link
    assert not is_image_to_image(image_to_image)
    image_to_image["3"]["inputs"]["latent"] = ["8", 0]
    image_to_image["3"]["class_type"] = "KSampler"  # another pack's sampler is not the pack's
    assert not is_image_to_image(image_to_image) and sampler_nodes(image_to_image) == []
    assert sampler_nodes({"1": [1, 2], "2": {"class_type": "KreaSampler"}}) == [{"class_type": "KreaSampler"}]
    assert not is_image_to_image({"2": {"class_type": "KreaSampler"}})  # a hand-written sampler without inputs


# ---------------------------------------------------------------------------------------- --set NODE.INPUT=VALUE

def test_set_refuses_an_input_the_node_class_does_not_declare_and_lists_those_it_has():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    with pytest.raises(WorkflowError) as refused:
        apply_overrides(prompt, parse_args(["run", "w.json", "--set", "6.qualty=80"]))
    assert str(refused.value) == ("--set '6.qualty=80': node 6 (KreaSaveImage) has no input 'qualty'; its inputs are "
                                  "images, filename_prefix, output_format, quality, has_nsfw_concepts")


def test_set_writes_any_input_of_a_node_whose_class_is_unknown_here_and_an_optional_input():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["9"] = {"class_type": "SomeOtherPackNode", "inputs": {}}
    apply_overrides(prompt, parse_args(["run", "w.json", "--set", "9.anything={\"a\": 1}",
                                        "--set", "6.has_nsfw_concepts=[\"5\", 1]"]))
    assert prompt["9"]["inputs"] == {"anything": {"a": 1}}
    assert prompt["6"]["inputs"]["has_nsfw_concepts"] == ["5", 1]


def test_set_refusal_lists_the_workflow_s_node_ids():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    with pytest.raises(WorkflowError) as refused:
        apply_overrides(prompt, parse_args(["run", "w.json", "--set", "7.seed=1"]))
    assert str(refused.value) == ("--set '7.seed=1': expected NODE_ID.INPUT=VALUE with a node id of the workflow "
                                  "(1, 2, 3, 4, 5, 6)")


def test_set_splits_at_the_first_equals_sign_and_the_first_dot():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["9"] = {"class_type": "SomeOtherPackNode", "inputs": {}}
    apply_overrides(prompt, parse_args(["run", "w.json", "--set", "2.prompt=a=b", "--set", "9.lora.strength=0.5"]))
    assert prompt["2"]["inputs"]["prompt"] == "a=b"  # the value may hold "="
    assert prompt["9"]["inputs"] == {"lora.strength": 0.5}  # and another pack's input name a "."


class _OnlyOptional:
    """A node class (of a server's table) that declares optional inputs only."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {"optional": {"level": ("INT", {})}}


def test_set_checks_input_names_against_the_node_classes_given():
    prompt = {"1": {"class_type": "Optionals", "inputs": {}}, "6": {"class_type": "KreaSaveImage", "inputs": {}}}
    classes = {"Optionals": _OnlyOptional}  # KreaSaveImage is unknown to this table: any input goes
    apply_overrides(prompt, parse_args(["run", "w.json", "--set", "1.level=3", "--set", "6.anything=1"]), classes)
    assert prompt == {"1": {"class_type": "Optionals", "inputs": {"level": 3}},
                      "6": {"class_type": "KreaSaveImage", "inputs": {"anything": 1}}}
    with pytest.raises(WorkflowError) as refused:
        apply_overrides(prompt, parse_args(["run", "w.json", "--set", "1.size=3"]), classes)
    assert str(refused.value) == "--set '1.size=3': node 1 (Optionals) has no input 'size'; its inputs are level"


@pytest.mark.parametrize("workflow", [IMAGE_TO_IMAGE, INPAINTING], ids=["image-to-image", "inpainting"])
def test_no_image_options_leave_the_workflow_s_own_image_and_mask_files(workflow):
    prompt = json.loads(workflow.read_text())
    apply_overrides(prompt, parse_args(["run", str(workflow)]))
    assert prompt == json.loads(workflow.read_text())


def test_each_lora_option_is_put_between_the_model_loader_and_the_sampler():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    apply_overrides(prompt, parse_args(["run", "w.json", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors"]))
    loaders = {k: n["inputs"] for k, n in prompt.items() if n["class_type"] == LORA_LOADER}
    (first, a), (second, b) = loaders.items()
    assert a == {"model": ["1", 0], "lora_name": "a.safetensors", "strength_model": 0.5}
    assert b == {"model": [first, 0], "lora_name": "b.safetensors", "strength_model": 1.0}
    assert prompt["3"]["inputs"]["model"] == [second, 0]


# ------------------------------------------------------------------------------------ --lora NAME[:STRENGTH]

@pytest.mark.parametrize(("values", "expected"), [
    (["a.safetensors"], [("a.safetensors", 1.0)]),
    (["a.safetensors:0.25", "b.safetensors:-100", "c.safetensors:100"],
     [("a.safetensors", 0.25), ("b.safetensors", -100.0), ("c.safetensors", 100.0)]),
    (["dir:with:colons.safetensors"], [("dir:with:colons.safetensors", 1.0)]),  # the tail is no number: all name
    (["a:b.safetensors:2"], [("a:b.safetensors", 2.0)]),  # the last colon only
    (["2024"], [("2024", 1.0)]),  # a name that reads as a number is still a name without a colon
], ids=["plain", "strengths-and-bounds", "colons-in-name", "last-colon", "number-name"])
def test_lora_values_are_a_name_and_a_strength_of_one_unless_given(values, expected):
    assert lora_options(values) == expected


@pytest.mark.parametrize("value", [":0.5", "a.safetensors:100.5", "a.safetensors:-101", ""])
def test_a_lora_value_without_a_name_or_out_of_range_is_refused_with_an_example(value):
    with pytest.raises(WorkflowError) as refused:
        lora_options(["ok.safetensors", value])
    assert str(refused.value) == (f"--lora {value!r}: expected NAME[:STRENGTH], a file in the loras folder and a "
                                  "strength from -100 to 100 (e.g. --lora style.safetensors:0.8)")


# -------------------------------------------------------------------------------- --mask against --image

@pytest.mark.parametrize(("image", "mask", "problem"), [
    ((112, 80), (112, 80), None),
    ((100, 70), (96, 64), None),  # the mask may match the rounded size the image is sampled at
    ((100, 70), (100, 70), None),  # ... or the image's own
    ((112, 80), (80, 112), "the mask is 80x112 but the image is sampled at 112x80"),
], ids=["same", "rounded", "unrounded", "swapped"])
def test_a_mask_must_fit_the_image_as_the_sampler_will_see_it(tmp_path, image, mask, problem):
    Image.new("RGB", image).save(tmp_path / "in.png")
    Image.new("L", mask).save(tmp_path / "m.png")
    args = _args("--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"))
    if problem is None:
        assert mask_file_problem(args) is None
        return
    with pytest.raises(WorkflowError) as refused:
        mask_file_problem(args)
    assert str(refused.value) == (f"--mask {tmp_path / 'm.png'}: {problem} (its sides rounded to multiples of 16); "
                                  "give a mask of the input image's size (white = repaint), e.g. Load Image (as "
                                  "Mask) of a mask drawn on that image.")


def test_a_mask_or_image_that_is_not_readable_is_left_to_the_loaders(tmp_path):
    Image.new("L", (80, 112)).save(tmp_path / "m.png")
    (tmp_path / "in.png").write_text("no image")
    assert mask_file_problem(_args("--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"))) is None
    assert mask_file_problem(_args("--mask", str(tmp_path / "m.png"))) is None  # no image to compare with


# ----------------------------------------------------------------------------------------- workflow files

def test_a_workflow_file_that_is_not_readable_json_or_an_object_is_refused_naming_the_file(tmp_path):
    cases = {"absent.json": None, "latin1.json": b'{"a": "caf\xe9"}', "broken.json": b'{"1": ',
             "list.json": b"[1, 2]"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    messages = {}
    for name in cases:
        with pytest.raises(WorkflowError) as refused:
            read_workflow(tmp_path / name)
        messages[name] = str(refused.value)
    assert messages["absent.json"] == f"cannot read the workflow {tmp_path / 'absent.json'}: No such file or directory"
    assert messages["latin1.json"] == (f"the workflow {tmp_path / 'latin1.json'} is not UTF-8 text (byte 10); save it "
                                       "as UTF-8 JSON from ComfyUI")
    assert messages["broken.json"].startswith(f"the workflow {tmp_path / 'broken.json'} is not valid JSON (")
    assert messages["broken.json"].endswith("); use the files in workflows/ or save it from ComfyUI")
    assert messages["list.json"] == f"{tmp_path / 'list.json'} is not a ComfyUI workflow (a JSON object of nodes)"
    assert read_workflow(TEXT_TO_IMAGE) == json.loads(TEXT_TO_IMAGE.read_text())


def test_an_api_prompt_is_taken_as_it_is_and_a_ui_workflow_is_converted():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    assert api_prompt(prompt, {}) is prompt
    ui = json.loads((ROOT / "workflows" / "krea_text_to_image.json").read_text())
    from comfyui_krea.nodes import NODE_DISPLAY_NAME_MAPPINGS
    from comfyui_krea.standalone.node_classes import PACK_CLASSES
    from comfyui_krea.standalone.ui_workflow import local_definitions

    converted = api_prompt(ui, local_definitions(PACK_CLASSES, NODE_DISPLAY_NAME_MAPPINGS))
    assert {n["class_type"] for n in converted.values()} == {n["class_type"] for n in prompt.values()}
