"""The pre-flight's LoRAs (standalone/preflight.py), from small files written here: LoRA chains that reach no model
loader are left to the nodes' validation, a LoRA that does not fit its transformer is a problem naming its node, and
the bytes LoRAs add are the merged layers as each transformer stores them (on a quantized GGUF: float32 factors, or
a dense copy for a LoHa).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.fal_api.lora_nodes import LORA_LOADER, add_loras
from comfyui_krea.standalone import preflight

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"


# ------------------------------------------------------------------ LoRA chains that reach no Krea Model Loader

def test_a_lora_whose_model_link_dangles_is_left_to_the_node_validation(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path / "no_models")
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["90"] = {"class_type": LORA_LOADER, "inputs": {"model": ["404", 0], "lora_name": "style.safetensors",
                                                           "strength_model": 1.0}}
    # the link names no node: no base to check the file against, nothing merged (not an AttributeError)
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == 0


def test_a_lora_chained_through_a_lora_node_without_inputs_is_left_to_the_node_validation(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path / "no_models")
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["90"] = {"class_type": LORA_LOADER, "inputs": {"model": ["91", 0], "lora_name": "style.safetensors",
                                                           "strength_model": 1.0}}
    prompt["91"] = {"class_type": LORA_LOADER}  # a hand-written node with no inputs at all
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == 0


def test_a_lora_on_a_model_loader_without_inputs_is_left_to_the_node_validation(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path / "no_models")
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["1"] = {"class_type": "KreaModelLoader"}  # no model_name to check the LoRA against
    add_loras(prompt, [("style.safetensors", 1.0)])
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == 0


# ------------------------------------------------------------ LoRAs on a GGUF transformer kept quantized (CPU)

def test_on_a_quantized_gguf_a_loha_counts_a_dense_float32_layer_and_a_lora_its_factors(tmp_path, host_state):
    """A LoHa changes its layer as a dense difference: a float32 copy of the whole layer (out x in x 4 bytes), which a
    plain LoRA on the same layer then merges into, so that layer is counted once; a plain LoRA on a layer nothing else
    changes keeps its factors beside the quantized weights: rank x (out + in) x 4 bytes."""
    pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")
    from comfyui_krea.model_loader.flux import RandomFluxSource
    from comfyui_krea.model_loader.flux.gguf_files import write_flux_gguf
    from comfyui_krea.standalone.demo import DEMO_FLUX

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "loras").mkdir()
    write_flux_gguf(models / "diffusion_models" / "krea-Q8_0.gguf", RandomFluxSource(DEMO_FLUX, 0, torch.bfloat16),
                    "Q8_0")
    host_state.configure(models_dir=models)
    gen = torch.Generator().manual_seed(0)
    # DEMO_FLUX (hidden size 64, MLP ratio 4): qkv is (3 x 64) x 64, the single block's linear1 (3 x 64 + 256) x 64
    qkv, linear1 = ("double_blocks_0_img_attn_qkv", (192, 64)), ("single_blocks_0_linear1", (448, 64))
    loha_rank, lora_rank = 2, 3
    stem = f"lora_unet_{qkv[0]}"
    save_file({f"{stem}.hada_{w}_{ab}": torch.randn(*shape, generator=gen) for w in ("w1", "w2")
               for ab, shape in (("a", (qkv[1][0], loha_rank)), ("b", (loha_rank, qkv[1][1])))},
              str(models / "loras" / "loha.safetensors"))
    save_file({f"lora_unet_{name}.lora_{part}.weight": torch.randn(*shape, generator=gen)
               for name, (out, inp) in (qkv, linear1)
               for part, shape in (("down", (lora_rank, inp)), ("up", (out, lora_rank)))},
              str(models / "loras" / "lora.safetensors"))
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["1"]["inputs"]["model_name"] = "krea-Q8_0.gguf"
    add_loras(prompt, [("loha.safetensors", 1.0), ("lora.safetensors", 0.5)])
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == 192 * 64 * 4 + lora_rank * (448 + 64) * 4


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


# --------------------------------------------------------- LoRA-merged layers, as each transformer stores them

# DEMO_FLUX's layers the LoRA files below change: (out, in)
QKV, LINEAR1 = ("double_blocks_0_img_attn_qkv", (192, 64)), ("single_blocks_0_linear1", (448, 64))


def _write_kohya_lora(path: Path, layers, rank: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    save_file({f"lora_unet_{name}.lora_{part}.weight": torch.randn(*shape, generator=gen)
               for name, (out, inp) in layers for part, shape in (("down", (rank, inp)), ("up", (out, rank)))},
              str(path))


@pytest.fixture(scope="module")
def lora_model_files(tmp_path_factory):
    """DEMO_FLUX transformers (float32 safetensors; GGUF files with F16 and F32 blocks; one twice as wide in bf16) and
    LoRA files: one on qkv and linear1, one on qkv only, one on the wide transformer's qkv."""
    from comfyui_krea.model_loader.flux import RandomFluxSource, write_random_flux_checkpoint
    from comfyui_krea.standalone.demo import DEMO_FLUX

    folder = tmp_path_factory.mktemp("lora_models")
    (folder / "diffusion_models").mkdir()
    (folder / "loras").mkdir()
    write_random_flux_checkpoint(folder / "diffusion_models" / "krea.safetensors", DEMO_FLUX)
    write_random_flux_checkpoint(folder / "diffusion_models" / "krea-diffusers.safetensors", DEMO_FLUX,
                                 layout="diffusers")
    wide = dataclasses.replace(DEMO_FLUX, hidden_size=128, num_heads=8)  # the same head size, twice as wide
    write_random_flux_checkpoint(folder / "diffusion_models" / "wide.safetensors", wide, dtype=torch.bfloat16)
    try:
        from comfyui_krea.model_loader.flux.gguf_files import write_flux_gguf
        from comfyui_krea.model_loader.gguf.writing import write_gguf
    except ImportError:
        pass
    else:
        source = RandomFluxSource(DEMO_FLUX, 0, torch.float32)
        for kind in ("F16", "F32"):
            write_gguf(folder / "diffusion_models" / f"krea-{kind}.gguf",
                       [(k, lambda k=k: source.tensor(k), kind if len(source.shape(k)) > 1 else "F32")
                        for k in source.keys()], "flux")
        write_flux_gguf(folder / "diffusion_models" / "krea-Q8_0.gguf", source, "Q8_0")
    _write_kohya_lora(folder / "loras" / "both.safetensors", (QKV, LINEAR1))
    _write_kohya_lora(folder / "loras" / "qkv.safetensors", (QKV,))
    _write_kohya_lora(folder / "loras" / "wide_qkv.safetensors", (("double_blocks_0_img_attn_qkv", (384, 128)),))
    return folder


