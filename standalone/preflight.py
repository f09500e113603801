"""A workflow and the machine -> whether its runs fit in memory, estimated before any weights are read; and whether
each LoRA it applies fits the transformer it changes (`lora_problems`, from the two files' headers).

The estimate is deliberately simple and errs on the generous side of what a run holds at its peak outside
ComfyUI (where every model stays loaded once used):

- weights: the bytes of every model file the workflow names (read off the safetensors or GGUF headers), the
  transformer at 1 byte per weight for the fp8 weight_dtypes and 2 for bf16/fp16; a GGUF transformer kept
  quantized adds its largest layer dequantized (float32 and a compute-dtype copy, 6 bytes a weight);
- the transformer's activations: per token (image tokens (H/16)(W/16) plus 512 text tokens, per image) about
  14 hidden-size vectors (the single block's fused projections: q, k, v, the 4x MLP, its output, the residual)
  in 4 bytes, plus the step cache's two residuals per image token with acceleration on (step_cache.cache_bytes);
- run sequence-parallel over N processes (`ranks`), each holds all the weights and the activations of 1/N of the
  text and image tokens, plus the all-to-all's copies of q, k, v and the attention output
  (SEQUENCE_PARALLEL_VECTORS per local token);
- pictures: the decoded images and an image-to-image input in float32, a few copies each (the autoencoder
  tiles its own work to what fits, so its activations are not counted).

It is compared with what the machine has free: on a GPU, torch.cuda.mem_get_info; on the CPU, MemAvailable of
/proc/meminfo (else the free physical pages). A run that does not fit is refused with the numbers;
`--no-memory-check` runs it anyway. `serve` makes the same check before it queues a request, against what was free
when it started (its models then stay loaded, so what is free later would count them twice), with the input
image's size given by the request's decoded image.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from ..fal_api.lora_nodes import LORA_LOADER
from ..model_loader import ModelFileError, memory, open_checkpoint
from ..model_loader.checkpoints import GGUFFile
from ..model_loader.flux import FluxConfig, config_from_checkpoint
from ..model_loader.lora import LoraPlan, linear_shapes, plan_lora, read_lora
from ..nodes.host import host
from ..sampling.parameters import IMAGE_SIZES, nearest_multiple
from ..sampling.step_cache import cache_bytes
from .runner import is_link

TEXT_TOKENS = 512
ACTIVATION_VECTORS = 14  # hidden-size vectors per token held at a single block's peak
SEQUENCE_PARALLEL_VECTORS = 12  # per local token: send and receive buffers of q, k, v, reordered copies, output
PICTURE_COPIES = 4  # float32 copies of a decoded or input picture alive at once (pixels, clamp, permute, save)
GIB = 1024**3
CLI_ADVICE = ("Make fewer or smaller images, use weight_dtype fp8_e4m3fn (--set), or pass --no-memory-check to try "
              "anyway.")

# LoadImage's `image` value -> the (width, height) Krea Encode Image makes of it; None when unknown here.
ImageSizeOf = Callable[[object], "tuple[int, int] | None"]

MODEL_INPUTS = (("model_name", "diffusion_models"), ("clip_name", "text_encoders"), ("t5_name", "text_encoders"),
                ("vae_name", "vae"))


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    activations: int
    pictures: int
    summary: str  # the sizes it was made for, e.g. "2 images of 1024x768"
    loras: int = 0  # merged copies of the layers LoRAs change (on the CPU they sit beside the originals)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.pictures + self.loras


def available_memory(device: torch.device) -> tuple[int, str]:
    """(free bytes, where) on the device the models run on."""
    where = f"the GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "this machine's RAM"
    return memory.available_memory(device), where


def _file_bytes(folder: str, name: object, weight_dtype: str | None = None) -> tuple[int, int]:
    """(bytes as stored, hidden size when it is a FLUX transformer else 0); (0, 0) when unknown here (the
    node's own validation reports a bad name or file)."""
    if not isinstance(name, str):
        return 0, 0
    try:
        checkpoint = open_checkpoint(host.model_path(folder, name))
    except (ModelFileError, OSError):
        return 0, 0
    size = checkpoint.nbytes()
    hidden = checkpoint.shape("img_in.weight")[0] if "img_in.weight" in checkpoint else 0
    counts = [math.prod(checkpoint.shape(k)) for k in checkpoint.keys()]
    if weight_dtype and weight_dtype.startswith("fp8"):
        size = min(size, sum(counts))
    elif weight_dtype in ("bf16", "fp16"):
        size = 2 * sum(counts)
    elif isinstance(checkpoint, GGUFFile) and any(checkpoint.quant_type(k) for k in checkpoint.keys()):
        size += 6 * max(counts)  # one layer dequantized at a time: float32, then the compute dtype
    return size, hidden


def _image_size(path: object) -> tuple[int, int] | None:
    if not isinstance(path, str):
        return None
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError):
        return None
    return nearest_multiple(width), nearest_multiple(height)  # as Krea Encode Image resizes it


