"""The shipped workflows: UI and API twins agree, every node exists, the fal defaults are carried."""
import json
from pathlib import Path

import pytest

from comfyui_krea import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["krea_text_to_image", "krea_image_to_image", "krea_inpainting"]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def widget_names(class_type: str) -> list[str]:
    """Names of the widget slots of a node in UI widgets_values order (control_after_generate included)."""
    if class_type == "LoadImage":  # ComfyUI core node: image combo + upload button
        return ["image", "__upload__"]
    if class_type == "LoadImageMask":  # ComfyUI core node: the upload button follows its last required input
        return ["image", "channel", "__upload__"]
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    names = []
    for name, input_spec in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        kind, options = input_spec[0], (input_spec[1] if len(input_spec) > 1 else {})
        if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
            names.append(name)
            if options.get("control_after_generate"):
                names.append("__control__")
    return names


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_carry_the_same_values(name):
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        api_node = api[str(node["id"])]
        assert api_node["class_type"] == node["type"]
        names = widget_names(node["type"])
        assert len(names) == len(node["widgets_values"]), node["type"]
        for widget, value in zip(names, node["widgets_values"]):
            if not widget.startswith("__"):
                assert api_node["inputs"][widget] == value, (node["type"], widget)
        for socket in node["inputs"]:
            _, src, slot, dst, _, _ = links[socket["link"]]
            assert dst == node["id"]
            assert api_node["inputs"][socket["name"]] == [str(src), slot]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_with_the_documented_model_files(name, tmp_path, host_state):
    from PIL import Image

    from comfyui_krea.standalone.demo import write_demo_models
    from comfyui_krea.standalone.node_classes import PACK_CLASSES
    from comfyui_krea.standalone.runner import validate

    models, _ = write_demo_models(tmp_path)  # the file names the README tells users to install
    host_state.configure(models_dir=models, output_dir=tmp_path / "output")
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    classes = PACK_CLASSES
    for node in api.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask"):  # the input image is checked before the run too
            Image.new("RGB", (64, 48)).save(tmp_path / node["inputs"]["image"])
            node["inputs"]["image"] = str(tmp_path / node["inputs"]["image"])
    assert validate(api, classes) == []
    host_state.configure(models_dir=tmp_path / "empty")
    errors = validate(api, classes)
    assert errors and all("not found" in e or "is not one of" in e or "no NSFW classifier" in e for e in errors)


def test_fal_defaults():
    t2i = json.loads((ROOT / "workflows/api/krea_text_to_image.json").read_text())
    i2i = json.loads((ROOT / "workflows/api/krea_image_to_image.json").read_text())
    inpainting = json.loads((ROOT / "workflows/api/krea_inpainting.json").read_text())
    sampler = next(n["inputs"] for n in t2i.values() if n["class_type"] == "KreaSampler")
    assert (sampler["image_size"], sampler["num_inference_steps"], sampler["guidance_scale"],
            sampler["num_images"], sampler["acceleration"]) == ("landscape_4_3", 28, 4.5, 1, "none")
    sampler = next(n["inputs"] for n in i2i.values() if n["class_type"] == "KreaSampler")
    assert (sampler["num_inference_steps"], sampler["strength"]) == (40, 0.95)
    assert "latent" in sampler
    # fal-ai/flux-krea-lora/inpainting's defaults (the LoRA family: guidance 3.5, strength 0.85)
    sampler = next(n["inputs"] for n in inpainting.values() if n["class_type"] == "KreaSampler")
    assert (sampler["num_inference_steps"], sampler["guidance_scale"], sampler["strength"],
            sampler["acceleration"]) == (28, 3.5, 0.85, "none")
    mask = next(k for k, n in inpainting.items() if n["class_type"] == "LoadImageMask")
    image = next(k for k, n in inpainting.items() if n["class_type"] == "LoadImage")
    encode = next(k for k, n in inpainting.items() if n["class_type"] == "KreaEncodeImage")
    assert sampler["mask"] == [mask, 0] and sampler["latent"] == [encode, 0]
    assert inpainting[encode]["inputs"]["image"] == [image, 0]
    assert inpainting[mask]["inputs"]["channel"] == "red"  # a black-and-white mask: white = repaint
    for wf in (t2i, i2i, inpainting):
        save = next(n["inputs"] for n in wf.values() if n["class_type"] == "KreaSaveImage")
        assert save["output_format"] == "jpeg"
        safety = next(n for n in wf.values() if n["class_type"] == "KreaSafetyCheck")
        assert safety["inputs"]["enable_safety_checker"] is True and safety["inputs"]["threshold"] == 0.5
        # decode -> safety -> save
        assert save["images"][0] == next(k for k, n in wf.items() if n["class_type"] == "KreaSafetyCheck")