@pytest.fixture
def lora_models(lora_model_files, host_state):
    host_state.configure(models_dir=lora_model_files)
    return lora_model_files


def _with_loras(model_name: str, weight_dtype: str, *loras: str) -> dict:
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["1"]["inputs"].update(model_name=model_name, weight_dtype=weight_dtype)
    add_loras(prompt, [(name, 1.0) for name in loras])
    return prompt


CHANGED_WEIGHTS = 192 * 64 + 448 * 64  # qkv and linear1, each counted once however many LoRAs change it


@pytest.mark.parametrize(("model_name", "weight_dtype", "per_weight"), [
    ("krea.safetensors", "default", 4),  # as stored: float32
    ("krea.safetensors", "fp8_e4m3fn", 1),
    ("krea.safetensors", "bf16", 2),
    ("krea.safetensors", "fp16", 2),
    ("krea-F16.gguf", "default", 2),  # a GGUF file that is not quantized: its blocks' own type
    ("krea-F32.gguf", "default", 4),
    ("krea-diffusers.safetensors", "default", 2),  # no BFL block layer to read the width off: 2 bytes assumed
    ("krea-diffusers.safetensors", "fp8_e4m3fn", 1),
])
def test_lora_merged_layers_are_counted_once_each_in_the_transformer_s_bytes_per_weight(lora_models, model_name,
                                                                                         weight_dtype, per_weight):
    if model_name.endswith(".gguf"):
        pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")
    prompt = _with_loras(model_name, weight_dtype, "both.safetensors", "qkv.safetensors")
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == CHANGED_WEIGHTS * per_weight


def test_on_the_cpu_the_refusal_names_the_lora_merged_layers(lora_models):
    prompt = _with_loras("krea.safetensors", "default", "both.safetensors")
    need = preflight.estimate(prompt)
    loras = CHANGED_WEIGHTS * 4
    problem = preflight.memory_problem(prompt, torch.device("cpu"), available=(need.total + loras - 1, "RAM"))
    assert f"images {_gib(need.pictures)} GiB, LoRA-merged layers {_gib(loras)} GiB) but RAM has" in problem
    assert preflight.memory_problem(prompt, torch.device("cpu"), available=(need.total + loras, "RAM")) is None
    # on a GPU the merge is written in place: the same memory suffices without the merged copies
    assert preflight.memory_problem(prompt, torch.device("cuda"), available=(need.total, "the GPU")) is None


