"""The server-less runner's stand-ins for ComfyUI's core LoadImage, LoadImageMask and LoraLoaderModelOnly, and the
fal runner's loaders of images decoded already (standalone/node_classes.py): what their VALIDATE_INPUTS answer
(True, or the problem as the user reads it), what they load, and the inputs they declare to the runner's checks and
to the conversion of UI-format workflows."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from comfyui_krea.standalone.node_classes import (
    PACK_CLASSES,
    LoadImage,
    LoadImageMask,
    LoraLoaderModelOnly,
    decoded_image_loader,
    decoded_mask_loader,
)
from comfyui_krea.standalone.runner import validate
from comfyui_krea.standalone.ui_workflow import local_definitions, to_api
from conftest import zeros_file

# One pixel per channel value: red 255, green 0, blue 51 (0.2), alpha 204 (0.8 opaque).
PIXEL = (255, 0, 51, 204)


@pytest.fixture
def rgba_file(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGBA", (3, 2), PIXEL).save(path)
    return path


@pytest.mark.parametrize("node, hint", [(LoadImage, "give the input image with --image"),
                                        (LoadImageMask, "give the mask with --mask")])
def test_the_image_loaders_refuse_a_missing_or_unreadable_file_before_any_model_loads(node, hint, tmp_path,
                                                                                      rgba_file):
    missing, text = tmp_path / "missing.png", tmp_path / "notes.png"
    text.write_text("not an image")
    assert node.VALIDATE_INPUTS(str(missing)) == f"image: input image {missing} not found ({hint})"
    assert node.VALIDATE_INPUTS(str(text)) == (f"image: input image {text} is not an image file PIL can read "
                                               f"(png, jpeg, webp, ...) ({hint})")
    assert node.VALIDATE_INPUTS(str(rgba_file)) is True
    assert node.VALIDATE_INPUTS(None) is True  # a linked input: known only when the workflow runs
    assert node.VALIDATE_INPUTS() is True


def test_load_image_mask_reads_the_asked_channel_of_the_file(rgba_file, tmp_path):
    (red,) = LoadImageMask().load_image(str(rgba_file), "red")
    (alpha,) = LoadImageMask().load_image(str(rgba_file), "alpha")
    assert red.shape == (1, 2, 3) and torch.equal(red, torch.ones(1, 2, 3))
    assert torch.allclose(alpha, torch.full((1, 2, 3), 0.2))  # ComfyUI inverts alpha: transparent = repaint
    with pytest.raises(ValueError) as refused:
        LoadImageMask().load_image(str(tmp_path / "gone.png"), "red")
    assert str(refused.value) == f"LoadImageMask: input image {tmp_path / 'gone.png'} not found (give the mask " \
                                 "with --mask)."


@pytest.mark.parametrize("make, what", [(decoded_image_loader, "an image"), (decoded_mask_loader, "a mask")])
def test_decoded_loaders_accept_only_the_images_of_their_request(make, what):
    node = make({"input.png": Image.new("RGB", (4, 4))})
    assert node.VALIDATE_INPUTS("input.png") is True
    assert node.VALIDATE_INPUTS(None) is True
    assert node.VALIDATE_INPUTS() is True
    # A name the request did not bring is refused: nothing is read from disk in the fal server's runner.
    assert node.VALIDATE_INPUTS("other.png") == f"image: 'other.png' is not {what} of this request"


def test_decoded_loaders_turn_the_decoded_image_into_image_mask_and_channel_masks():
    decoded = Image.new("RGBA", (3, 2), PIXEL)
    images = {"input.png": decoded}
    pixels, mask = decoded_image_loader(images)().load_image("input.png")
    assert torch.allclose(pixels, torch.tensor([1.0, 0.0, 0.2]).expand(1, 2, 3, 3))
    assert torch.allclose(mask, torch.full((1, 2, 3), 0.2))
    loader = decoded_mask_loader(images)()
    assert torch.allclose(loader.load_image("input.png", "blue")[0], torch.full((1, 2, 3), 0.2))
    assert torch.equal(loader.load_image("input.png", "green")[0], torch.zeros(1, 2, 3))
    assert torch.allclose(loader.load_image("input.png", "alpha")[0], torch.full((1, 2, 3), 0.2))


QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def test_lora_loader_refuses_a_missing_damaged_or_wrong_file_naming_the_input(tmp_path, host_state):
    loras = tmp_path / "loras"
    loras.mkdir()
    host_state.configure(models_dir=tmp_path)
    zeros_file(loras / "style.safetensors", [f"{QKV}.lora_up.weight", f"{QKV}.lora_down.weight"])
    zeros_file(loras / "half.safetensors", [f"{QKV}.lora_up.weight"])
    zeros_file(loras / "vae.safetensors", ["decoder.conv_in.weight", "encoder.conv_in.weight"])
    assert LoraLoaderModelOnly.VALIDATE_INPUTS("style.safetensors") is True
    assert LoraLoaderModelOnly.VALIDATE_INPUTS(None) is True  # a linked input
    assert LoraLoaderModelOnly.VALIDATE_INPUTS() is True
    # Found by the model-file check: its message names the input already.
    assert LoraLoaderModelOnly.VALIDATE_INPUTS("missing.safetensors") == (
        f"lora_name: Model file 'missing.safetensors' not found. Searched the 'loras' folders: {loras}. Put the "
        "file in one of them (or pick another file in the node).")
    assert LoraLoaderModelOnly.VALIDATE_INPUTS("vae.safetensors") == (
        "lora_name: 'vae.safetensors' is a VAE (autoencoder), not a LoRA (an add-on to a base model, not a model by "
        "itself); pick the right file. VAE files belong in models/vae; LoRA files in models/loras.")
    # Found by the LoRA reader, whose message names the file: the input's name is put in front.
    assert LoraLoaderModelOnly.VALIDATE_INPUTS("half.safetensors") == (
        f"lora_name: {loras / 'half.safetensors'}: {QKV}.lora_up.weight has no {QKV}.lora_down.weight beside it; "
        "the LoRA file is damaged or of a format this loader does not know.")


def test_lora_loader_at_strength_zero_hands_the_model_on_untouched():
    model = object()
    assert LoraLoaderModelOnly().load_lora_model_only(model, "style.safetensors", 0.0)[0] is model
    with pytest.raises(ValueError) as refused:
        LoraLoaderModelOnly().load_lora_model_only(model, "style.safetensors", 0.5)
    assert str(refused.value) == ("LoraLoaderModelOnly: the model input must be the MODEL of Krea Model Loader, "
                                  "got object.")


# ------------------------------------------------------------------------------------------ declared inputs
# The stand-ins' INPUT_TYPES feed the runner's validation and the conversion of UI-format workflows (saved from
# ComfyUI's frontend) into prompts: both must see the inputs ComfyUI's own core nodes have.

def test_the_runner_checks_the_stand_ins_inputs_as_comfyui_declares_them():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {}},
              "2": {"class_type": "LoadImageMask", "inputs": {"channel": "purple"}},
              "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"strength_model": 200}},
              "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["9", 0], "strength_model": -101}}}
    assert validate(prompt, PACK_CLASSES) == [
        "node 1 (LoadImage): required input 'image' is missing",
        "node 2 (LoadImageMask): required input 'image' is missing",
        "node 2 (LoadImageMask): channel: 'purple' is not one of ['alpha', 'red', 'green', 'blue']",
        "node 3 (LoraLoaderModelOnly): required input 'model' is missing",
        "node 3 (LoraLoaderModelOnly): required input 'lora_name' is missing",
        "node 3 (LoraLoaderModelOnly): strength_model: 200 is bigger than the maximum 100.0",
        "node 4 (LoraLoaderModelOnly): model is linked to node 9, which is not in the workflow",
        "node 4 (LoraLoaderModelOnly): required input 'lora_name' is missing",
        "node 4 (LoraLoaderModelOnly): strength_model: -101 is smaller than the minimum -100.0"]


def test_a_ui_workflows_stand_in_nodes_convert_to_the_inputs_comfyui_would_queue():
    # As ComfyUI's frontend saves them: widget values in input order, the image nodes' upload button value last.
    workflow = {"nodes": [
        {"id": 1, "type": "KreaModelLoader", "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL"}]},
        {"id": 2, "type": "LoraLoaderModelOnly", "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "widgets_values": ["style.safetensors", 0.8]},
        {"id": 3, "type": "LoadImage", "inputs": [], "widgets_values": ["photo.png", "image"]},
        {"id": 4, "type": "LoadImageMask", "inputs": [], "widgets_values": ["mask.png", "red", "image"]}],
        "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    converted = to_api(workflow, local_definitions(PACK_CLASSES))
    assert {node_id: node["inputs"] for node_id, node in converted.items() if node_id != "1"} == {
        "2": {"lora_name": "style.safetensors", "strength_model": 0.8, "model": ["1", 0]},
        "3": {"image": "photo.png"},
        "4": {"image": "mask.png", "channel": "red"}}
