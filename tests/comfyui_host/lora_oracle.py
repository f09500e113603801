"""The pack's LoRA engine (used outside ComfyUI) against ComfyUI's own LoRA code, inside the real ComfyUI:
`python lora_oracle.py WORKDIR` prints one JSON line that tests/test_lora_comfyui.py asserts on.

ComfyUI's own FLUX (UNETLoader) is loaded from a reduced checkpoint that ComfyUI accepts (full width, 2 double and
3 single blocks: unequal depths, so a swapped block mapping cannot pass), each LoRA file is applied by ComfyUI's
LoraLoaderModelOnly and by the pack's engine (model_loader/lora) to the pack's transformer loaded from the same
file, and the merged weights are compared layer by layer; then both transformers sample with the same LoRA set
through the same loop. Also on ComfyUI's scaled-fp8 layout, where ComfyUI rounds stochastically to fp8 and the
pack to nearest.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# scenarios imports ComfyUI, told first that it runs on the CPU; its modules are used through it.
from scenarios import args, comfy_nodes, conditioning, mm, rel, setup_folders

from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.lora import LoraChoice, layer_deltas, plan_loras, set_loras
from comfyui_krea.sampling.denoise import GenerationSettings, generate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora_files import write_lora  # noqa: E402

UNEQUAL_FULL_WIDTH = FluxConfig(depth=2, depth_single_blocks=3)
FORMATS = ("kohya", "comfyui", "comfyui_peft", "diffusers", "diffusers_alpha", "onetrainer", "lokr", "loha")
FP8_FORMATS = ("kohya", "diffusers", "lokr")  # whole layers, row slices, a full-matrix kind: enough for fp8's units
STRENGTH = 0.8


def real(layer: torch.nn.Module) -> torch.Tensor:
    """A Linear's weight in real units, float32 (ComfyUI's scaled-fp8 layers and the pack's keep a scale_weight)."""
    w = layer.weight.detach().float()
    scale = getattr(layer, "scale_weight", None)
    return w * scale.float() if scale is not None else w


def compare(base: torch.nn.Module, ours: torch.nn.Module, theirs: torch.nn.Module, deltas: dict | None = None) -> dict:
    """Layer by layer (one float32 copy at a time: the full-width model does not fit twice in float32), over the
    layers both loaders read alike. With `deltas` (the set's float32 changes by layer), each merged weight is also
    measured against the exact sum base + delta."""
    out: dict = {"changed_ours": [], "changed_theirs": [], "loaded_differently": [], "delta_rel": 0.0,
                 "weight_rel": 0.0, "delta_size": 0.0, "ours_to_exact": 0.0, "theirs_to_exact": 0.0}
    theirs_layers = dict(theirs.named_modules())
    for name, layer in base.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        b, o, t = real(layer), real(ours.get_submodule(name)), real(theirs_layers[name])
        if deltas is None:  # the two bases
            if not torch.equal(t, b):
                out["loaded_differently"].append(name)
            continue
        if not torch.equal(o, b):
            out["changed_ours"].append(name)
        if name not in deltas:
            if not torch.equal(t, b) and name not in out["loaded_differently"]:
                out["changed_theirs"].append(name)
            continue
        if not torch.equal(t, b):
            out["changed_theirs"].append(name)
        exact = b.clone()
        for d in deltas[name]:
            exact[d.row_start:d.row_start + d.rows] += d.weight_delta()
        for key, value in (("delta_rel", rel(o - b, t - b)), ("weight_rel", rel(o, t)), ("delta_size", rel(t, b)),
                           ("ours_to_exact", rel(o, exact)), ("theirs_to_exact", rel(t, exact))):
            out[key] = max(out[key], value)
    return out


def sample(module: torch.nn.Module, config: FluxConfig) -> torch.Tensor:
    cond = conditioning(config)[0]
    settings = GenerationSettings(width=64, height=64, num_steps=2, guidance=4.5, seed=3, num_images=1)
    with torch.no_grad():
        return generate(module, cond[0], cond[1]["pooled_output"], settings, torch.device("cpu"),
                        torch.float32).latents


def formats(work: Path, file_name: str, names: tuple[str, ...]) -> dict:
    """Each format applied by both, on the checkpoint `file_name`: which layers change and by how much."""
    loader = comfy_nodes.LoraLoaderModelOnly()
    theirs = comfy_nodes.UNETLoader().load_unet(file_name, "default")[0]
    base = load_flux(work / "diffusion_models" / file_name)  # memory-mapped, as stored
    ours = load_flux(work / "diffusion_models" / file_name)
    mm.load_models_gpu([theirs])
    same = compare(base, ours, theirs.model.diffusion_model)  # where the two loaders agree
    mm.unload_all_models()
    result = {"loaded_differently": same["loaded_differently"]}
    for fmt in names:
        choice = [LoraChoice(work / "loras" / f"{fmt}.safetensors", STRENGTH)]
        deltas = {layer: items for layer, items in layer_deltas(plan_loras(choice, base.config)).items()
                  if layer not in same["loaded_differently"]}
        patched = loader.load_lora_model_only(theirs, f"{fmt}.safetensors", STRENGTH)[0]
        mm.load_models_gpu([patched])
        set_loras(ours, choice)
        result[fmt] = compare(base, ours, patched.model.diffusion_model, deltas)
        for side in ("changed_ours", "changed_theirs"):
            result[fmt][side] = [n for n in result[fmt][side] if n not in same["loaded_differently"]]
        mm.unload_all_models()
    return result


def main(work: Path) -> dict:
    # ComfyUI keeps a bf16 file in float32 on the CPU; --bf16-unet keeps it bf16, as on a GPU: both then round the
    # merged sum to bf16, and the full-width model fits in memory twice.
    args.bf16_unet = True
    config = UNEQUAL_FULL_WIDTH
    setup_folders(work, config, dtype=torch.bfloat16)
    write_random_flux_checkpoint(work / "diffusion_models" / "krea_fp8.safetensors", config, seed=1,
                                 layout="comfy_fp8_scaled")
    for i, fmt in enumerate(FORMATS):
        write_lora(work / "loras" / f"{fmt}.safetensors", config, fmt, seed=i, dtype=torch.bfloat16, rank=8)
    result = {"bf16": formats(work, "krea.safetensors", FORMATS),
              "fp8_scaled": formats(work, "krea_fp8.safetensors", FP8_FORMATS)}
    # Two LoRAs at their strengths, sampled by the same loop over ComfyUI's FLUX and over the pack's.
    theirs = comfy_nodes.UNETLoader().load_unet("krea.safetensors", "default")[0]
    loader = comfy_nodes.LoraLoaderModelOnly()
    patched = loader.load_lora_model_only(loader.load_lora_model_only(theirs, "kohya.safetensors", 0.7)[0],
                                          "diffusers.safetensors", -0.5)[0]
    mm.load_models_gpu([patched])
    theirs_latents = sample(patched.model.diffusion_model, config)
    mm.unload_all_models()
    ours = load_flux(work / "diffusion_models" / "krea.safetensors")
    plain = sample(ours, config)
    set_loras(ours, [LoraChoice(work / "loras" / "kohya.safetensors", 0.7),
                     LoraChoice(work / "loras" / "diffusers.safetensors", -0.5)])
    result["samples"] = {"rel": rel(sample(ours, config), theirs_latents), "lora_change": rel(plain, theirs_latents)}
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    with torch.inference_mode():  # as ComfyUI runs prompts (its fp8 rounding needs it)
        print(json.dumps(main(Path(sys.argv[1]))))
