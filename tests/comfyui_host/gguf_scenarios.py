"""GGUF scenarios inside the real ComfyUI, one per process: `python gguf_scenarios.py NAME WORKDIR`.

The pack's loader on GGUF files written here in ComfyUI-GGUF's layout: the MODEL it hands out under ComfyUI's
LoRA loaders, partial loading and unloading; and, where ComfyUI-GGUF is installed in the ComfyUI, its
UnetLoaderGGUF on the same file. Prints one JSON line that tests/test_comfyui_gguf_host.py asserts on.
"""
from __future__ import annotations

import gc
import importlib
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
from scenarios import SHALLOW_FLUX_DEV, conditioning, krea_model, krea_sample, rel, write_loras  # noqa: E402

from comfyui_krea.model_loader.flux import FluxConfig, load_flux  # noqa: E402
from comfyui_krea.model_loader.flux.gguf_files import write_random_flux_gguf  # noqa: E402
from comfyui_krea.model_loader.operations import QuantizedLinear  # noqa: E402
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from comfyui_krea.sampling.denoise import GenerationSettings, generate  # noqa: E402

# Rows of whole 256-weight blocks, so every type (K-quants included) quantizes every block Linear.
GGUF_TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=256, context_in_dim=256, hidden_size=256,
                       num_heads=2, depth=2, depth_single_blocks=1)


def setup(work: Path, config: FluxConfig, qtype: str, name: str = "krea-Q8_0.gguf") -> Path:
    for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
        (work / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(work / folder), is_default=True)
    return write_random_flux_gguf(work / "diffusion_models" / name, config, qtype, seed=1)


def pack_model(name: str):
    """The loader's MODEL output for a GGUF file, after its validation of model_name (no text encoders or VAE
    here: the loader builds those beside it, tests/comfyui_host/model_scenarios.py)."""
    from comfyui_krea.nodes import model_files

    model_files.check_model_file("diffusion_models", name, model_files.TRANSFORMER, "model_name")
    return krea_model("default", name)


def standalone_sample(path: Path, config: FluxConfig, steps: int = 3, size: int = 64,
                      loras: tuple = ()) -> torch.Tensor:
    """The pack's own loader and loop outside ComfyUI's management, as KreaSampler runs them (same inputs), with
    `loras` applied by the pack's own LoRA engine (set_loras: low-rank factors beside the quantized matmuls)."""
    from comfyui_krea.model_loader.lora import LoraChoice, set_loras

    (txt, extra), = conditioning(config)
    model = set_loras(load_flux(path), [LoraChoice(p, s) for p, s in loras])
    settings = GenerationSettings(width=size, height=size, num_steps=steps, guidance=4.5, seed=42, num_images=1)
    return generate(model, txt, extra["pooled_output"], settings, torch.device("cpu"), torch.float32).latents


def quantized(model) -> list[QuantizedLinear]:
    return [m for m in model.model.diffusion_model.modules() if isinstance(m, QuantizedLinear) and m.quant_type]


def effective_weight(layer: QuantizedLinear) -> torch.Tensor:
    """What the layer multiplies by now, read off its outputs for the unit vectors: its dequantized blocks with
    whatever ComfyUI's patches add (in the weight, or as low-rank factors beside the matmul)."""
    with torch.no_grad():
        out = layer(torch.eye(layer.in_features))  # (in, out): row i = W[:, i] + bias
    return (out - (layer.bias if layer.bias is not None else 0)).T


# ---------------------------------------------------------------------------------------------- scenarios


