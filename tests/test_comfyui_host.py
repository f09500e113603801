"""The pack inside the real ComfyUI (../shared/comfyui, on the CPU): its MODEL under ComfyUI's memory management,
native LoRA loaders on it, partial loading, and the pack against ComfyUI's own FLUX on the same file.

Each scenario runs in its own process (tests/comfyui_host/scenarios.py) and reports measurements as JSON.
Run with COMFYUI_DIR set: `../shared/comfyui/setup.sh DIR` prints the folder to use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SCENARIOS = Path(__file__).resolve().parent / "comfyui_host" / "scenarios.py"
MODEL_SCENARIOS = SCENARIOS.with_name("model_scenarios.py")

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="host tests need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR to "
                            "the folder it prints (CI does)")


def scenario(name: str, tmp_path_factory, script: Path = SCENARIOS) -> dict:
    work = tmp_path_factory.mktemp(name)
    done = subprocess.run([sys.executable, str(script), name, str(work)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return scenario("lora", tmp_path_factory)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return scenario("native", tmp_path_factory)


def test_the_loader_outputs_a_standard_model(lora):
    assert lora["in_comfyui"] and lora["type"] == "ModelPatcher" and lora["holder"] == "Flux"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfyui"])
def test_native_lora_loader_patches_the_pack_model(lora, fmt):
    result = lora["formats"][fmt]
    assert result["patches"] == 1  # the key map found the layer
    assert result["merge_error"] < 1e-6  # merged weight == W + strength * (alpha / rank) * up @ down (test's own)
    assert result["changed"] > 0.1 and result["image_change"] > 1e-3  # the LoRA changes the weight and the image
    assert result["strength_zero_equal"]  # strength 0 is no LoRA, exactly
    assert result["restored_exactly"]  # unloading gives back the file's weights bit for bit


def test_lora_on_a_scaled_fp8_file_acts_in_real_units(lora):
    fp8 = lora["fp8_scaled"]
    assert "scaled_fp8" in fp8["ops"]  # ComfyUI's own scaled-fp8 layers hold the weights
    # The merged weight is the real weight plus the LoRA up to fp8 rounding, far from the weight without it.
    assert fp8["error_with_lora"] < 0.06 and fp8["error_without_lora"] > 5 * fp8["error_with_lora"]


def test_partial_loading_streams_what_does_not_fit(tmp_path_factory):
    result = scenario("partial", tmp_path_factory)
    assert result["lowvram"] and result["loaded_size"] <= result["budget"] < result["model_size"]
    assert result["streamed"] > 0 and result["resident"] > 0
    assert result["uncovered"] == []  # every weight-holding layer is resident, streamed, or casts by itself
    assert result["identical"]  # the output equals a full load's, bit for bit


def test_comfyui_unloads_and_frees_the_model(tmp_path_factory):
    result = scenario("unload", tmp_path_factory)
    assert result["listed"] == 1 and result["loaded_size"] == result["model_size"]
    assert result["freed"]  # no reference of the pack's own kept the transformer alive


def test_krea_sampler_on_comfyuis_own_flux_equals_the_pack(native):
    assert native["theirs"] == "Flux" and native["ours"] != "Flux"
    assert native["krea_sampler_rel"] < 1e-4


def test_native_ksampler_with_lora_agrees_on_both_models(native):
    assert native["ksampler_lora_rel"] < 1e-3 and native["lora_changed_ksampler"] > 1e-2


def test_acceleration_on_a_native_model_says_it_did_not_apply(native):
    assert "step caching needs the Krea transformer" in native["native_acceleration_report"]


def test_text_encoders_vae_and_classifier_are_under_comfyuis_memory_management(tmp_path_factory):
    result = scenario("other_models", tmp_path_factory)
    assert result["types"] == ["comfy.sd.CLIP", "comfy.sd.VAE"]  # ComfyUI's own (tests/test_comfyui_native_nodes.py)
    # Each model the pack's other nodes ran was loaded by load_models_gpu under its own ModelPatcher ...
    assert result["loaded"] == ["AutoencodingEngine", "FluxClipModel_", "ViTImageClassifier"]
    assert result["conditioning"] == [1, 512, 48] and result["image"] == [1, 64, 64, 3]
    # ... and unloading with the node outputs and the loader node gone frees them.
    assert result["after_unload"] == 0 and result["freed"]


def test_a_model_of_another_family_is_named(tmp_path_factory):
    error = scenario("other_family", tmp_path_factory)["error"]
    assert error is not None and "needs a FLUX.1 MODEL" in error and "SDXL" in error


def test_inpainting_through_set_latent_noise_mask_equals_the_mask_input(tmp_path_factory):
    """ComfyUI's LoadImage (transparent = repaint) -> Krea Encode Image or ComfyUI's VAEEncode -> SetLatentNoiseMask
    -> Krea Sampler gives exactly what the sampler's mask input gives, and keeps the unmasked latent."""
    result = scenario("inpainting", tmp_path_factory, SCENARIOS.parent / "inpainting.py")
    assert result["mask_shape"] == [1, 48, 64] and result["repaint_fraction"] == 0.5
    assert result["file_mask_equals_alpha_mask"]  # LoadImageMask (red) of the black-and-white file: the same mask
    assert result["stand_ins_equal"]  # the server-less runner's LoadImage / LoadImageMask read files as ComfyUI's
    for encoder in ("KreaEncodeImage", "VAEEncode"):
        run = result[encoder]
        assert run["noise_mask_shape"] == [1, 1, 48, 64] and run["equal"]
        assert run["kept_max"] < 1e-5 and run["repainted_min"] > 0.1
        assert run["differs_from_image_to_image"] > 0.1  # the noise mask was not ignored


