"""KreaTextEncode: a prompt -> FLUX conditioning (T5-XXL sequence + CLIP-L pooled vector).

The prompt is tokenized as diffusers' FluxPipeline does (fal's exact ids: T5 512 tokens, CLIP 77, the text taken
literally) whichever CLIP computes it: Krea Model Loader's, or inside ComfyUI any FLUX CLIP (DualCLIPLoader).
"""
from __future__ import annotations

import weakref
from typing import Any

from ..sampling.parameters import MAX_PROMPT_CHARS
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

    def __init__(self) -> None:
        # The last (text encoder, prompt, conditioning). ComfyUI keeps one instance per graph node and re-runs it
        # whenever anything upstream changed, even when only the loader's transformer did: the loader then hands
        # out the same text encoder, and the prompt is not encoded again. Held weakly: no model is kept alive.
        self.last: tuple[weakref.ref, str, list] | None = None

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": ("CLIP", {"tooltip": "The text_encoder output of Krea Model Loader, or inside ComfyUI "
                                                 "a FLUX CLIP from DualCLIPLoader (type flux)."}),
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

    def encode(self, text_encoder: Any, prompt: str) -> tuple[list]:
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(problem)
        if self.last is not None and self.last[0]() is text_encoder and self.last[1] == prompt:
            return (self.last[2],)
        conditioning = host.encode_prompt(text_encoder, prompt)
        self.last = (weakref.ref(text_encoder), prompt, conditioning)
        return (conditioning,)


NODE_CLASS_MAPPINGS: dict[str, type] = {"KreaTextEncode": KreaTextEncode}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {"KreaTextEncode": "Krea Text Encode"}
