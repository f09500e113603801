"""Scenarios of ComfyUI's own nodes on the loader's CLIP and VAE, and of reloading through ComfyUI's own executor, one
per process: `python native_nodes.py NAME WORKDIR` prints one JSON line that tests/test_comfyui_native_nodes.py
asserts on.

The all-pack path is computed in the same process by the pack's own modules on the same files (load_text_encoders,
load_autoencoder: what runs outside ComfyUI, parity-tested against transformers and diffusers), so each native
path is measured against it. CLIP-L is full size (ComfyUI builds it at its one size); the T5 is reduced, and
ComfyUI's own DualCLIPLoader is told its sizes through ComfyUI's own `t5xxl_model_config` model option, as the
loader does, and nothing else.
"""
from __future__ import annotations

import gc
import json
import shutil
import sys
import weakref
from pathlib import Path

# isort: off
from scenarios import TINY, rel, setup_folders, write_other_models  # first: it puts ComfyUI on the path, on the CPU
# isort: on

import comfy.model_management as mm
import comfy.sd
import folder_paths
import nodes as comfy_nodes
import torch
from comfy_extras.nodes_flux import CLIPTextEncodeFlux

from comfyui_krea.model_loader import load_autoencoder, load_text_encoders
from comfyui_krea.model_loader.text_encoders import t5_weights
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS
from comfyui_krea.nodes.host import comfyui_models, host

PROMPT = "a red fox in the snow at dawn, photographed from a low angle"
CPU = torch.device("cpu")
WORKFLOW = Path(__file__).resolve().parent.parent.parent / "workflows" / "api" / "krea_text_to_image.json"


def setup(work: Path, t5_name: str = "t5.safetensors") -> None:
    setup_folders(work, TINY)
    write_other_models(work, TINY, t5_name)
    folder_paths.add_model_folder_path("safety_checker", str(work / "safety_checker"), is_default=True)


def pack_conditioning(work: Path) -> list:
    """The all-pack text path: the pack's own CLIP-L and T5 modules and tokenizers (ComfyUI's tokenizer files)."""
    encoders = load_text_encoders(work / "text_encoders" / "clip_l.safetensors", work / "text_encoders" /
                                  "t5.safetensors", None, CPU, extra_tokenizer_dirs=[host.shipped_tokenizer_dirs()])
    sequence, pooled = encoders.encode([PROMPT])
    return [[sequence, {"pooled_output": pooled}]]


def cond_rel(ours: list, reference: list) -> float:
    """The larger relative difference of the sequence and the pooled vector (shapes must agree)."""
    if ours[0][0].shape != reference[0][0].shape:
        return float("inf")
    return max(rel(ours[0][0], reference[0][0]), rel(ours[0][1]["pooled_output"], reference[0][1]["pooled_output"]))


def ksampler(model, conditioning: list) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    return comfy_nodes.common_ksampler(model, 7, 2, 1.0, "euler", "simple", conditioning, conditioning,
                                       latent)[0]["samples"]


def dual_clip_loader() -> object:
    """ComfyUI's own DualCLIPLoader (type flux) on the test files, told their sizes (see the module docstring)."""
    real = comfy.sd.load_clip

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=None, model_options=None):
        sizes = comfyui_models.t5_size_options(t5_weights(ckpt_paths[1])[0])
        return real(ckpt_paths, embedding_directory=embedding_directory, clip_type=clip_type,
                    model_options={**(model_options or {}), **sizes})

    comfy.sd.load_clip = load_clip
    try:
        return comfy_nodes.DualCLIPLoader().load_clip("clip_l.safetensors", "t5.safetensors", "flux")[0]
    finally:
        comfy.sd.load_clip = real


