"""KreaTextEncode: a prompt -> FLUX conditioning (T5-XXL sequence + CLIP-L pooled vector)."""
from __future__ import annotations

from ..sampling.parameters import MAX_PROMPT_CHARS
from .handles import TextEncoderHandle
from .host import host


def prompt_problem(prompt: object) -> str | None:
    """Why `prompt` cannot be encoded (None: it can)."""
    if not isinstance(prompt, str):
        return f"prompt must be text, got {type(prompt).__name__}."
    if len(prompt) > MAX_PROMPT_CHARS:
        return (f"prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted (T5 reads the "
                "first 512 tokens, about 2000 characters). Shorten it.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"prompt holds a character that is not valid Unicode text ({prompt[err.start]!r} at position "
                f"{err.start}, a lone surrogate); remove it.")
    return None


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

    @classmethod
    def VALIDATE_INPUTS(cls, prompt: str | None = None) -> bool | str:
        # What the tokenizers cannot take: text that is not valid Unicode, and sizes far beyond what is read.
        # (ComfyUI turns the value into a string before this runs; the server-less runner does not, so the type
        # is checked too.)
        if prompt is None:  # linked: checked when the node runs
            return True
        problem = prompt_problem(prompt)
        return problem if problem is not None else True

    def encode(self, text_encoder: TextEncoderHandle, prompt: str) -> tuple[list]:
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(problem)
        encoders = text_encoder.load()
        text_encoder.ready()
        sequence, pooled = encoders.encode([prompt])
        device = host.intermediate_device()
        return ([[sequence.to(device), {"pooled_output": pooled.to(device)}]],)


NODE_CLASS_MAPPINGS: dict[str, type] = {"KreaTextEncode": KreaTextEncode}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {"KreaTextEncode": "Krea Text Encode"}
