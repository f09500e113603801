"""`run --lora NAME[:STRENGTH]`: LoRAs from the loras folder of --models, written into the workflow as
LoraLoaderModelOnly nodes (the shape ComfyUI's own loader takes), checked against the base transformer's header
before any weights load, merged into the transformer the run samples with, the base never read again when only
the LoRAs change."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_krea.fal_api.lora_nodes import LORA_LOADER, add_loras
from comfyui_krea.model_loader.flux import config_from_checkpoint, load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.lora import LoraChoice, set_loras
from comfyui_krea.nodes.host import forget_loaded, host, standalone_host
from comfyui_krea.standalone.cli import main, parse_args
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.overrides import apply_overrides
from comfyui_krea.standalone.runner import WorkflowError
from lora_files import write_lora

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models, tokenizers = write_demo_models(tmp_path_factory.mktemp("lora_cli"))
    base = models / "diffusion_models" / "flux1-krea-dev.safetensors"
    # The demo's widths with unequal depths (the LoRA files touch double block 1 and single block 2).
    config = dataclasses.replace(config_from_checkpoint(base), depth=2, depth_single_blocks=3)
    write_random_flux_checkpoint(base, config, seed=4, dtype=torch.bfloat16)
    loras = models / "loras"
    write_lora(loras / "style.safetensors", config, "kohya", seed=1, dtype=torch.bfloat16)
    write_lora(loras / "sub" / "detail.safetensors", config, "diffusers", seed=2)
    write_lora(loras / "wide.safetensors", dataclasses.replace(config, hidden_size=128, num_heads=8), "kohya")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(loras / "sdxl.safetensors"))
    (loras / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    (loras / "truncated.safetensors").write_bytes((loras / "style.safetensors").read_bytes()[:200])
    yield models, tokenizers
    forget_loaded()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    saved = host.settings()
    host.restore(dataclasses.replace(saved, tokenizer_dir=None))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    host.restore(saved)


def test_each_lora_option_becomes_a_lora_loader_in_front_of_the_sampler():
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    apply_overrides(prompt, parse_args(["run", str(TEXT_TO_IMAGE), "--lora", "style.safetensors:0.8",
                                        "--lora", "sub/detail.safetensors", "--lora", "odd:name.safetensors"]))
    loaders = {k: n for k, n in prompt.items() if n["class_type"] == LORA_LOADER}
    assert [(n["inputs"]["lora_name"], n["inputs"]["strength_model"]) for n in loaders.values()] == [
        ("style.safetensors", 0.8), ("sub/detail.safetensors", 1.0), ("odd:name.safetensors", 1.0)]
    first, second, third = loaders
    loader = next(k for k, n in prompt.items() if n["class_type"] == "KreaModelLoader")
    assert loaders[first]["inputs"]["model"] == [loader, 0]
    assert loaders[second]["inputs"]["model"] == [first, 0] and loaders[third]["inputs"]["model"] == [second, 0]
    sampler = next(n for n in prompt.values() if n["class_type"] == "KreaSampler")
    assert sampler["inputs"]["model"] == [third, 0]  # the sampler now reads the last LoRA's MODEL


@pytest.mark.parametrize("value", ["style.safetensors:200", ":0.5", "style.safetensors:-101"])
def test_a_strength_out_of_range_or_no_name_is_refused(value):
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    with pytest.raises(WorkflowError, match="--lora"):
        apply_overrides(prompt, parse_args(["run", str(TEXT_TO_IMAGE), "--lora", value]))


def test_loras_need_a_model_loader():
    with pytest.raises(ValueError, match="model loader"):
        add_loras({"1": {"class_type": "KreaSaveImage", "inputs": {}}}, [("a.safetensors", 1.0)])


def test_lora_loaders_take_the_next_free_numeric_ids_and_follow_every_model_source():
    prompt = {"save": {"class_type": "KreaSaveImage", "inputs": {"model": ["loader", 0]}},
              "loader": {"class_type": "UNETLoader", "inputs": {}}, "note": {"class_type": "Note"},
              "9": {"class_type": "KreaSampler", "inputs": {"model": ["loader", 0], "steps": 4}}}
    added = add_loras(prompt, [("a.safetensors", 0.5), ("b.safetensors", -1.0)])
    assert added == ["10", "11"]
    assert prompt["10"] == {"class_type": LORA_LOADER, "_meta": {"title": "LoRA a.safetensors"},
                            "inputs": {"model": ["loader", 0], "lora_name": "a.safetensors", "strength_model": 0.5}}
    assert prompt["11"]["inputs"] == {"model": ["10", 0], "lora_name": "b.safetensors", "strength_model": -1.0}
    assert prompt["9"]["inputs"] == {"model": ["11", 0], "steps": 4}
    assert prompt["save"]["inputs"] == {"model": ["11", 0]}

    unnumbered = {"loader": {"class_type": "KreaModelLoader", "inputs": {}}}
    assert add_loras(unnumbered, [("a.safetensors", 1.0)]) == ["1"]
    assert add_loras(unnumbered, []) == [] and list(unnumbered) == ["loader", "1"]


def run(models, cli, capsys, *options: str) -> tuple[int, str, str]:
    model_dir, tokenizers = models
    code = main(["run", str(TEXT_TO_IMAGE), "--models", str(model_dir), "--tokenizers", str(tokenizers),
                 "--output", str(cli), "--width", "64", "--height", "48", "--steps", "2", "--format", "png",
                 "--no-safety-checker", "--seed", "7", *options])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def pixels(stdout: str) -> np.ndarray:
    (path,) = [Path(line.removeprefix("saved ")) for line in stdout.splitlines() if line.startswith("saved ")]
    with Image.open(path) as image:
        return np.asarray(image).astype(np.int16)


def test_a_run_with_loras_samples_with_exactly_that_set_merged(models, cli, capsys, tmp_path, monkeypatch):
    model_dir, _ = models
    loads = []
    host_module = __import__("comfyui_krea.nodes.host.standalone_models", fromlist=["load_flux"])
    real_load = host_module.load_flux
    monkeypatch.setattr(host_module, "load_flux", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    code, stdout, stderr = run(models, cli, capsys)
    assert code == 0, stderr
    plain = pixels(stdout)
    code, stdout, stderr = run(models, cli, capsys, "--lora", "style.safetensors:0.9", "--lora",
                               "sub/detail.safetensors:-0.6")
    assert code == 0, stderr
    with_loras = pixels(stdout)
    assert np.abs(with_loras - plain).mean() > 1.0  # the LoRAs change the image
    code, stdout, stderr = run(models, cli, capsys, "--lora", "style.safetensors:0")
    assert code == 0 and np.array_equal(pixels(stdout), plain)  # strength 0 is no LoRA; the base came back
    assert len(loads) == 1  # the base file was read once, whatever the LoRAs
    # The same run on a transformer file holding the merged weights (merged by the engine, outside the CLI).
    base = model_dir / "diffusion_models" / "flux1-krea-dev.safetensors"
    merged = set_loras(load_flux(base), [LoraChoice(model_dir / "loras" / "style.safetensors", 0.9),
                                         LoraChoice(model_dir / "loras" / "sub" / "detail.safetensors", -0.6)])
    folder = tmp_path / "merged_models"
    (folder / "diffusion_models").mkdir(parents=True)
    for sub in ("text_encoders", "vae"):
        (folder / sub).symlink_to(model_dir / sub)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
              str(folder / "diffusion_models" / "flux1-krea-dev.safetensors"))
    code, stdout, stderr = run(((folder, models[1])), cli, capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(stdout), with_loras)


@pytest.mark.parametrize("name,words", [
    ("sdxl.safetensors", "Stable Diffusion"),
    ("wide.safetensors", "does not fit"),
    ("pickled.safetensors", "not a safetensors file"),
    ("truncated.safetensors", "truncated"),
    ("missing.safetensors", "not found"),
    ("../diffusion_models/flux1-krea-dev.safetensors", "leaves the model folder"),
])
def test_a_bad_lora_is_refused_before_any_weights_load(models, cli, capsys, monkeypatch, name, words):
    host_module = __import__("comfyui_krea.nodes.host.standalone_models", fromlist=["load_flux"])
    monkeypatch.setattr(host_module, "load_flux", lambda *a, **k: pytest.fail("the transformer was loaded"))
    forget_loaded()
    code, _, stderr = run(models, cli, capsys, "--lora", "style.safetensors", "--lora", f"{name}:0.5")
    assert code == 2 and "lora_name" in stderr and words in stderr, stderr
    assert "Traceback" not in stderr


def test_a_lora_loader_node_in_a_workflow_file_runs_here_too(models, cli, capsys):
    """An API workflow with ComfyUI's LoraLoaderModelOnly in it (as saved from ComfyUI) runs without ComfyUI."""
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    add_loras(prompt, [("style.safetensors", 0.9)])
    workflow = cli / "with_lora.json"
    workflow.write_text(json.dumps(prompt))
    model_dir, tokenizers = models
    code = main(["run", str(workflow), "--models", str(model_dir), "--tokenizers", str(tokenizers), "--output",
                 str(cli), "--width", "64", "--height", "48", "--steps", "2", "--no-safety-checker"])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr


def test_on_the_cpu_the_memory_check_counts_the_merged_layers(models, cli, monkeypatch):
    """The merged copies of the layers a LoRA changes sit beside the originals on the CPU: the pre-flight adds
    them (here: every layer the kohya file names, bf16 as the file stores them)."""
    from comfyui_krea.standalone import preflight
    from lora_files import _bfl_layers

    model_dir, _ = models
    standalone_host().configure(models_dir=model_dir)
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    add_loras(prompt, [("style.safetensors", 0.5)])
    config = config_from_checkpoint(model_dir / "diffusion_models" / "flux1-krea-dev.safetensors")
    assert preflight.lora_bytes(prompt) == sum(o * i * 2 for o, i in _bfl_layers(config).values())
    monkeypatch.setattr(preflight, "available_memory", lambda device: (1024, "this machine's RAM"))
    assert "LoRA-merged layers" in preflight.memory_problem(prompt, torch.device("cpu"))
    assert "LoRA-merged layers" not in preflight.memory_problem(json.loads(TEXT_TO_IMAGE.read_text()),
                                                                torch.device("cpu"))