def estimate(prompt: Mapping[str, dict], ranks: int = 1,
             image_size: ImageSizeOf = _image_size) -> MemoryEstimate | None:
    """The peak memory of the workflow's run, per process when `ranks` processes share each image (None when it
    has no sampler whose size is known here)."""
    weights, hidden = 0, 0
    for node in prompt.values():
        inputs = node.get("inputs", {})
        if node.get("class_type") == "KreaModelLoader":
            for input_name, folder in MODEL_INPUTS:
                dtype = inputs.get("weight_dtype") if input_name == "model_name" else None
                size, found_hidden = _file_bytes(folder, inputs.get(input_name), dtype)
                weights += size
                hidden = max(hidden, found_hidden)
        elif node.get("class_type") == "KreaSafetyCheck" and inputs.get("enable_safety_checker") is not False:
            weights += _file_bytes("safety_checker", inputs.get("checker_name"))[0]
    activations = pictures = 0
    summaries = []
    for node in prompt.values():
        if node.get("class_type") != "KreaSampler":
            continue
        inputs = node["inputs"]
        batch = inputs.get("num_images", 1)
        size = _sampler_size(prompt, inputs, image_size)
        if size is None or not isinstance(batch, int):
            continue
        width, height = size
        image_tokens = -(-(width // 16) * (height // 16) // ranks)  # this process's share, rounded up
        tokens = batch * (image_tokens + -(-TEXT_TOKENS // ranks))
        cached = cache_bytes(batch, image_tokens, hidden or 3072) if inputs.get("acceleration", "none") != "none" \
            else 0
        vectors = ACTIVATION_VECTORS + (SEQUENCE_PARALLEL_VECTORS if ranks > 1 else 0)
        activations = max(activations, tokens * (hidden or 3072) * vectors * 4 + cached)
        pictures = max(pictures, PICTURE_COPIES * batch * width * height * 4 * 4)
        summaries.append(f"{batch} image{'s' if batch > 1 else ''} of {width}x{height}")
    if not summaries:
        return None
    return MemoryEstimate(weights, activations, pictures, ", ".join(summaries))


def _sampler_size(prompt: Mapping[str, dict], inputs: dict, image_size: ImageSizeOf) -> tuple[int, int] | None:
    """(width, height) the sampler makes: the preset, the custom size, or the input image's (image-to-image)."""
    latent = inputs.get("latent")
    if is_link(latent):
        encode = prompt.get(latent[0], {})
        image = encode.get("inputs", {}).get("image")
        loader = prompt.get(image[0], {}) if is_link(image) else {}
        if loader.get("class_type") != "LoadImage":
            return None
        return image_size(loader.get("inputs", {}).get("image"))
    image_size = inputs.get("image_size")
    if image_size in IMAGE_SIZES:
        return IMAGE_SIZES[image_size]
    width, height = inputs.get("width"), inputs.get("height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    return None


def memory_problem(prompt: Mapping[str, dict], device: torch.device, image_size: ImageSizeOf = _image_size,
                   available: tuple[int, str] | None = None, advice: str = CLI_ADVICE) -> str | None:
    """Why the run would not fit in memory, with the numbers (None: it fits, or its size is not known);
    `available`: (bytes, where) to compare with instead of what the device has free now."""
    need = estimate(prompt, image_size=image_size)
    if need is None:
        return None
    if device.type == "cpu":  # on a GPU the merge is written in place and the originals wait in RAM
        need = dataclasses.replace(need, loras=lora_bytes(prompt))
    free, where = available if available is not None else available_memory(device)
    if need.total <= free:
        return None
    loras = f", LoRA-merged layers {need.loras / GIB:.1f} GiB" if need.loras else ""
    return (f"this run needs about {need.total / GIB:.1f} GiB ({need.summary}: model weights "
            f"{need.weights / GIB:.1f} GiB, transformer activations {need.activations / GIB:.1f} GiB, images "
            f"{need.pictures / GIB:.1f} GiB{loras}) but {where} has {free / GIB:.1f} GiB free. {advice}")


def _base_loader(prompt: Mapping[str, dict], link: object) -> str | None:
    """The id of the Krea Model Loader a MODEL link comes from, through any LoRA nodes (None: another source)."""
    for _ in range(len(prompt)):
        if not is_link(link):
            return None
        node = prompt.get(link[0], {})
        if node.get("class_type") == "KreaModelLoader":
            return link[0]
        if node.get("class_type") != LORA_LOADER:
            return None
        link = node.get("inputs", {}).get("model")
    return None


def _lora_plans(prompt: Mapping[str, dict]) -> tuple[list[str], dict[str, tuple[FluxConfig, list[LoraPlan]]]]:
    """(problems, {loader id: (base config, the plans of its LoRAs)}) of every LoRA node whose file and base are
    known here, each planned against its base from the two headers."""
    problems: list[str] = []
    bases: dict[str, tuple[FluxConfig, list[LoraPlan]]] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        loader = _base_loader(prompt, inputs.get("model")) if node.get("class_type") == LORA_LOADER else None
        name = inputs.get("lora_name")
        base = prompt[loader].get("inputs", {}).get("model_name") if loader is not None else None
        if not isinstance(name, str) or not isinstance(base, str):
            continue
        try:
            if loader not in bases:
                bases[loader] = (config_from_checkpoint(host.model_path("diffusion_models", base)), [])
            plan = plan_lora(read_lora(host.model_path("loras", name)), bases[loader][0])
        except ModelFileError as err:
            problems.append(f"node {node_id} ({LORA_LOADER}): lora_name: {err}")
            continue
        bases[loader][1].append(plan)
    return problems, bases


def lora_problems(prompt: Mapping[str, dict]) -> list[str]:
    """Each LoRA node's file against the transformer it changes (layers, widths, depth), from the two headers; the
    node's own validation has checked the name, the file and its format already."""
    return _lora_plans(prompt)[0]


def lora_bytes(prompt: Mapping[str, dict]) -> int:
    """Bytes of the layers the workflow's LoRAs change, as each transformer stores its weights (the merged copies);
    on a GGUF file kept quantized (CPU: float32), a LoRA's factors beside each quantized layer and a dense copy of
    each layer a LoHa, LoKr or full difference changes."""
    total = 0
    for loader, (config, plans) in _lora_plans(prompt)[1].items():
        inputs = prompt[loader]["inputs"]
        weight_dtype = inputs.get("weight_dtype")
        shapes = linear_shapes(config)
        layers = {layer for plan in plans for layer in plan.layers}
        per_weight = 1 if str(weight_dtype).startswith("fp8") else 2 if weight_dtype in ("bf16", "fp16") else 0
        if not per_weight:  # as stored: the file's bytes per weight of its block layers
            checkpoint = open_checkpoint(host.model_path("diffusion_models", inputs["model_name"]))
            probe = next((k for k in checkpoint.keys() if k.endswith("img_attn.qkv.weight")), None)
            if isinstance(checkpoint, GGUFFile) and probe is not None and checkpoint.quant_type(probe) is not None:
                total += _gguf_lora_bytes(plans, shapes)
                continue
            per_weight = checkpoint.dtype(probe).itemsize if probe is not None else 2
        total += sum(shapes[layer][0] * shapes[layer][1] * per_weight for layer in layers)
    return total


def _gguf_lora_bytes(plans: list[LoraPlan], shapes: Mapping[str, tuple[int, int]]) -> int:
    """float32 bytes of what LoRAs add to a quantized model (the CPU's compute dtype): per layer the stacked factors
    (rank x (in + out)) of its plain LoRAs, or its dense copy where another kind changes it."""
    dense = {item.target.layer for plan in plans for item in plan.adapters if item.adapter.kind != "lora"}
    total = sum(shapes[layer][0] * shapes[layer][1] * 4 for layer in dense)
    for plan in plans:
        for item in plan.adapters:
            layer = item.target.layer
            if layer not in dense and item.adapter.kind == "lora":
                rank = plan.lora.file.shape(item.adapter.keys["down"])[0]
                total += rank * (shapes[layer][0] + shapes[layer][1]) * 4
    return total
