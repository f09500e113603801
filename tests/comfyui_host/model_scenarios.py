"""What the pack tells ComfyUI about its transformer, against ComfyUI's own reading of the same file, one scenario per
process: `python model_scenarios.py NAME WORKDIR` prints one JSON line for tests/test_comfyui_host.py.

Models of unequal depths (FLUX.1 has 19 double and 38 single blocks), so that a swap of the two in the config the
pack hands ComfyUI shows in ComfyUI's LoRA key map; the memory Krea Sampler asks ComfyUI for, against what ComfyUI's
own sampler asks for the same latent; FLUX variants with other input features, refused before any weight moves.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from scenarios import TINY, conditioning, krea_model, setup_folders  # imports ComfyUI (on the CPU) first

# isort: split
import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint  # noqa: E402
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

TINY_UNEQUAL = FluxConfig(**{**vars(TINY), "depth": 2, "depth_single_blocks": 3})
# Full width, as ComfyUI's own loader needs (it reads depths off the file, widths not); 1 double and 2 single blocks.
FULL_UNEQUAL = FluxConfig(depth=1, depth_single_blocks=2)
READ_OFF_THE_FILE = ("image_model", "in_channels", "out_channels", "patch_size", "vec_in_dim", "depth",
                     "depth_single_blocks", "guidance_embed")


def key_map(model) -> dict:
    """ComfyUI's LoRA key map for a MODEL: LoRA file key -> weight key (or (key, slice))."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in comfy.lora.model_lora_keys_unet(model.model, {}).items()}


def tiny_unequal(work: Path) -> dict:
    """2 double and 3 single blocks: the config the pack hands ComfyUI against ComfyUI's own detection on the file,
    and a diffusers LoRA on the last double and the last single block through LoraLoaderModelOnly."""
    setup_folders(work, TINY_UNEQUAL)
    ours = krea_model()
    detected = comfy.model_detection.detect_unet_config(load_file(str(work / "diffusion_models" / "krea.safetensors")),
                                                        "")
    unet_config = ours.model.model_config.unet_config
    h, rank = TINY_UNEQUAL.hidden_size, 4
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for block in ("transformer_blocks.1", "single_transformer_blocks.2"):
        tensors[f"transformer.{block}.attn.to_q.lora_A.weight"] = torch.randn(rank, h, generator=gen)
        tensors[f"transformer.{block}.attn.to_q.lora_B.weight"] = torch.randn(h, rank, generator=gen)
    save_file(tensors, str(work / "loras" / "last_blocks.safetensors"))
    patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "last_blocks.safetensors", 1.0)[0]
    return {"ours": {k: unet_config.get(k) for k in READ_OFF_THE_FILE},
            "comfyui": {k: detected.get(k) for k in READ_OFF_THE_FILE},
            "patched": sorted(patched.patches)}


def full_unequal(work: Path) -> dict:
    """Full width, 1 double and 2 single blocks: ComfyUI's LoRA key map on the pack's MODEL and on ComfyUI's own
    FLUX loaded from the same file, both "default" under --bf16-unet (bf16 weights, not the CPU's float32)."""
    from comfy.cli_args import args

    args.bf16_unet = True
    setup_folders(work, FULL_UNEQUAL, dtype=torch.bfloat16)
    ours = krea_model("default")
    theirs = comfy_nodes.UNETLoader().load_unet("krea.safetensors", "default")[0]
    assert ours.model_dtype() == theirs.model_dtype() == torch.bfloat16
    ours_map, theirs_map = key_map(ours), key_map(theirs)
    return {"holders": [type(ours.model).__name__, type(theirs.model).__name__],
            "diffusion_models": [type(ours.model.diffusion_model).__name__,
                                 type(theirs.model.diffusion_model).__name__],
            "keys": len(theirs_map), "equal": ours_map == theirs_map,
            "only_ours": sorted(set(ours_map) - set(theirs_map))[:10],
            "only_theirs": sorted(set(theirs_map) - set(ours_map))[:10],
            "different": sorted(k for k in set(ours_map) & set(theirs_map) if ours_map[k] != theirs_map[k])[:10]}


def memory(work: Path) -> dict:
    """What load_models_gpu is asked for: by Krea Sampler (acceleration none and regular) and by ComfyUI's own
    KSampler on the same MODEL and latent size (2 images, 64 x 48)."""
    setup_folders(work, TINY)
    model = krea_model()
    asked: list[dict] = []
    real = mm.load_models_gpu

    def recording(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                  force_full_load=False):
        if any(m is model for m in models):
            asked.append({"memory_required": memory_required, "minimum_memory_required": minimum_memory_required})
        return real(models, memory_required, force_patch_weights, minimum_memory_required, force_full_load)

    mm.load_models_gpu = recording
    sampler = NODE_CLASS_MAPPINGS["KreaSampler"]()
    result: dict = {}
    for acceleration in ("none", "regular"):
        sampler.sample(model, conditioning(TINY), "custom", 64, 48, 1, 4.5, 1, 2, acceleration)
        result[acceleration] = asked.pop()
    cond = conditioning(TINY)
    comfy_nodes.common_ksampler(model, 1, 1, 1.0, "euler", "simple", cond, cond,
                                {"samples": torch.zeros(2, 16, 48 // 8, 64 // 8)})
    result["ksampler"] = asked.pop()
    result["memory_usage_factor"] = model.model.memory_usage_factor
    result["attention_formula"] = "flash" if (mm.xformers_enabled() or mm.pytorch_attention_flash_attention()) \
        else "other"
    return result


def variants(work: Path) -> dict:
    """FLUX.1 Fill (img_in takes 384 features) and Depth (128), as files of the small width: what the pack tells
    ComfyUI, what ComfyUI reads off the file, and Krea Sampler's refusal, before load_models_gpu is called."""
    setup_folders(work, TINY)
    calls = []
    real = mm.load_models_gpu
    mm.load_models_gpu = lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1]
    result = {}
    for name, features in (("fill", 384), ("depth", 128)):
        path = work / "diffusion_models" / f"{name}.safetensors"
        write_random_flux_checkpoint(path, FluxConfig(**{**vars(TINY), "in_channels": features}), seed=1)
        model = krea_model(name=path.name)
        detected = comfy.model_detection.detect_unet_config(load_file(str(path)), "")
        calls.clear()
        try:
            NODE_CLASS_MAPPINGS["KreaSampler"]().sample(model, conditioning(TINY), "custom", 32, 32, 1, 4.5, 1, 1,
                                                         "none")
            error = None
        except ValueError as err:
            error = str(err)
        result[name] = {"ours": model.model.model_config.unet_config["in_channels"],
                        "comfyui": detected["in_channels"], "error": error, "load_calls": len(calls)}
    return result


if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    print(json.dumps(globals()[name](workdir)))