def native_nodes(work: Path) -> dict:
    """ComfyUI's text, sampler, VAE and inpainting nodes on the loader's CLIP and VAE, the pack's nodes on
    DualCLIPLoader's and VAELoader's, each against the all-pack path."""
    setup(work)
    model, clip, vae = NODE_CLASS_MAPPINGS["KreaModelLoader"]().load(
        "krea.safetensors", "default", "clip_l.safetensors", "t5.safetensors", "ae.safetensors")
    result: dict = {"types": [f"{type(x).__module__}.{type(x).__name__}" for x in (model, clip, vae)]}
    reference = pack_conditioning(work)
    pack_vae = load_autoencoder(work / "vae" / "ae.safetensors", CPU)
    text_encode = NODE_CLASS_MAPPINGS["KreaTextEncode"]
    # Text: the pack's node on the loader's CLIP and on DualCLIPLoader's; ComfyUI's CLIPTextEncodeFlux on both.
    ours = text_encode().encode(clip, PROMPT)[0]
    theirs = dual_clip_loader()
    native = CLIPTextEncodeFlux.execute(clip, PROMPT, PROMPT, 4.5).args[0]
    result["text"] = {"krea_on_loader": cond_rel(ours, reference),
                      "krea_on_dualcliploader": cond_rel(text_encode().encode(theirs, PROMPT)[0], reference),
                      "native_on_loader": cond_rel(native, reference),
                      "native_on_dualcliploader_tokens": CLIPTextEncodeFlux.execute(
                          theirs, PROMPT, PROMPT, 4.5).args[0][0][0].shape[1],
                      "native_guidance": native[0][1].get("guidance")}
    # Samplers: CLIPTextEncodeFlux into Krea Sampler, Krea Text Encode into KSampler, against the pack's conditioning.
    all_pack = _krea_sample(model, reference)
    result["krea_sampler_native_text"] = rel(_krea_sample(model, native), all_pack)
    result["ksampler_krea_text"] = rel(ksampler(model, ours), ksampler(model, reference))
    mm.unload_all_models()
    # VAE: ComfyUI's nodes on the loader's VAE and the pack's nodes on VAELoader's, against the pack's autoencoder.
    gen = torch.Generator().manual_seed(11)
    latent = torch.randn(1, 16, 8, 8, generator=gen)
    big = torch.randn(1, 16, 16, 16, generator=gen)
    pixels = torch.rand(1, 64, 64, 3, generator=gen)
    with torch.no_grad():
        pack_images = ((pack_vae.decode(latent) + 1) * 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        pack_big = ((pack_vae.decode(big) + 1) * 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        pack_latent = pack_vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1)
    loaded_vae = comfy_nodes.VAELoader().load_vae("ae.safetensors")[0]
    result["vae"] = {
        "vaedecode": rel(comfy_nodes.VAEDecode().decode(vae, {"samples": latent})[0], pack_images),
        "vaedecodetiled_one_tile": rel(comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": latent}, 512, 64)[0],
                                       pack_images),
        # In tiles, each pass differs from an untiled decode by design: it is the same as with VAELoader's VAE.
        "vaedecodetiled_tiles": rel(comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": big}, 64, 16)[0],
                                    comfy_nodes.VAEDecodeTiled().decode(loaded_vae, {"samples": big}, 64, 16)[0]),
        "vaedecodetiled_tiles_vs_untiled": rel(comfy_nodes.VAEDecodeTiled().decode(vae, {"samples": big}, 64, 16)[0],
                                               pack_big),
        "vaeencode": rel(comfy_nodes.VAEEncode().encode(vae, pixels)[0]["samples"], pack_latent),
        "krea_decode_on_vaeloader": rel(NODE_CLASS_MAPPINGS["KreaDecode"]().decode(
            loaded_vae, {"samples": latent})[0], pack_images),
        "krea_encode_on_vaeloader": rel(NODE_CLASS_MAPPINGS["KreaEncodeImage"]().encode(
            loaded_vae, pixels)[0]["samples"], pack_latent),
    }
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    inpaint = comfy_nodes.VAEEncodeForInpaint().encode(vae, pixels, mask, 6)[0]
    positive, _, conditioned = comfy_nodes.InpaintModelConditioning().encode(ours, ours, pixels, vae, mask, True)
    result["inpaint"] = {"latent": list(inpaint["samples"].shape), "noise_mask": "noise_mask" in inpaint,
                         "concat_latent": list(positive[0][1]["concat_latent_image"].shape),
                         "latent_mask": "noise_mask" in conditioned}
    # Wrong inputs are named: an SD1 CLIP into Krea Text Encode.
    try:
        sd1 = comfy.sd.CLIP(no_init=True)
        sd1.cond_stage_model = torch.nn.Linear(1, 1)
        text_encode().encode(sd1, PROMPT)
        result["wrong_clip"] = None
    except ValueError as err:
        result["wrong_clip"] = str(err)
    return result


def _krea_sample(model, conditioning: list) -> torch.Tensor:
    sampler = NODE_CLASS_MAPPINGS["KreaSampler"]()
    return sampler.sample(model, conditioning, "custom", 64, 64, 2, 4.5, 42, 1, "none")["result"][0]["samples"]


class _Server:
    """What ComfyUI's PromptExecutor asks of its server when no browser is connected."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        return None


def reloads(work: Path) -> dict:
    """The shipped text-to-image workflow run by ComfyUI's own executor (its output and node caches), changing one
    input at a time: which models are loaded again, and when the prompt is encoded again; then /free's reset."""
    import execution

    setup(work, "t5xxl_fp16.safetensors")  # the workflow's file names
    (work / "diffusion_models" / "krea.safetensors").rename(work / "diffusion_models" / "flux1-krea-dev.safetensors")
    for folder, name, copy in (("diffusion_models", "flux1-krea-dev.safetensors", "krea2.safetensors"),
                               ("text_encoders", "clip_l.safetensors", "clip_l_copy.safetensors"),
                               ("vae", "ae.safetensors", "ae_copy.safetensors")):
        shutil.copy(work / folder / name, work / folder / copy)
    folder_paths.set_output_directory(str(work / "output"))
    comfy_nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    counts = {"transformer": 0, "text_encoders": 0, "vae": 0, "prompt_encoded": 0}
    built: dict[str, list[weakref.ref]] = {"transformer": [], "text_encoders": [], "vae": []}

    def counted(name: str, function):
        def call(*args, **kwargs):
            counts[name] += 1
            out = function(*args, **kwargs)
            if name in built:
                built[name].append(weakref.ref(out))
            return out
        return call

    comfyui_models.transformer_model = counted("transformer", comfyui_models.transformer_model)
    comfyui_models.flux_clip = counted("text_encoders", comfyui_models.flux_clip)
    comfyui_models.flux_vae = counted("vae", comfyui_models.flux_vae)
    comfyui_models.encode_prompt = counted("prompt_encoded", comfyui_models.encode_prompt)
    prompt = json.loads(WORKFLOW.read_text())
    prompt["3"]["inputs"].update(image_size="custom", width=64, height=64, num_inference_steps=1)
    executor = execution.PromptExecutor(_Server())
    steps = []
    changes = (("first run", "1", {}), ("model_name", "1", {"model_name": "krea2.safetensors"}),
               ("weight_dtype", "1", {"weight_dtype": "bf16"}),
               ("clip_name", "1", {"clip_name": "clip_l_copy.safetensors"}),
               ("vae_name", "1", {"vae_name": "ae_copy.safetensors"}), ("prompt", "2", {"prompt": "a grey wolf"}),
               ("nothing", "1", {}))
    for change, node_id, inputs in changes:
        prompt[node_id]["inputs"].update(inputs)
        executor.execute(prompt, f"run {len(steps)}", {}, ["6"])
        steps.append({"change": change, "success": executor.success, **counts})
    gc.collect()
    alive = {name: [type(ref()).__name__ for ref in refs if ref() is not None] for name, refs in built.items()}
    executor.reset()  # what POST /free {"free_memory": true} does between prompts
    mm.unload_all_models()
    gc.collect()
    return {"steps": steps, "alive_before_free": alive,
            "alive_after_free": [name for name, refs in built.items() for ref in refs if ref() is not None]}


if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    print(json.dumps(globals()[name](workdir)))
