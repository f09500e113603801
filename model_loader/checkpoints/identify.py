"""Tensor names -> what kind of model a file holds (FLUX transformer, VAE, CLIP-L, T5, LoRA, ...).

The one file identifier of the pack. Loaders detect their own layouts positively (a FLUX loader reads a
bundle's transformer, a VAE loader a checkpoint's VAE); when a file is not theirs, they ask `identify` what
it is instead, so every loader names a wrong file the same way. The kind says nothing about folders: the
ComfyUI side maps a kind to the folder it belongs in.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable

# kohya, peft, ComfyUI; XLabs (`processor.qkv_lora1.down`); LyCORIS LoHa (`hada_w1_a`) and LoKr (`lokr_w1`).
_LORA_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_unet_", "lora_te",
               ".processor.qkv_lora", ".processor.proj_lora", ".hada_w1_", ".lokr_w1", ".lokr_w2")


class FileKind(enum.Enum):
    """(short name, what it is: the phrase after "is" / "looks like" in a message)."""
    FLUX_TRANSFORMER = ("FLUX transformer", "a FLUX transformer (a diffusion model)")
    CHROMA = ("Chroma model", "a Chroma model (FLUX-derived, with a different modulation layout)")
    SD_UNET = ("Stable Diffusion UNet", "a Stable Diffusion / SDXL UNet")
    SD3_MMDIT = ("Stable Diffusion 3 model", "a Stable Diffusion 3 MMDiT transformer")
    OTHER_TRANSFORMER = ("diffusion model", "a diffusers transformer of another model (a diffusion model)")
    BUNDLE = ("full checkpoint", "a full checkpoint bundling a diffusion model with its VAE and/or text encoders")
    LORA = ("LoRA", "a LoRA (an add-on to a base model, not a model by itself)")
    VAE = ("VAE", "a VAE (autoencoder)")
    PREVIEW_VAE = ("preview autoencoder", "a tiny preview autoencoder (TAESD/TAEF1), not the full VAE")
    CLIP_TEXT = ("CLIP text encoder", "a CLIP text encoder")
    T5_TEXT = ("T5 text encoder", "a T5 text encoder")
    CLIP_VISION = ("CLIP vision model", "a CLIP vision model (an image encoder)")
    SD_SAFETY_CHECKER = ("Stable Diffusion safety checker",
                         "the CLIP-based Stable Diffusion safety checker (CompVis/stable-diffusion-safety-checker)")
    VIT_CLASSIFIER = ("NSFW classifier", "a ViT image classifier")
    VIT_BACKBONE = ("ViT backbone", "a ViT backbone without a classification head (ViTModel)")
    UNKNOWN = ("model", "no model this pack knows")

    @property
    def short(self) -> str:
        return self.value[0]

    @property
    def description(self) -> str:
        return self.value[1]


def is_lora(keys: Iterable[str]) -> bool:
    """LoRA keys can name FLUX blocks too (`...double_blocks.0...lora_A`), so this is asked first."""
    keys = list(keys)
    return any(m in k for k in keys for m in _LORA_MARKS) or any(k.endswith(".alpha") for k in keys)


def identify(keys: Iterable[str]) -> FileKind:
    """The kind of model whose tensors carry these names."""
    keys = list(keys)

    def has(*fragments: str) -> bool:
        return any(f in k for k in keys for f in fragments)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if is_lora(keys):
        return FileKind.LORA
    if has("distilled_guidance_layer."):
        return FileKind.CHROMA
    flux = has("double_blocks.", "single_blocks.", "single_transformer_blocks.")
    unet = has("input_blocks.", "output_blocks.") or (starts("down_blocks.", "mid_block.") and has("time_embedding."))
    mmdit = has("joint_blocks.")
    vae = has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "encoder.conv_in",
              "decoder.conv_in", "post_quant_conv") or starts("first_stage_model.", "vae.")
    text = starts("cond_stage_model.", "conditioner.", "text_encoders.") or has(".text_model.")
    if (flux or unet or mmdit) + vae + text >= 2:
        return FileKind.BUNDLE
    if flux:
        return FileKind.FLUX_TRANSFORMER
    if unet:
        return FileKind.SD_UNET
    if mmdit:
        return FileKind.SD3_MMDIT
    if has("concept_embeds", "special_care_embeds"):
        return FileKind.SD_SAFETY_CHECKER
    if has("vision_model.", "image_encoder.") or starts("visual."):
        return FileKind.CLIP_VISION
    if has("vit.embeddings", "embeddings.cls_token"):
        return FileKind.VIT_CLASSIFIER if has("classifier.weight") else FileKind.VIT_BACKBONE
    # enc.blk.N.attn_q ...: llama.cpp's names, as encoder-only t5xxl GGUF files carry them
    if has("encoder.block.", "SelfAttention.", "enc.blk.") or any(k == "shared.weight" or k.endswith(".shared.weight")
                                                                  for k in keys):
        return FileKind.T5_TEXT
    if has("text_model.", "token_embedding.", "text_projection"):
        return FileKind.CLIP_TEXT
    if vae:
        return FileKind.VAE
    if has("decoder.layers.", "encoder.layers."):
        return FileKind.PREVIEW_VAE
    if has("transformer_blocks."):
        return FileKind.OTHER_TRANSFORMER
    return FileKind.UNKNOWN


def first_keys(keys: Iterable[str], count: int = 3) -> str:
    """A few tensor names, for messages about files of no known kind."""
    shown = sorted(keys)[:count]
    return ", ".join(shown) if shown else "no tensors"
