"""KreaTextEncode: a prompt -> FLUX conditioning (T5-XXL sequence + CLIP-L pooled vector)."""
from __future__ import annotations

from . import host
from .handles import TextEncoderHandle


class KreaTextEncode:
    DESCRIPTION = ("Encodes a prompt for FLUX.1 Krea [dev]: T5-XXL reads up to 512 tokens (the sequence the "
                   "image follows), CLIP-L up to 77 (a pooled summary). Longer prompts are cut, with a warning "
                   "in the log.")
    CATEGORY = "Krea/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("T5 embeddings (1, 512, 4096) with the CLIP pooled vector as pooled_output; works with "
                       "ComfyUI's own FLUX conditioning nodes too.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": ("KREA_TEXT_ENCODER", {"tooltip": "The text_encoder output of Krea Model Loader."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True,
                                  "tooltip": "What the image should show. An empty prompt is allowed."}),
        }}

    def encode(self, text_encoder: TextEncoderHandle, prompt: str) -> tuple[list]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}.")
        encoders = text_encoder.load()
        text_encoder.ready()
        sequence, pooled = encoders.encode([prompt])
        device = host.intermediate_device()
        return ([[sequence.to(device), {"pooled_output": pooled.to(device)}]],)


NODE_CLASS_MAPPINGS: dict[str, type] = {"KreaTextEncode": KreaTextEncode}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {"KreaTextEncode": "Krea Text Encode"}