def pack_loader(work: Path) -> dict:
    """The pack's loader on a Q4_K file: listed, a standard MODEL of quantized layers, KreaSampler as the pack's
    own loop, native LoRA loaders (resident and streamed layers), partial loading, unloading."""
    path = setup(work, GGUF_TINY, "Q4_K", "krea-Q4_K.gguf")
    listed = NODE_CLASS_MAPPINGS["KreaModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    base = pack_model("krea-Q4_K.gguf")
    layers = quantized(base)
    result: dict = {"listed": "krea-Q4_K.gguf" in listed, "type": type(base).__name__,
                    "holder": type(base.model).__name__, "quantized_layers": len(layers),
                    "weight_dtypes": sorted({str(m.weight.dtype) for m in layers}),
                    "model_size": base.model_size(), "file_tensor_bytes": None}
    from comfyui_krea.model_loader.checkpoints import GGUFFile

    result["file_tensor_bytes"] = GGUFFile(path).nbytes()
    base_latents = krea_sample(base, GGUF_TINY)
    result["krea_sampler_vs_standalone"] = rel(base_latents, standalone_sample(path, GGUF_TINY))
    expected = write_loras(work, GGUF_TINY)
    loader = comfy_nodes.LoraLoaderModelOnly()
    modules = dict(base.model.diffusion_model.named_modules())
    result["formats"] = {}
    for fmt, e in expected.items():
        layer = modules[e["target"][: -len(".weight")]]
        original = layer.dequantized_weight(torch.device("cpu"), torch.float32)
        want = original.clone()
        rows = slice(*e["rows"]) if e["rows"] else slice(None)
        want[rows] += 0.8 * e["delta"]
        patched = loader.load_lora_model_only(base, f"{fmt}.safetensors", 0.8)[0]
        latents = krea_sample(patched, GGUF_TINY)
        merged = effective_weight(layer)
        blocks_kept = layer.weight.dtype == torch.uint8
        low_rank = bool(layer.resident_adapters) and not layer.resident_weight_function
        standalone = standalone_sample(path, GGUF_TINY, loras=((work / "loras" / f"{fmt}.safetensors", 0.8),))
        mm.unload_all_models()
        after = krea_sample(base, GGUF_TINY)
        zero = krea_sample(loader.load_lora_model_only(base, f"{fmt}.safetensors", 0.0)[0], GGUF_TINY)
        mm.unload_all_models()
        result["formats"][fmt] = {
            "patches": len(patched.patches), "merge_error": rel(merged, want), "changed": rel(merged, original),
            "blocks_kept": blocks_kept, "image_change": rel(latents, base_latents), "low_rank": low_rank,
            "standalone_engine_rel": rel(standalone, latents),
            "base_after_unload_equal": bool(torch.equal(after, base_latents)),
            "strength_zero_equal": bool(torch.equal(zero, base_latents))}
    # Partial loading, with a LoRA: ComfyUI streams what does not fit; the result equals a full load's.
    patched = loader.load_lora_model_only(base, "kohya.safetensors", 1.0)[0]
    transformer = patched.model.diffusion_model
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    args_ = (torch.tensor([0.6]), torch.randn(1, 6, GGUF_TINY.context_in_dim, generator=gen))
    kwargs = {"y": torch.randn(1, GGUF_TINY.vec_in_dim, generator=gen), "guidance": torch.tensor([4.5])}
    patched.patch_model(device_to=torch.device("cpu"))
    with torch.no_grad():
        full = transformer(x, *args_, **kwargs).clone()
    patched.unpatch_model(device_to=torch.device("cpu"))
    budget = patched.model_size() // 3
    patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
    streamed = [m for m in layers if m.comfy_cast_weights and not getattr(m, "comfy_patched_weights", False)]
    with torch.no_grad():
        partial = transformer(x, *args_, **kwargs)
    qkv = modules["double_blocks.0.img_attn.qkv"]
    result["partial"] = {"lowvram": bool(getattr(patched.model, "model_lowvram", False)), "budget": budget,
                         "loaded_size": patched.loaded_size(), "model_size": patched.model_size(),
                         "streamed": len(streamed), "resident": len(layers) - len(streamed),
                         "lora_streamed": bool(qkv.weight_function), "partial_rel": rel(partial, full)}
    patched.unpatch_model(device_to=torch.device("cpu"))
    # Unloading: ComfyUI's memory management owns the MODEL.
    alive = weakref.ref(base.model.diffusion_model)
    del base, patched, transformer, layers, modules, qkv, layer
    mm.unload_all_models()
    gc.collect()
    result["freed"] = alive() is None
    return result


def comfyui_gguf() -> object | None:
    """ComfyUI-GGUF's node module, when it is installed in this ComfyUI's custom_nodes."""
    folder = Path(os.environ["COMFYUI_DIR"]) / "custom_nodes"
    if not (folder / "ComfyUI-GGUF" / "nodes.py").is_file():
        return None
    sys.path.insert(0, str(folder))
    return importlib.import_module("ComfyUI-GGUF")


def interop(work: Path) -> dict:
    """ComfyUI-GGUF's UnetLoaderGGUF and the pack's loader on the same full-width Q8_0 file, each sampled by
    KreaSampler and by ComfyUI's own KSampler."""
    module = comfyui_gguf()
    if module is None:
        return {"installed": False}
    setup(work, SHALLOW_FLUX_DEV, "Q8_0")
    write_loras(work, SHALLOW_FLUX_DEV)
    theirs = module.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet("krea-Q8_0.gguf")[0]
    ours = pack_model("krea-Q8_0.gguf")
    result: dict = {"installed": True, "theirs": type(theirs.model.diffusion_model).__name__,
                    "ours": type(ours.model.diffusion_model).__name__}
    a = krea_sample(ours, SHALLOW_FLUX_DEV, steps=2, size=32)
    b = krea_sample(theirs, SHALLOW_FLUX_DEV, steps=2, size=32)
    result["krea_sampler_rel"] = rel(b, a)
    mm.unload_all_models()
    cond = conditioning(SHALLOW_FLUX_DEV)
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    plain = [comfy_nodes.common_ksampler(m, 7, 2, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]
             for m in (ours, theirs)]
    mm.unload_all_models()
    result["ksampler_rel"] = rel(plain[0], plain[1])
    lora_loader = comfy_nodes.LoraLoaderModelOnly()
    with_lora = []
    for model in (ours, theirs):
        patched = lora_loader.load_lora_model_only(model, "diffusers.safetensors", 1.0)[0]
        with_lora.append(comfy_nodes.common_ksampler(patched, 7, 2, 1.0, "euler", "simple", cond, cond,
                                                     latent)[0]["samples"])
        mm.unload_all_models()
    result["ksampler_lora_rel"] = rel(with_lora[0], with_lora[1])
    result["lora_changed"] = rel(with_lora[0], plain[0])
    return result


if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    print(json.dumps(globals()[name](workdir)))
