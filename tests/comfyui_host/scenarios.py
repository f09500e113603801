"""Scenarios run inside the real ComfyUI, one per process: `python scenarios.py NAME WORKDIR`.

Each imports ComfyUI from $COMFYUI_DIR (on the CPU), puts the pack's nodes and ComfyUI's own side by side on
small checkpoints in the real key layouts, and prints one JSON line of measurements that
tests/test_comfyui_host.py asserts on. A separate process per scenario: once ComfyUI is importable the
pack runs in its ComfyUI mode, which the rest of the test session must not see.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path

sys.path.insert(0, os.environ["COMFYUI_DIR"])
from comfy.cli_args import args  # noqa: E402  (ComfyUI must be told it runs on the CPU before it loads)

args.cpu = True

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint  # noqa: E402
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from comfyui_krea.nodes.host import IN_COMFYUI, ModelSlot, host  # noqa: E402
from host_models import TINY, write_other_models  # noqa: E402,F401  (what the scenario files take from here)

# What ComfyUI's own FLUX loader accepts: full width (it does not read widths off the file), two blocks.
SHALLOW_FLUX_DEV = FluxConfig(depth=1, depth_single_blocks=1)
RANK, ALPHA = 4, 2.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def setup_folders(work: Path, config: FluxConfig, dtype: torch.dtype = torch.float32) -> None:
    for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
        (work / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(work / folder), is_default=True)
    write_random_flux_checkpoint(work / "diffusion_models" / "krea.safetensors", config, seed=1, dtype=dtype)


def krea_model(weight_dtype: str = "default", name: str = "krea.safetensors"):
    """What KreaModelLoader outputs as MODEL for a transformer file (its CLIP and VAE: write_other_models)."""
    return host.transformer_model(host.model_path("diffusion_models", name), weight_dtype, host.torch_device(),
                                  ModelSlot())


def write_loras(work: Path, config: FluxConfig) -> dict[str, dict]:
    """One LoRA file per format, each on one Linear; returns what each holds, for the expected merge."""
    gen = torch.Generator().manual_seed(7)
    h = config.hidden_size
    cases = {
        # kohya sd-scripts, on a fused qkv weight
        "kohya": ("lora_unet_double_blocks_0_img_attn_qkv", "lora_down", "lora_up", ".alpha",
                  "double_blocks.0.img_attn.qkv.weight", (3 * h, h), None),
        # diffusers / peft: to_q of a single block lands in the first h rows of the fused linear1
        "diffusers": ("transformer.single_transformer_blocks.0.attn.to_q", "lora_A", "lora_B", None,
                      "single_blocks.0.linear1.weight", (h, h), (0, h)),
        # ComfyUI's own naming
        "comfyui": ("diffusion_model.double_blocks.1.img_mlp.0", "lora_down", "lora_up", ".alpha",
                    "double_blocks.1.img_mlp.0.weight", (int(h * config.mlp_ratio), h), None),
    }
    out = {}
    for fmt, (stem, down_name, up_name, alpha_key, target, (rows, cols), rows_slice) in cases.items():
        down = torch.randn(RANK, cols, generator=gen) * 0.3
        up = torch.randn(rows, RANK, generator=gen) * 0.3
        tensors = {f"{stem}.{down_name}.weight": down, f"{stem}.{up_name}.weight": up}
        scale = 1.0
        if alpha_key:
            tensors[stem + alpha_key] = torch.tensor(ALPHA)
            scale = ALPHA / RANK
        save_file(tensors, str(work / "loras" / f"{fmt}.safetensors"))
        out[fmt] = {"target": target, "delta": scale * up @ down, "rows": rows_slice}
    return out


def conditioning(config: FluxConfig, tokens: int = 6):
    gen = torch.Generator().manual_seed(3)
    txt = torch.randn(1, tokens, config.context_in_dim, generator=gen)
    pooled = torch.randn(1, config.vec_in_dim, generator=gen)
    return [[txt, {"pooled_output": pooled, "guidance": 4.5}]]


def krea_sample(model, config: FluxConfig, steps: int = 3, size: int = 64) -> torch.Tensor:
    sampler = NODE_CLASS_MAPPINGS["KreaSampler"]()
    out = sampler.sample(model, conditioning(config), "custom", size, size, steps, 4.5, 42, 1, "none")
    return out["result"][0]["samples"]


def weight_of(model, key: str) -> torch.Tensor:
    module_name, _, leaf = key.rpartition(".")
    module = model.model.diffusion_model.get_submodule(module_name)
    return getattr(module, leaf).detach().clone()


# ---------------------------------------------------------------------------------------------- scenarios


def lora(work: Path) -> dict:
    """Native LoraLoaderModelOnly on the pack's MODEL, in three formats; and on a scaled-fp8 file."""
    setup_folders(work, TINY)
    expected = write_loras(work, TINY)
    base = krea_model()
    result: dict = {"in_comfyui": IN_COMFYUI, "type": type(base).__name__,
                    "holder": type(base.model).__name__, "formats": {}}
    base_latents = krea_sample(base, TINY)
    originals = {fmt: weight_of(base, e["target"]) for fmt, e in expected.items()}
    loader = comfy_nodes.LoraLoaderModelOnly()
    for fmt, e in expected.items():
        patched = loader.load_lora_model_only(base, f"{fmt}.safetensors", 0.8)[0]
        mm.load_models_gpu([patched])
        merged = weight_of(patched, e["target"])
        want = originals[fmt].clone()
        if e["rows"] is None:
            want += 0.8 * e["delta"]
        else:
            want[e["rows"][0]:e["rows"][1]] += 0.8 * e["delta"]
        latents = krea_sample(patched, TINY)
        mm.unload_all_models()
        restored = weight_of(base, e["target"])
        zero = loader.load_lora_model_only(base, f"{fmt}.safetensors", 0.0)[0]
        zero_latents = krea_sample(zero, TINY)
        mm.unload_all_models()
        result["formats"][fmt] = {
            "patches": len(patched.patches), "merge_error": rel(merged, want),
            "changed": rel(merged, originals[fmt]), "restored_exactly": bool(torch.equal(restored, originals[fmt])),
            "image_change": rel(latents, base_latents), "strength_zero_equal": bool(torch.equal(zero_latents,
                                                                                                base_latents))}
    # Scaled fp8: the LoRA must reach the weight in real units (ComfyUI's scaled layers convert before merging).
    write_random_flux_checkpoint(work / "diffusion_models" / "krea_fp8.safetensors", TINY, seed=1,
                                 layout="comfy_fp8_scaled")
    fp8 = krea_model("default", "krea_fp8.safetensors")
    layer = fp8.model.diffusion_model.double_blocks[0].img_attn.qkv
    real = (layer.weight.float() * layer.scale_weight.float()).clone()
    patched = loader.load_lora_model_only(fp8, "kohya.safetensors", 1.0)[0]
    mm.load_models_gpu([patched])
    effective = layer.weight.float() * layer.scale_weight.float()
    delta = expected["kohya"]["delta"]
    result["fp8_scaled"] = {"ops": type(layer).__module__ + "." + type(layer).__qualname__,
                            "error_with_lora": rel(effective, real + delta), "error_without_lora": rel(effective, real)}
    mm.unload_all_models()
    return result