def test_the_shipped_workflows_through_comfyuis_http_api_and_free(tmp_path):
    """The real server with the pack in custom_nodes: the API workflows run, and /free gives the
    transformer's memory back (resident set of the server before and after)."""
    import socket
    import time
    import urllib.request

    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "krea").symlink_to(Path(__file__).resolve().parent.parent)
    models = base / "models"
    for folder in ("diffusion_models", "text_encoders", "vae", "safety_checker"):
        (models / folder).mkdir(parents=True)
    # Full width (what ComfyUI's FLUX reads too), two blocks: about 1 GB of bf16 weights.
    write = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
             "from scenarios import SHALLOW_FLUX_DEV, write_other_models;"
             "from comfyui_krea.model_loader.flux import write_random_flux_checkpoint; import torch;"
             "m = Path(sys.argv[1]);"
             "write_random_flux_checkpoint(m / 'diffusion_models' / 'flux1-krea-dev.safetensors', SHALLOW_FLUX_DEV,"
             " seed=1, dtype=torch.bfloat16);"
             "write_other_models(m, SHALLOW_FLUX_DEV, 't5xxl_fp16.safetensors')")
    subprocess.run([sys.executable, "-c", write, str(models), str(SCENARIOS.parent)], check=True, timeout=600,
                   env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    model_bytes = (models / "diffusion_models" / "flux1-krea-dev.safetensors").stat().st_size
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, str(Path(COMFYUI_DIR) / "main.py"), "--cpu", "--listen", "127.0.0.1",
                               "--port", str(port), "--base-directory", str(base)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=30) as answer:
            return json.loads(answer.read() or b"{}")

    def rss() -> int:
        for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    try:
        for _ in range(240):
            try:
                call("/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        (base / "input").mkdir(exist_ok=True)
        from PIL import Image

        Image.new("RGB", (80, 48), (200, 120, 40)).save(base / "input" / "example.png")
        mask = Image.new("L", (80, 48), 0)
        mask.paste(255, (40, 0, 80, 48))
        mask.save(base / "input" / "example_mask.png")
        workflows = Path(__file__).resolve().parent.parent / "workflows" / "api"
        for name in ("krea_text_to_image", "krea_image_to_image", "krea_inpainting"):  # the shipped ones, as saved
            prompt = json.loads((workflows / f"{name}.json").read_text())
            prompt["3"]["inputs"].update(image_size="custom", width=64, height=64, num_inference_steps=2)
            prompt_id = call("/prompt", {"prompt": prompt})["prompt_id"]
            for _ in range(600):
                history = call(f"/history/{prompt_id}").get(prompt_id)
                if history and history["status"].get("completed") is not None:
                    break
                time.sleep(0.5)
            assert history["status"]["status_str"] == "success", (name, history["status"])
            images = [img for out in history["outputs"].values() for img in out.get("images", [])]
            assert len(images) == 1, name
            assert (base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()
        before = rss()
        after = before
        for attempt in range(60):
            # Sent again every 5 s: ComfyUI's worker misses a /free that lands while it is not waiting on
            # its queue (the wake-up is lost and it next looks at the flags after its 1000 s timeout).
            if attempt % 10 == 0:
                call("/free", {"unload_models": True, "free_memory": True})
            time.sleep(0.5)
            after = rss()
            if before - after > 0.7 * model_bytes:
                break
        assert before - after > 0.7 * model_bytes, (before, after, model_bytes,
                                                    (tmp_path / "server.log").read_text()[-3000:])
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_hostile_names_are_refused_at_validation_and_saves_never_replace(tmp_path_factory):
    """Inside the real ComfyUI: model names with '..' or absolute paths in an API prompt are refused by
    ComfyUI's own validation (before anything loads), as is a prefix leaving the output folder; two saves that
    got the same counter from ComfyUI's folder scan keep both files."""
    result = scenario("hostile", tmp_path_factory)
    assert result["IN_COMFYUI"] and result["valid"] == [True, "{}"]
    for key in ("model_name", "vae_name", "checker_name"):
        valid, errors = result[key]
        assert not valid and "leaves the model folder" in errors, errors
        assert "planted" not in errors and "bytes" not in errors
    valid, errors = result["prefix"]
    assert not valid and "filename_prefix '../escape/x' cannot be used" in errors
    assert result["saved"] == ["r_00001_.png", "r_00002_.png"] and result["files"] == result["saved"]


def test_each_validation_problem_is_read_once_under_the_input_it_is_about(tmp_path_factory):
    """ComfyUI 0.3.64 attaches the text a VALIDATE_INPUTS returns to every input the function takes; the nodes
    give one problem a line, starting with its input, and the pack's readers of node_errors (the fal routes inside
    ComfyUI, `run --server`) list each problem once, under that input."""
    result = scenario("validation_messages", tmp_path_factory)
    raw, problems = result["no_models"]["raw"], result["no_models"]["problems"]
    loader_inputs = ["model_name", "clip_name", "t5_name", "vae_name"]
    assert [error[1] for error in raw["1"]] == loader_inputs  # ComfyUI: the loader's one text under all four
    assert len({error[2].split(" - ", 1)[1] for error in raw["1"]}) == 1
    loader = [p for p in problems if p[0] == "1"]
    assert [p[1] for p in loader] == loader_inputs  # the reader: one problem each, under its own input
    for (_, name, text) in loader:
        assert text.startswith(f"{name}: Model file ") and "not found" in text and text.count("not found") == 1
    checker = [p for p in problems if p[0] == "5"]
    assert len(checker) == 1 and checker[0][1] == "checker_name" and "no NSFW classifier" in checker[0][2]
    raw, problems = result["bad_values"]["raw"], result["bad_values"]["problems"]
    # ComfyUI: the sampler's one text (both problems) under each of the four inputs its check takes
    assert [error[1] for error in raw["3"]] == ["width", "height", "guidance_scale", "strength"]
    assert len({error[2].split(" - ", 1)[1] for error in raw["3"]}) == 1
    sampler = {p[1]: p[2] for p in problems if p[0] == "3"}
    assert set(sampler) == {"width", "guidance_scale"}  # height is fine: nothing is said under it
    assert sampler["width"].startswith("width must be a multiple of 16") and "1000" in sampler["width"]
    assert sampler["guidance_scale"] == "guidance_scale: nan is not a finite number"


# ------------------------------------------------ what the pack tells ComfyUI, against ComfyUI's reading of the file

def test_unequal_depths_reach_comfyui_as_the_file_has_them(tmp_path_factory):
    """2 double and 3 single blocks: the config the pack hands ComfyUI (from which ComfyUI builds its LoRA key map)
    equals ComfyUI's own detection on the file, and a diffusers LoRA on the last double and the last single block
    finds both (a swap of the depths would map one of them to a block that does not exist)."""
    result = scenario("tiny_unequal", tmp_path_factory, MODEL_SCENARIOS)
    assert result["ours"] == result["comfyui"] and result["ours"]["depth"] == 2
    assert result["ours"]["depth_single_blocks"] == 3
    assert result["patched"] == ["diffusion_model.double_blocks.1.img_attn.qkv.weight",
                                 "diffusion_model.single_blocks.2.linear1.weight"]


def test_comfyuis_lora_key_map_is_the_same_on_the_pack_model_and_on_comfyuis_own(tmp_path_factory):
    """Full width, 1 double and 2 single blocks, the same file under both loaders: comfy.lora.model_lora_keys_unet
    gives the same map (kohya, diffusers, lycoris, OneTrainer and ComfyUI names to the same weights)."""
    result = scenario("full_unequal", tmp_path_factory, MODEL_SCENARIOS)
    assert result["holders"] == ["Flux", "Flux"] and result["diffusion_models"][0] != result["diffusion_models"][1]
    assert result["keys"] > 100
    assert result["equal"], (result["only_ours"], result["only_theirs"], result["different"])


def test_the_memory_krea_sampler_asks_comfyui_for(tmp_path_factory):
    """One pass over the batch per step (no negative prompt): what ComfyUI's own KSampler gives as the minimum for
    the same latent, plus the step cache's two (B, tokens, 3072) residuals with acceleration on. On the CPU,
    ComfyUI's estimate is batch x latent pixels x 0.15 x memory_usage_factor MiB."""
    result = scenario("memory", tmp_path_factory, MODEL_SCENARIOS)
    batch, latent_pixels = 2, (48 // 8) * (64 // 8)
    assert result["memory_usage_factor"] == 3.1 and result["attention_formula"] == "other"
    estimate = batch * latent_pixels * 0.15 * 3.1 * 1024 * 1024
    assert abs(result["none"]["memory_required"] - estimate) < 1
    assert result["none"]["memory_required"] == result["ksampler"]["minimum_memory_required"]
    cache = 2 * batch * (latent_pixels // 4) * 3072 * 4
    assert result["regular"]["memory_required"] - result["none"]["memory_required"] == cache


@pytest.mark.parametrize("name, latent_channels, variant", [("fill", 96, "FLUX.1 Fill"),
                                                            ("depth", 32, "FLUX.1 Depth or FLUX.1 Canny")])
def test_a_flux_variant_with_other_input_features_is_refused_before_loading(tmp_path_factory, name,
                                                                          latent_channels, variant):
    result = scenario("variants", tmp_path_factory, MODEL_SCENARIOS)[name]
    assert result["ours"] == result["comfyui"] == latent_channels  # what ComfyUI reads off the same file
    assert result["error"].startswith(f"the model is {variant}") and result["load_calls"] == 0