def test_a_lora_that_does_not_fit_its_transformer_is_a_problem_naming_its_node(lora_models):
    from comfyui_krea.model_loader import ModelFileError
    from comfyui_krea.model_loader.flux import config_from_checkpoint
    from comfyui_krea.model_loader.lora import plan_lora, read_lora

    prompt = _with_loras("krea.safetensors", "default", "wide_qkv.safetensors", "both.safetensors")
    with pytest.raises(ModelFileError) as expected:  # the planner's own words, appended to the node
        plan_lora(read_lora(lora_models / "loras" / "wide_qkv.safetensors"),
                  config_from_checkpoint(lora_models / "diffusion_models" / "krea.safetensors"))
    wide = next(k for k, n in prompt.items() if n["class_type"] == LORA_LOADER
                and n["inputs"]["lora_name"] == "wide_qkv.safetensors")
    assert preflight.lora_problems(prompt) == [f"node {wide} ({LORA_LOADER}): lora_name: {expected.value}"]
    # the LoRA after it, which fits, is still checked and counted
    assert preflight.lora_bytes(prompt) == CHANGED_WEIGHTS * 4


def test_loras_on_two_model_loaders_are_each_checked_against_their_own_transformer(lora_models):
    prompt = _with_loras("krea.safetensors", "default", "both.safetensors")
    prompt["20"] = {"class_type": "KreaModelLoader",
                    "inputs": {**prompt["1"]["inputs"], "model_name": "wide.safetensors"}}
    prompt["21"] = {"class_type": LORA_LOADER, "inputs": {"model": ["20", 0], "lora_name": "wide_qkv.safetensors",
                                                          "strength_model": 1.0}}
    assert preflight.lora_problems(prompt) == []
    assert preflight.lora_bytes(prompt) == CHANGED_WEIGHTS * 4 + 384 * 128 * 2  # float32 and bf16 as stored


@pytest.mark.parametrize(("model_name", "dequantized"), [("krea-Q8_0.gguf", True), ("krea-F16.gguf", False)])
def test_a_quantized_gguf_transformer_counts_its_bytes_and_one_largest_layer_dequantized(lora_models, model_name,
                                                                                         dequantized):
    gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")
    reader = gguf.GGUFReader(str(lora_models / "diffusion_models" / model_name))  # the gguf library's own reading
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    largest = max(int(t.n_elements) for t in reader.tensors)
    prompt = _with_loras(model_name, "default")  # no text encoders, VAE or checker in this folder: 0 bytes each
    # float32 and the compute dtype's copy of the largest layer, 6 bytes a weight, while it is dequantized
    assert preflight.estimate(prompt).weights == stored + (6 * largest if dequantized else 0)


def test_only_model_only_lora_loaders_are_planned_not_comfyui_s_model_and_clip_lora_loader(lora_models):
    """ComfyUI's LoraLoader (MODEL and CLIP) is another node, not run by this pack: its file is not planned or
    counted here, nor is any other node with a MODEL input."""
    prompt = _with_loras("krea.safetensors", "default")
    prompt["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                           "lora_name": "wide_qkv.safetensors", "strength_model": 1.0,
                                                           "strength_clip": 1.0}}
    assert preflight.lora_problems(prompt) == [] and preflight.lora_bytes(prompt) == 0


def test_loras_on_several_model_loaders_add_up_whatever_each_transformer_stores(lora_models):
    """A safetensors transformer, a quantized GGUF one (the LoRA's float32 factors) and a safetensors one again: each
    loader's LoRA bytes are added to the others'."""
    pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")
    prompt = _with_loras("krea.safetensors", "default", "both.safetensors")
    for loader, model_name in (("20", "krea-Q8_0.gguf"), ("40", "krea.safetensors")):
        prompt[loader] = {"class_type": "KreaModelLoader",
                          "inputs": {**prompt["1"]["inputs"], "model_name": model_name}}
        prompt[str(int(loader) + 1)] = {"class_type": LORA_LOADER, "inputs": {
            "model": [loader, 0], "lora_name": "both.safetensors", "strength_model": 1.0}}
    factors = 2 * (192 + 64) * 4 + 2 * (448 + 64) * 4  # rank 2 x (out + in) x float32, qkv and linear1
    assert preflight.lora_bytes(prompt) == CHANGED_WEIGHTS * 4 + factors + CHANGED_WEIGHTS * 4