def partial(work: Path) -> dict:
    """ComfyUI's own budget logic loading the pack's MODEL partially: what is resident, what streams."""
    setup_folders(work, TINY, dtype=torch.bfloat16)
    model = krea_model("default")
    transformer = model.model.diffusion_model
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    args_ = (torch.tensor([0.6]), torch.randn(1, 6, TINY.context_in_dim, generator=gen))
    kwargs = {"y": torch.randn(1, TINY.vec_in_dim, generator=gen), "guidance": torch.tensor([4.5])}
    model.patch_model(device_to=torch.device("cpu"))
    with torch.no_grad():
        full = transformer(x.float(), *args_, **kwargs).clone()
    model.unpatch_model(device_to=torch.device("cpu"))
    budget = model.model_size() // 3
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
    leaves = [m for m in transformer.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    resident = [m for m in leaves if getattr(m, "comfy_patched_weights", False)]
    streamed = [m for m in leaves if getattr(m, "comfy_cast_weights", False) and m not in resident]
    self_casting = [m for m in leaves if type(m).__name__ == "RMSNorm"]
    uncovered = [type(m).__name__ for m in leaves if m not in streamed and m not in resident and m not in self_casting]
    with torch.no_grad():
        out = transformer(x.float(), *args_, **kwargs)
    result = {"model_size": model.model_size(), "budget": budget, "loaded_size": model.loaded_size(),
              "lowvram": bool(getattr(model.model, "model_lowvram", False)), "leaves": len(leaves),
              "streamed": len(streamed), "resident": len(resident), "uncovered": uncovered,
              "identical": bool(torch.equal(out, full))}
    model.unpatch_model(device_to=torch.device("cpu"))
    return result


def unload(work: Path) -> dict:
    """ComfyUI's memory management owns the MODEL: it lists it, and unloading frees it (no pack reference)."""
    setup_folders(work, TINY)
    model = krea_model()
    alive = weakref.ref(model.model.diffusion_model)
    krea_sample(model, TINY, steps=1)
    listed = [m for m in mm.current_loaded_models if m.model is model]
    result = {"listed": len(listed), "loaded_size": listed[0].model_memory() if listed else 0,
              "model_size": model.model_size()}
    del model, listed
    mm.unload_all_models()
    gc.collect()
    result["freed"] = alive() is None
    return result


def native(work: Path) -> dict:
    """The pack against ComfyUI's own FLUX on the same file (full width, two blocks, bf16)."""
    setup_folders(work, SHALLOW_FLUX_DEV, dtype=torch.bfloat16)
    write_loras(work, SHALLOW_FLUX_DEV)
    ours = krea_model()
    theirs = comfy_nodes.UNETLoader().load_unet("krea.safetensors", "default")[0]
    result: dict = {"theirs": type(theirs.model.diffusion_model).__name__,
                    "ours": type(ours.model.diffusion_model).__name__}
    # KreaSampler on both MODELs: the reference loop over ComfyUI's own transformer and over ours.
    a = krea_sample(ours, SHALLOW_FLUX_DEV, steps=2, size=32)
    b = krea_sample(theirs, SHALLOW_FLUX_DEV, steps=2, size=32)
    result["krea_sampler_rel"] = rel(a, b)
    mm.unload_all_models()
    # The same LoRA on both, sampled by ComfyUI's own KSampler.
    lora_loader = comfy_nodes.LoraLoaderModelOnly()
    cond = conditioning(SHALLOW_FLUX_DEV)
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    outs = []
    for model in (ours, theirs):
        patched = lora_loader.load_lora_model_only(model, "diffusers.safetensors", 1.0)[0]
        (samples,) = comfy_nodes.common_ksampler(patched, 7, 2, 1.0, "euler", "simple", cond, cond, latent)
        outs.append(samples["samples"])
        mm.unload_all_models()
    result["ksampler_lora_rel"] = rel(outs[0], outs[1])
    plain = comfy_nodes.common_ksampler(ours, 7, 2, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]
    result["lora_changed_ksampler"] = rel(outs[0], plain)
    # Step caching cannot apply to ComfyUI's own transformer: the report says so. Inside ComfyUI the report is not
    # a `ui` output (ComfyUI's queue panel would count it): it goes through the host, as a message to the browser.
    from comfyui_krea.nodes.host import host

    reports = []
    send = host.node_report
    host.node_report = lambda text, fields: (reports.append(text), send(text, fields))[1]
    try:
        out = NODE_CLASS_MAPPINGS["KreaSampler"]().sample(theirs, cond, "custom", 32, 32, 2, 4.5, 1, 1, "regular")
    finally:
        host.node_report = send
    result["native_acceleration_report"] = reports[-1]
    result["native_sampler_ui"] = out["ui"]
    return result


def other_models(work: Path) -> dict:
    """The loader's text encoders and VAE are ComfyUI's own CLIP and VAE; they and the classifier are each loaded
    by ComfyUI's memory management under their own ModelPatcher, and freed with the node outputs and the loader
    node (ComfyUI drops both on /free)."""
    setup_folders(work, TINY)
    write_other_models(work, TINY)
    folder_paths.add_model_folder_path("safety_checker", str(work / "safety_checker"), is_default=True)
    loader = NODE_CLASS_MAPPINGS["KreaModelLoader"]()
    model, text_encoder, vae = loader.load("krea.safetensors", "default", "clip_l.safetensors", "t5.safetensors",
                                           "ae.safetensors")
    (cond,) = NODE_CLASS_MAPPINGS["KreaTextEncode"]().encode(text_encoder, "a red fox in the snow")
    (latent,) = NODE_CLASS_MAPPINGS["KreaEncodeImage"]().encode(vae, torch.rand(1, 64, 64, 3))
    (images,) = NODE_CLASS_MAPPINGS["KreaDecode"]().decode(vae, latent)
    NODE_CLASS_MAPPINGS["KreaSafetyCheck"]().check(images, True, 0.5, "nsfw_image_detection.safetensors")
    loaded = sorted(type(m.model.model).__name__ for m in mm.current_loaded_models)
    encoders, autoencoder = weakref.ref(text_encoder.cond_stage_model), weakref.ref(vae.first_stage_model)
    result = {"types": [type(text_encoder).__module__ + "." + type(text_encoder).__name__,
                        type(vae).__module__ + "." + type(vae).__name__],
              "loaded": loaded, "conditioning": list(cond[0][0].shape),
              "pooled": list(cond[0][1]["pooled_output"].shape), "image": list(images.shape)}
    del model, text_encoder, vae, cond, loader
    mm.unload_all_models()
    gc.collect()
    result["after_unload"] = len(mm.current_loaded_models)
    result["freed"] = encoders() is None and autoencoder() is None
    return result


def other_family(work: Path) -> dict:
    """A MODEL of another family is refused with its name."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    holder = comfy.model_base.BaseModel(comfy.supported_models.SDXL({"disable_unet_model_creation": True,
                                                                      "adm_in_channels": 2816}))
    model = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    sampler = NODE_CLASS_MAPPINGS["KreaSampler"]()
    try:
        sampler.sample(model, conditioning(TINY), "custom", 32, 32, 1, 4.5, 1, 1, "none")
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def hostile(work: Path) -> dict:
    """ComfyUI's own prompt validation with a model name that leaves the model folder, and two saves that got
    the same counter from ComfyUI's folder scan (two runs at once)."""
    import asyncio

    import execution

    setup_folders(work, TINY)
    write_other_models(work, TINY, "t5xxl_fp16.safetensors")
    (work / "diffusion_models" / "krea.safetensors").rename(work / "diffusion_models" / "flux1-krea-dev.safetensors")
    folder_paths.add_model_folder_path("safety_checker", str(work / "safety_checker"), is_default=True)
    (work / "outside.safetensors").write_bytes(b"planted outside the model folders")
    comfy_nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    workflow = Path(__file__).resolve().parent.parent.parent / "workflows" / "api" / "krea_text_to_image.json"

    def validation(**changes: dict) -> tuple[bool, str]:
        prompt = json.loads(workflow.read_text())
        for node_id, inputs in changes.items():
            prompt[node_id]["inputs"].update(inputs)
        valid, _, _, node_errors = asyncio.run(execution.validate_prompt("1", prompt, None))
        return valid, json.dumps(node_errors)

    result = {"IN_COMFYUI": IN_COMFYUI, "valid": validation()}
    for key, node_id, name in (("model_name", "1", "../outside.safetensors"),
                               ("vae_name", "1", str(work / "outside.safetensors")),
                               ("checker_name", "5", "../../outside.safetensors")):
        result[key] = validation(**{node_id: {key: name}})
    result["prefix"] = validation(**{"6": {"filename_prefix": "../escape/x"}})
    output = work / "output"
    folder_paths.set_output_directory(str(output))
    real = folder_paths.get_save_image_path
    scanned = real("race/r", str(output), 16, 16)
    folder_paths.get_save_image_path = lambda *args, **kwargs: scanned  # both runs scanned before either saved
    try:
        saves = [NODE_CLASS_MAPPINGS["KreaSaveImage"]().save(torch.full((1, 16, 16, 3), value), "race/r", "png")
                 for value in (0.0, 1.0)]
    finally:
        folder_paths.get_save_image_path = real
    result["saved"] = [img["filename"] for ui in saves for img in ui["ui"]["images"]]
    result["files"] = sorted(p.name for p in (output / "race").iterdir())
    return result


def validation_messages(work: Path) -> dict:
    """What ComfyUI's own validation gives for the shipped text-to-image workflow with no model files at all and
    with a width that is not a multiple of 16 and a NaN guidance (raw node_errors), and what the pack's reader of
    them (nodes/host/comfyui_errors.py) makes of it."""
    import asyncio

    import execution

    from comfyui_krea.nodes.host.comfyui_errors import node_problems

    for folder in ("diffusion_models", "text_encoders", "vae", "safety_checker"):
        (work / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(work / folder), is_default=True)
    comfy_nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    workflow = Path(__file__).resolve().parent.parent.parent / "workflows" / "api" / "krea_text_to_image.json"
    result = {}
    for name, changes in (("no_models", {}), ("bad_values", {"3": {"width": 1000, "image_size": "custom",
                                                                     "guidance_scale": float("nan")}})):
        prompt = json.loads(workflow.read_text())
        for node_id, inputs in changes.items():
            prompt[node_id]["inputs"].update(inputs)
        node_errors = asyncio.run(execution.validate_prompt("1", prompt, None))[3]
        raw = {node_id: [[e["type"], (e.get("extra_info") or {}).get("input_name"), e["details"]]
                         for e in entry["errors"]] for node_id, entry in node_errors.items()}
        result[name] = {"raw": raw, "problems": [[p.node_id, p.input, p.text] for p in node_problems(node_errors)]}
    return result


if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    print(json.dumps(globals()[name](workdir)))
