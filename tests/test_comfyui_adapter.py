"""The pure-Python parts of the ComfyUI host adapter (nodes/host/comfyui_models.py, comfyui_host.py), run in the plain
suite against small stand-ins of the few ComfyUI functions they call, so a plain `pytest` checks them too.

What the adapter decides itself is checked here: the config it hands ComfyUI (read off the file: depths, widths,
channels), the memory it asks load_models_gpu for, the refusals before anything loads (another model family, a
FLUX variant with other input features), which layer classes and dtype it asks ComfyUI for, how it registers
models/safety_checker and drives the progress bar. What ComfyUI then does with these (its LoRA key map, its memory
estimate, partial loading, validation) is the real ComfyUI's business and stays in tests/test_comfyui_host.py,
against the real thing.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from comfyui_adapter_stand_ins import CPU, PT_EXTENSIONS, adapter_over_stand_ins

from comfyui_krea.model_loader.flux import FluxConfig, FluxTransformer, write_random_flux_checkpoint
from comfyui_krea.model_loader.operations import WeightStorage
from comfyui_krea.nodes.host.holding import ModelSlot

# Unequal depths (FLUX.1: 19 double, 38 single) and every width different, so no two fields can be swapped unseen.
UNEQUAL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=40, hidden_size=48, num_heads=2,
                     depth=2, depth_single_blocks=3, axes_dim=(4, 10, 10))


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    yield from adapter_over_stand_ins(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def unequal_file(tmp_path_factory):
    return write_random_flux_checkpoint(tmp_path_factory.mktemp("adapter") / "unequal.safetensors", UNEQUAL, seed=2)


def test_the_config_handed_to_comfyui_is_read_off_the_file(comfy, unequal_file):
    """ComfyUI builds its LoRA key map (kohya, diffusers, OneTrainer names) from this config: a swap of the two
    depths, or of two widths, would send LoRA weights to blocks that do not exist."""
    patcher = comfy.models.transformer_model(unequal_file, "default")
    holder = patcher.model
    assert holder.model_config.unet_config == {
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": 24, "context_in_dim": 40, "hidden_size": 48, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 3, "axes_dim": [4, 10, 10], "theta": 10_000, "qkv_bias": True,
        "disable_unet_model_creation": True}
    module = holder.diffusion_model
    assert isinstance(module, FluxTransformer)
    assert (len(module.double_blocks), len(module.single_blocks)) == (2, 3)
    assert holder.model_config.inference == (torch.float32, None)  # stored as computed: no manual cast
    assert (patcher.load_device, patcher.offload_device) == (CPU, CPU)
    assert module.dtype == torch.float32  # BaseModel.get_dtype() reads it
    assert all(type(holder.model_config.unet_config[k]) is int for k in ("in_channels", "out_channels"))
    # the layer classes and the default dtype are ComfyUI's choices for the device the model computes on
    assert comfy.calls.pick_operations and {asked[2] for asked in comfy.calls.pick_operations} == {CPU}
    assert comfy.calls.unet_dtype and {asked[0] for asked in comfy.calls.unet_dtype} == {CPU}


def test_the_weight_dtype_picked_is_the_one_stored(comfy, unequal_file):
    patcher = comfy.models.transformer_model(unequal_file, "bf16")
    assert patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16


def test_the_loaders_slot_keeps_the_model_until_another_file_or_dtype_is_picked(comfy, unequal_file):
    host, slot = comfy.host.ComfyHost(), ModelSlot()
    patcher = host.transformer_model(unequal_file, "bf16", CPU, slot)
    assert patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    assert host.transformer_model(unequal_file, "bf16", CPU, slot) is patcher
    assert host.transformer_model(unequal_file, "default", CPU, slot).model.diffusion_model.dtype == torch.float32


def test_default_weights_take_comfyuis_dtype_for_its_flux(comfy, unequal_file):
    comfy.calls.unet_dtype_answer = torch.bfloat16  # e.g. --bf16-unet, or a GPU that computes in bf16
    patcher = comfy.models.transformer_model(unequal_file, "default")
    assert patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    (device, supported, stored), *_ = comfy.calls.unet_dtype
    assert supported == [torch.bfloat16, torch.float16, torch.float32] and stored == torch.float32
    comfy.calls.unet_dtype_answer = torch.float8_e4m3fn  # a choice FLUX's config does not support: the file's
    choose = comfy.models.comfy_default_dtype(CPU)
    assert choose(torch.float16) == torch.float16


def test_layer_classes_are_asked_of_comfy_ops_for_the_storage(comfy):
    operations = comfy.models.comfy_operations(CPU)
    operations(WeightStorage(torch.float8_e4m3fn, torch.bfloat16, scaled=True, fast_fp8=True))
    operations(WeightStorage(torch.bfloat16, torch.float32, scaled=False, fast_fp8=False))
    assert comfy.calls.scaled_fp8_ops == [(False, False)]  # fp8 matmuls only where the device supports them
    assert comfy.calls.pick_operations == [(torch.bfloat16, torch.float32, CPU, False)]


def loaded_holder(comfy, unet_config: dict | None = None, manual_cast: torch.dtype | None = None,
                  dtype: torch.dtype = torch.bfloat16):
    supported = comfy.stand_ins["comfy.supported_models"].Flux(unet_config or {"in_channels": 16, "patch_size": 2})
    supported.set_inference_dtype(dtype, manual_cast)
    holder = comfy.stand_ins["comfy.model_base"].Flux(supported)
    holder.diffusion_model = types.SimpleNamespace(dtype=dtype)
    return comfy.stand_ins["comfy.model_patcher"].ModelPatcher(holder, torch.device("meta"), CPU)


@pytest.mark.parametrize("extra", [0, 589_824])
def test_the_memory_asked_is_comfyuis_estimate_for_the_latent_plus_the_extra_bytes(comfy, extra):
    model = loaded_holder(comfy)
    shape = (2, 16, 6, 8)
    loaded = comfy.models.load_transformer(model, shape, extra)
    assert model.model.asked == [shape]  # one pass over the batch: no doubling for a negative prompt
    assert comfy.calls.load_models_gpu == [([model], 1000.5 * math.prod(shape) + extra)]
    assert loaded.device == torch.device("meta") and loaded.compute_dtype == torch.bfloat16
    assert not loaded.is_pack_model and not loaded.streamed


def test_the_loaded_transformer_is_the_models_own_module_and_says_whether_comfyui_streams_it(comfy, unequal_file):
    model = loaded_holder(comfy)
    loaded = comfy.host.ComfyHost().loaded_transformer(model, (1, 16, 2, 2))  # no extra bytes by default
    assert comfy.calls.load_models_gpu == [([model], 1000.5 * 4 * 16)]
    assert loaded.module is model.model.diffusion_model and loaded.is_pack_model is False and loaded.streamed is False
    model.model.model_lowvram = True  # ComfyUI loaded it partially
    assert comfy.models.load_transformer(model, (1, 16, 2, 2), 0).streamed is True
    pack_model = comfy.models.transformer_model(unequal_file, "default")
    assert comfy.models.load_transformer(pack_model, (1, 16, 2, 2), 0).is_pack_model is True


@pytest.mark.parametrize("unet_config", [{"image_model": "flux"}, {"in_channels": 64, "patch_size": 1}],
                         ids=["no channel fields", "patch 1"])
def test_a_flux_of_64_token_features_is_taken_however_its_config_counts_them(comfy, unet_config):
    model = loaded_holder(comfy, unet_config)
    comfy.models.load_transformer(model, (1, 16, 2, 2), 0)
    assert len(comfy.calls.load_models_gpu) == 1


def test_the_compute_dtype_is_the_manual_cast_one_and_fp8_computes_in_bf16(comfy):
    assert comfy.models.load_transformer(loaded_holder(comfy, manual_cast=torch.float16), (1, 16, 2, 2),
                                         0).compute_dtype == torch.float16
    assert comfy.models.load_transformer(loaded_holder(comfy, dtype=torch.float8_e4m3fn), (1, 16, 2, 2),
                                         0).compute_dtype == torch.bfloat16


@pytest.mark.parametrize("latent_channels, variant", [(96, "FLUX.1 Fill"), (32, "FLUX.1 Depth or FLUX.1 Canny")])
def test_a_flux_variant_is_refused_before_anything_loads(comfy, latent_channels, variant):
    model = loaded_holder(comfy, {"in_channels": latent_channels, "patch_size": 2})
    with pytest.raises(ValueError, match=f"^the model is {variant}"):
        comfy.models.load_transformer(model, (1, 16, 4, 4), 0)
    assert comfy.calls.load_models_gpu == [] and model.model.asked == []


def test_a_model_of_another_family_is_refused_by_name_before_anything_loads(comfy):
    supported = comfy.stand_ins["comfy.supported_models"].Flux({})
    holder = comfy.stand_ins["comfy.model_base"].BaseModel(supported)
    model = comfy.stand_ins["comfy.model_patcher"].ModelPatcher(holder, CPU, CPU)
    with pytest.raises(ValueError, match=r"needs a FLUX.1 MODEL .* the connected model is BaseModel \(SupportedFlux\)"):
        comfy.models.load_transformer(model, (1, 16, 4, 4), 0)
    holder = types.SimpleNamespace(model=torch.nn.Linear(1, 1))  # a patcher-like holder of no ComfyUI model
    with pytest.raises(ValueError, match=r"the connected model is Linear\.$"):
        comfy.models.load_transformer(holder, (1, 16, 4, 4), 0)
    with pytest.raises(ValueError, match="the connected model is str"):
        comfy.models.load_transformer("not a model", (1, 16, 4, 4), 0)
    assert comfy.calls.load_models_gpu == []


def test_the_safety_checker_folder_is_registered_beside_folders_configured_before(comfy):
    comfy.host.ComfyHost()
    paths, extensions = comfy.stand_ins["folder_paths"].folder_names_and_paths["safety_checker"]
    assert paths == ["/extra/safety", str(comfy.root / "models" / "safety_checker")] and ".safetensors" in extensions
    comfy.host.ComfyHost()  # a second host (a reload) adds nothing twice
    assert comfy.stand_ins["folder_paths"].folder_names_and_paths["safety_checker"][0] == paths


def test_gguf_files_are_listed_under_keys_of_the_packs_own_over_comfyuis_folder_lists(comfy):
    comfy.host.ComfyHost()
    known = comfy.stand_ins["folder_paths"].folder_names_and_paths
    for folder in ("diffusion_models", "text_encoders"):
        paths, extensions = known[f"krea_gguf_{folder}"]
        assert paths is known[folder][0] and extensions == {".gguf"}  # folders ComfyUI adds later count too
        assert known[folder][1] == PT_EXTENSIONS  # ComfyUI's own loaders keep their lists


def test_each_model_kind_gets_comfyuis_devices_for_it(comfy):
    host = comfy.host.ComfyHost()
    assert host.model_devices("text_encoder") == (torch.device("meta"), CPU)
    assert host.model_devices("vae") == (torch.device("meta"), CPU)
    assert host.model_devices("safety_checker") == (CPU, CPU)


def test_every_step_checks_the_interrupt_before_it_reports_and_tells_the_listeners(comfy):
    host = comfy.host.ComfyHost()
    heard = []
    x0 = torch.zeros(1)
    host.add_step_listener(lambda prompt_id, step, total, latent: heard.append((prompt_id, step, total, latent)))
    host.add_step_listener(lambda *told: heard.append(("second", *told)))
    callback = host.progress_callback(3, node_id="9")
    callback(1, 3, x0)
    assert comfy.calls.events == [("bar", 3, "9"), "interrupt check", ("update", 1, 3, None)]
    assert heard == [("p1", 1, 3, x0), ("second", "p1", 1, 3, x0)]
    comfy.calls.interrupted = True
    with pytest.raises(InterruptedError):
        callback(2, 3, torch.zeros(1))
    assert comfy.calls.events[-1] == "interrupt check" and len(heard) == 2  # nothing reported after a cancel
