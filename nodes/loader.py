"""KreaModelLoader: picks the transformer, text encoder and VAE files; the models load on first use."""
from __future__ import annotations

from ..model_loader import WEIGHT_DTYPES, ModelFileError
from . import model_files
from .handles import TextEncoderHandle, VaeHandle
from .host import host, with_folders


def _choices(folder: str) -> list[str]:
    # An empty list would make every saved workflow fail validation with a confusing message; a named
    # placeholder instead fails at run time with the folder to put the file in.
    return host.list_models(folder) or [f"(no files in models/{folder})"]


class KreaModelLoader:
    DESCRIPTION = ("Loads FLUX.1 Krea [dev]: the transformer (diffusion_models) as a standard MODEL that "
                   "ComfyUI's LoRA loaders and memory management work with, CLIP-L and T5-XXL (text_encoders) and "
                   "the autoencoder (vae), which load when first used.")
    CATEGORY = "Krea/loaders"
    RETURN_TYPES = ("MODEL", "KREA_TEXT_ENCODER", "KREA_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (_choices("diffusion_models"), {
                "tooltip": "flux1-krea-dev.safetensors (BFL), a ComfyUI repack (e.g. flux1-krea-dev_fp8_scaled), "
                           "a diffusers transformer file, or a GGUF file (e.g. flux1-krea-dev-Q8_0.gguf; its "
                           "weights stay quantized with weight_dtype default)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "How the transformer weights are held: as stored, bf16, fp16, or fp8 (half the "
                           "memory; computed in bf16, or with fp8 matrix units with _fast on GPUs that have them)."}),
            "clip_name": (_choices("text_encoders"), {"tooltip": "CLIP-L text encoder, e.g. clip_l.safetensors"}),
            "t5_name": (_choices("text_encoders"), {
                "tooltip": "T5-XXL encoder, e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors"}),
            "vae_name": (_choices("vae"), {"tooltip": "The FLUX autoencoder, ae.safetensors"}),
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
             vae_name: str) -> tuple[object, TextEncoderHandle, VaeHandle]:
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}.")
        device = host.torch_device()
        transformer_path = host.model_path("diffusion_models", model_name)
        text_encoder = TextEncoderHandle(host.model_path("text_encoders", clip_name),
                                         host.model_path("text_encoders", t5_name), host.tokenizer_dir(),
                                         host.model_devices("text_encoder")[0])
        vae = VaeHandle(host.model_path("vae", vae_name), *host.model_devices("vae"))
        try:  # every file was found before the transformer is read
            transformer = host.transformer_model(transformer_path, weight_dtype, device)
        except ModelFileError as err:
            raise with_folders(err) from None
        return transformer, text_encoder, vae


NODE_CLASS_MAPPINGS = {"KreaModelLoader": KreaModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"KreaModelLoader": "Krea Model Loader"}
