"""The shipped workflows: UI and API twins agree, every node exists, the fal defaults are carried."""
import json
from pathlib import Path

import pytest

from comfyui_krea import NODE_CLASS_MAPPINGS
from comfyui_krea.fal_api.endpoints import ENDPOINTS
from comfyui_krea.fal_api.workflow import workflow_for

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
        assert save["output_format"] == "png"  # what ComfyUI's editor restores when the file is dropped on it
        safety = next(n for n in wf.values() if n["class_type"] == "KreaSafetyCheck")
        assert safety["inputs"]["enable_safety_checker"] is True and safety["inputs"]["threshold"] == 0.5
        # decode -> safety -> save, the flags beside the images
        safety_id = next(k for k, n in wf.items() if n["class_type"] == "KreaSafetyCheck")
        assert save["images"] == [safety_id, 0] and save["has_nsfw_concepts"] == [safety_id, 1]


@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=lambda e: e.id)
def test_a_fal_request_saves_jpeg_unless_it_asks_otherwise(endpoint):
    """The shipped workflows save png (ComfyUI restores it); a fal request writes its own output_format, whose
    default is fal's jpeg."""
    fields = {"prompt": "a fox"} | {name: "data:image/png;base64,AAAA" for name in endpoint.image_fields}
    for body, expected in ((fields, "jpeg"), (fields | {"output_format": "png"}, "png")):
        prompt = workflow_for(endpoint, endpoint.parse(body), 1, "request",
                              {name: "in.png" for name in endpoint.image_fields})
        (save,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "KreaSaveImage"]
        assert save["output_format"] == expected


# The widgets that name a model file, and the model folder each names it in.
MODEL_WIDGETS = {"KreaModelLoader": {"model_name": "diffusion_models", "clip_name": "text_encoders",
                                     "t5_name": "text_encoders", "vae_name": "vae"},
                 "KreaSafetyCheck": {"checker_name": "safety_checker"}}


@pytest.mark.parametrize("name", NAMES)
def test_every_model_the_workflow_names_comes_with_its_download(name):
    """ComfyUI's frontend lists a node's `properties.models` entries whose name a widget holds and that are not in
    their folder in its missing-models dialog, with a download button (the browser test shows the dialog)."""
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    readme = (ROOT / "README.md").read_text()
    listed = 0
    for node in ui["nodes"]:
        widgets = dict(zip(widget_names(node["type"]), node["widgets_values"])) if node["type"] in MODEL_WIDGETS \
            else {}
        models = {entry["name"]: entry for entry in node["properties"].get("models", [])}
        for widget, folder in MODEL_WIDGETS.get(node["type"], {}).items():
            entry = models[widgets[widget]]
            assert entry["directory"] == folder, entry
            # what the frontend accepts: huggingface.co (or civitai.com), a .safetensors file name
            assert entry["url"].startswith("https://huggingface.co/") and "/resolve/main/" in entry["url"]
            assert entry["name"].endswith(".safetensors") and entry["url"].endswith(".safetensors")
            assert entry["url"] in readme, f"README.md does not link {entry['url']}"
            listed += 1
        for entry in models.values():  # the alternatives (fp8) too, for when another file is picked
            assert entry["directory"] in MODEL_WIDGETS[node["type"]].values() and entry["url"] in readme
    assert listed == 5


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_every_template_has_its_thumbnail(path):
    """ComfyUI's template browser shows workflows/<name>.jpg on the card of workflows/<name>.json (made by
    tools/template_thumbnails.py)."""
    from PIL import Image

    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (512, 512)
