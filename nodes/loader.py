"""KreaModelLoader: picks the transformer, text encoder and VAE files -> MODEL, CLIP and VAE.

Inside ComfyUI they are ComfyUI's standard types (a ModelPatcher over the pack's transformer, ComfyUI's own CLIP
and VAE), each kept by its own file and dtype on the node instance, so that changing one input reloads one model;
outside ComfyUI, handles that load the pack's own modules on first use.
"""
from __future__ import annotations

from typing import Any

from ..model_loader import WEIGHT_DTYPES, FileKind, ModelFileError
from . import model_files
from .host import ModelSlot, host, with_folders


def _choices(folder: str, kinds: frozenset[FileKind], tooltip: str) -> tuple[list[str], dict]:
    """A combo of the folder's files whose default is the first file of the right kind (ComfyUI would default to
    the first file: clip_l.safetensors for the T5 too)."""
    names = host.list_models(folder)
    options: dict = {"tooltip": tooltip}
    default = model_files.first_of_kind(folder, names, kinds)
    if default is not None:
        options["default"] = default
    # An empty list would make every saved workflow fail validation with a confusing message; a named
    # placeholder instead fails at run time with the folder to put the file in.
    return names or [f"(no files in models/{folder})"], options


class KreaModelLoader:
    DESCRIPTION = ("Loads FLUX.1 Krea [dev] as ComfyUI's standard types: the transformer (diffusion_models) as a "
                   "MODEL that ComfyUI's LoRA loaders, samplers and memory management work with, CLIP-L and T5-XXL "
                   "(text_encoders) as a CLIP (its T5 reads 512 tokens, as fal and diffusers do) and the autoencoder "
                   "(vae) as a VAE, which ComfyUI's own text, VAE and inpainting nodes take too. Changing one file "
                   "reloads that model only.")
    CATEGORY = "Krea/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = (
        "The transformer as a standard FLUX.1 MODEL: Krea Sampler, ComfyUI's LoRA loaders and samplers take it.",
        "CLIP-L and T5-XXL as a FLUX CLIP (T5 reads 512 tokens): Krea Text Encode's text_encoder input; inside "
        "ComfyUI its own text nodes (CLIPTextEncodeFlux) take it too.",
        "The FLUX autoencoder as a VAE: Krea Decode's and Krea Encode Image's vae input; inside ComfyUI its own VAE "
        "nodes (VAEDecode, VAEEncode, the tiled ones, inpainting) take it too.",
    )
    FUNCTION = "load"

    def __init__(self) -> None:
        # ComfyUI makes one instance per graph node and keeps it while the node exists (until /free with
        # free_memory): each model is kept in its own slot by its file and dtype, so a new transformer does not
        # read the text encoders or the VAE again, and a new T5 does not reload the transformer.
        self.slots = {"transformer": ModelSlot(), "text_encoder": ModelSlot(), "vae": ModelSlot()}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": _choices("diffusion_models", model_files.TRANSFORMER,
                                   "flux1-krea-dev.safetensors (BFL), a ComfyUI repack (e.g. "
                                   "flux1-krea-dev_fp8_scaled), a diffusers transformer file, or a GGUF file (e.g. "
                                   "flux1-krea-dev-Q8_0.gguf; its weights stay quantized with weight_dtype "
                                   "default)."),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "How the transformer weights are held: as stored, bf16, fp16, or fp8 (half the "
                           "memory; computed in bf16, or with fp8 matrix units with _fast on GPUs that have them)."}),
            "clip_name": _choices("text_encoders", model_files.CLIP, "CLIP-L text encoder, e.g. clip_l.safetensors"),
            "t5_name": _choices("text_encoders", model_files.T5, "T5-XXL encoder, e.g. t5xxl_fp16.safetensors or "
                                                                 "t5xxl_fp8_e4m3fn_scaled.safetensors"),
            "vae_name": _choices("vae", model_files.VAE, "The FLUX autoencoder, ae.safetensors"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str, clip_name: str, t5_name: str, vae_name: str) -> bool | str:
        # Replaces ComfyUI's "value not in list" for these inputs with a message that names the folders
        # searched and what to put there, refuses names that leave the model folders, and reads each file's
        # header to refuse a damaged file or one of another model: all before any weights are read.
        problems = model_files.model_file_problems([
            ("diffusion_models", model_name, model_files.TRANSFORMER, "model_name"),
            ("text_encoders", clip_name, model_files.CLIP, "clip_name"),
            ("text_encoders", t5_name, model_files.T5, "t5_name"),
            ("vae", vae_name, model_files.VAE, "vae_name")])
        return "\n".join(problems) if problems else True  # one problem a line, each naming its input

    def load(self, model_name: str, weight_dtype: str, clip_name: str, t5_name: str,
             vae_name: str) -> tuple[Any, Any, Any]:
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}.")
        paths = {"transformer": host.model_path("diffusion_models", model_name),
                 "clip": host.model_path("text_encoders", clip_name),
                 "t5": host.model_path("text_encoders", t5_name), "vae": host.model_path("vae", vae_name)}
        try:  # every file was found before any is read
            text_encoder = host.text_encoder_model(paths["clip"], paths["t5"], self.slots["text_encoder"])
            vae = host.vae_model(paths["vae"], self.slots["vae"])
            transformer = host.transformer_model(paths["transformer"], weight_dtype, host.torch_device(),
                                                 self.slots["transformer"])
        except ModelFileError as err:
            raise with_folders(err) from None
        return transformer, text_encoder, vae


NODE_CLASS_MAPPINGS = {"KreaModelLoader": KreaModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"KreaModelLoader": "Krea Model Loader"}
