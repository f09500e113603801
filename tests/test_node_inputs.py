"""The nodes' inputs as ComfyUI and its frontend see them: every input's type is ComfyUI's or one a pack node
outputs, and every link of the shipped workflows joins an output to an input of its type; every input with options
has a tooltip; the sampler's widgets are the parameter table, the other nodes' widgets are as documented, an
empty model folder offers a placeholder that names it, and a new loader's file inputs default to a file of their
kind, told from the headers, read once per file version."""
from __future__ import annotations

import json
from pathlib import Path

from comfyui_krea.nodes import NODE_CLASS_MAPPINGS
from comfyui_krea.nodes.image import KreaSaveImage
from comfyui_krea.nodes.safety import KreaSafetyCheck
from comfyui_krea.nodes.sampler import KreaSampler
from comfyui_krea.nodes.text import KreaTextEncode

# ------------------------------------------------------------------------------------------------------ types

def _input_types(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


COMFYUI_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "STRING", "INT", "FLOAT", "BOOLEAN"}


def test_every_input_type_is_comfyuis_or_one_a_pack_node_outputs():
    made_here = {t for cls in NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        for input_name, spec in _input_types(cls).items():
            kind = spec[0]
            assert isinstance(kind, list) or kind in COMFYUI_TYPES | made_here, (name, input_name, kind)


def test_every_link_of_the_shipped_workflows_joins_an_output_to_an_input_of_its_type():
    # What ComfyUI's validation checks when a workflow is queued: the output's type is the input's type.
    workflows = sorted((Path(__file__).resolve().parent.parent / "workflows" / "api").glob("*.json"))
    assert workflows
    checked = 0
    for path in workflows:
        prompt = json.loads(path.read_text())
        for node in prompt.values():
            cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue
            for name, value in node["inputs"].items():
                if not isinstance(value, list):
                    continue
                source = NODE_CLASS_MAPPINGS.get(prompt[value[0]]["class_type"])
                if source is None:
                    continue
                assert source.RETURN_TYPES[value[1]] == _input_types(cls)[name][0], (path.name, name)
                checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------------------- tooltips and widgets

def test_every_input_with_options_has_a_tooltip():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        for input_name, spec in _input_types(cls).items():
            if len(spec) > 1:
                assert isinstance(spec[1].get("tooltip"), str) and spec[1]["tooltip"], (name, input_name)


def test_the_samplers_widgets_are_the_parameter_table():
    from comfyui_krea.sampling import parameters as p

    inputs = _input_types(KreaSampler)
    for parameter in (p.WIDTH, p.HEIGHT, p.NUM_INFERENCE_STEPS, p.GUIDANCE_SCALE, p.SEED, p.NUM_IMAGES,
                      p.STRENGTH):
        options = inputs[parameter.name][1]
        expected = {"default": parameter.default, "min": parameter.min, "max": parameter.max}
        if parameter.step is not None:
            expected["step"] = parameter.step
        assert {k: v for k, v in options.items() if k not in ("tooltip", "control_after_generate")} == expected
    assert inputs["seed"][1]["control_after_generate"] is True
    for parameter in (p.IMAGE_SIZE, p.ACCELERATION):
        assert inputs[parameter.name][0] == list(parameter.choices)
        assert inputs[parameter.name][1]["default"] == parameter.default


def test_the_other_nodes_widgets():
    prompt = _input_types(KreaTextEncode)["prompt"][1]
    assert {k: prompt[k] for k in ("multiline", "default", "dynamicPrompts")} == \
        {"multiline": True, "default": "", "dynamicPrompts": True}
    enabled = _input_types(KreaSafetyCheck)["enable_safety_checker"][1]
    assert {k: enabled[k] for k in ("default", "label_on", "label_off")} == \
        {"default": True, "label_on": "enabled", "label_off": "disabled"}
    assert _input_types(KreaSaveImage)["quality"][1]["step"] == 1
    from comfyui_krea.nodes.loader import KreaModelLoader

    assert _input_types(KreaModelLoader)["weight_dtype"][1]["default"] == "default"


def test_an_empty_model_folder_offers_a_placeholder_that_names_it(host_state, tmp_path):
    from comfyui_krea.nodes.loader import KreaModelLoader

    host_state.configure(models_dir=tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ae.safetensors").write_bytes(b"")
    inputs = _input_types(KreaModelLoader)
    assert inputs["model_name"][0] == ["(no files in models/diffusion_models)"]
    assert inputs["vae_name"][0] == ["ae.safetensors"]


def test_a_new_loader_defaults_each_file_to_the_first_of_its_kind(host_state, tmp_path, monkeypatch):
    """ComfyUI's frontend gives a new node each combo's default (else the first name): the T5 input must not start
    on clip_l.safetensors. The kinds come from the headers, each file read once while its size and time stay."""
    import os

    from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
    from comfyui_krea.model_loader.flux import write_random_flux_checkpoint
    from comfyui_krea.model_loader.text_encoders import write_random_clip_checkpoint, write_random_t5_checkpoint
    from comfyui_krea.nodes import model_files
    from comfyui_krea.nodes.loader import KreaModelLoader
    from conftest import TINY_AUTOENCODER, TINY_CLIP, TINY_FLUX, TINY_T5

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (tmp_path / folder).mkdir()
    (tmp_path / "diffusion_models" / "a_broken.safetensors").write_bytes(b"not a model")
    write_random_flux_checkpoint(tmp_path / "diffusion_models" / "flux1-krea-dev.safetensors", TINY_FLUX)
    write_random_clip_checkpoint(tmp_path / "text_encoders" / "clip_l.safetensors", TINY_CLIP)
    t5 = write_random_t5_checkpoint(tmp_path / "text_encoders" / "t5xxl_fp16.safetensors", TINY_T5)
    write_random_autoencoder_checkpoint(tmp_path / "vae" / "ae.safetensors", TINY_AUTOENCODER)
    host_state.configure(models_dir=tmp_path)
    model_files._kind_of.cache_clear()
    opened = []
    real_open = model_files.open_checkpoint
    monkeypatch.setattr(model_files, "open_checkpoint", lambda path: opened.append(Path(path).name) or real_open(path))

    inputs = _input_types(KreaModelLoader)
    defaults = {name: inputs[name][1].get("default") for name in ("model_name", "clip_name", "t5_name", "vae_name")}
    assert defaults == {"model_name": "flux1-krea-dev.safetensors", "clip_name": "clip_l.safetensors",
                        "t5_name": "t5xxl_fp16.safetensors", "vae_name": "ae.safetensors"}
    assert inputs["t5_name"][0] == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]  # the list is unchanged
    assert sorted(set(opened)) == sorted(opened)  # each header read once ...
    opened.clear()
    _input_types(KreaModelLoader)
    assert opened == []  # ... and not again on the next call
    stat = t5.stat()
    os.utime(t5, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    _input_types(KreaModelLoader)
    assert opened == ["t5xxl_fp16.safetensors"]  # a changed file is read again
