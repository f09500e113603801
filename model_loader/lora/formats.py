"""LoRA file key names -> the FLUX transformer layer each one changes: the naming schemes of the trainers users
have, and the tensor names of each adapter kind. Tables only; reading.py applies them to a file's header.

A LoRA key is `<module name><adapter suffix>`, e.g. `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`.
Module names, for every Linear of the pack's transformer (BFL name `L`, e.g. `double_blocks.0.img_attn.qkv`):

  kohya sd-scripts   lora_unet_<L with dots as underscores>      (also LyCORIS LoKr/LoHa trained with it)
  ComfyUI            diffusion_model.<L>  (and bare <L>, as BFL-named peft files have it)
  diffusers / peft   transformer.<D>  (and bare <D>)             D: diffusers module, transformer_blocks.0.attn.to_q
  OneTrainer         lora_transformer_<D with underscores>
  SimpleTuner LyCORIS  lycoris_<D with underscores>
  XLabs              double_blocks.N.processor.{qkv,proj}_lora{1,2}, single_blocks.N.processor.{qkv,proj}_lora
  ComfyUI's split    diffusion_model.single_blocks.N.linear1_qkv  (the attention rows of linear1)

diffusers splits what BFL fuses (q, k, v of the double blocks' attention; q, k, v and the MLP input of the single
blocks' linear1), so a diffusers module names a row slice of a BFL layer; its norm_out stores (scale, shift) where
BFL's final modulation has (shift, scale), so its rows are swapped into place. The BFL <-> diffusers names are
the loader's own table (flux/layouts.py `diffusers_renames`), not restated here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flux.layouts import diffusers_renames
from ..flux.model import FluxConfig, FluxTransformer


@dataclass(frozen=True)
class Target:
    """What one LoRA module changes: rows [row_start, row_start + rows) of a Linear's (out, in) weight."""
    layer: str  # BFL module name of the Linear, e.g. "double_blocks.0.img_attn.qkv"
    row_start: int
    rows: int
    in_features: int
    swap_halves: bool = False  # diffusers' norm_out: its (scale, shift) rows go to BFL's (shift, scale)


# Adapter kinds and their tensors: role -> suffix after the module name. The first suffix set that matches a
# module decides its kind; "alpha" and the optional roles may be absent.
LORA_PAIRS: tuple[tuple[str, str], ...] = (  # (up, down): weight += up @ down
    (".lora_up.weight", ".lora_down.weight"),            # kohya, ComfyUI, OneTrainer
    (".lora_B.weight", ".lora_A.weight"),                # diffusers / peft
    (".lora_B.default.weight", ".lora_A.default.weight"),  # peft with its adapter name left in
    (".lora.up.weight", ".lora.down.weight"),            # older diffusers attention processors
    (".up.weight", ".down.weight"),                      # XLabs
)
LOHA_ROLES = {"w1_a": ".hada_w1_a", "w1_b": ".hada_w1_b", "w2_a": ".hada_w2_a", "w2_b": ".hada_w2_b"}
LOKR_ROLES = {"w1": ".lokr_w1", "w1_a": ".lokr_w1_a", "w1_b": ".lokr_w1_b",
              "w2": ".lokr_w2", "w2_a": ".lokr_w2_a", "w2_b": ".lokr_w2_b"}
DIFF_ROLES = {"diff": ".diff", "diff_b": ".diff_b"}  # a full weight (and bias) difference
ALPHA = ".alpha"

# Tensors that name a format this engine refuses rather than half-apply: suffix -> what it is.
REFUSED_SUFFIXES = {
    ".dora_scale": "DoRA (weight-decomposed LoRA, `dora_scale` tensors)",
    ".lora_mid.weight": "LoCon with a middle convolution (`lora_mid`), which only convolutional models have",
    ".hada_t1": "LoHa with Tucker decomposition (`hada_t1`), which only convolutional models have",
    ".lokr_t2": "LoKr with Tucker decomposition (`lokr_t2`), which only convolutional models have",
    ".oft_blocks": "OFT (orthogonal fine-tuning, `oft_blocks`)",
    ".oft_diag": "BOFT/OFT (`oft_diag`)",
    ".w_norm": "a norm-layer patch (`w_norm`)",
    ".set_weight": "a weight replacement (`set_weight`)",
    ".reshape_weight": "a layer-reshaping patch (`reshape_weight`), as FLUX.1 Canny/Depth control LoRAs have",
}

ALL_SUFFIXES: tuple[str, ...] = tuple(sorted(
    {s for pair in LORA_PAIRS for s in pair} | set(LOHA_ROLES.values()) | set(LOKR_ROLES.values())
    | set(DIFF_ROLES.values()) | {ALPHA} | set(REFUSED_SUFFIXES), key=len, reverse=True))

# Keys of the text encoders (CLIP-L, T5) that LoRA files for FLUX may carry too. Outside ComfyUI the LoRA
# changes the transformer only, as ComfyUI's LoraLoaderModelOnly does; these are skipped and logged.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                         "text_encoders.", "te1.", "te2.")

# Module names that say which other model a LoRA was made for (checked when nothing maps to FLUX).
OTHER_MODELS = (
    (("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block", "lora_unet_input_blocks_",
      "lora_unet_output_blocks_", "unet.", "down_blocks.", "input_blocks."),
     "a Stable Diffusion 1.x/2.x or SDXL LoRA (UNet layers)"),
    (("joint_blocks", "lora_unet_joint_blocks"), "a Stable Diffusion 3 LoRA (MMDiT layers)"),
    (("lora_unet_blocks_", "blocks.0.cross_attn", "diffusion_model.blocks."), "a LoRA of a video model (Wan, Hunyuan)"),
    (("lora_unet_layers_", "diffusion_model.layers.", "transformer.layers."), "a LoRA of another transformer "
                                                                              "(Lumina, HiDream or similar)"),
)


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def linear_shapes(config: FluxConfig) -> dict[str, tuple[int, int]]:
    """BFL module name -> (out, in) of every Linear of a FLUX transformer of `config` (built on the meta device)."""
    with torch.device("meta"):
        model = FluxTransformer(config)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _diffusers_parts(config: FluxConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, Target]:
    """diffusers module name -> the rows of the BFL layer it is part of."""
    parts: dict[str, Target] = {}
    renames = diffusers_renames(config.depth, config.depth_single_blocks, config.guidance_embed, config.qkv_bias)
    for rename in renames:
        if not rename.bfl.endswith(".weight") or rename.bfl[: -len(".weight")] not in shapes:
            continue  # norm scales: not Linear layers
        layer = rename.bfl[: -len(".weight")]
        out, in_features = shapes[layer]
        names = [p[: -len(".weight")] for p in rename.diffusers]
        # q, k, v are hidden-size each; what is left is the MLP input of a single block's linear1.
        sizes = [config.hidden_size] * (len(names) - 1) + [out - config.hidden_size * (len(names) - 1)]
        start = 0
        for name, rows in zip(names, sizes):
            parts[name] = Target(layer, start, rows, in_features, swap_halves=rename.swap_halves)
            start += rows
    return parts


def module_targets(config: FluxConfig) -> dict[str, Target]:
    """Every module name any supported trainer writes for a FLUX transformer of `config` -> what it changes."""
    shapes = linear_shapes(config)
    targets: dict[str, Target] = {}
    for layer, (out, in_features) in shapes.items():
        whole = Target(layer, 0, out, in_features)
        for name in (layer, f"diffusion_model.{layer}", f"lora_unet_{_underscored(layer)}"):
            targets[name] = whole
    for name, target in _diffusers_parts(config, shapes).items():
        for alias in (name, f"transformer.{name}", f"lora_transformer_{_underscored(name)}",
                      f"lycoris_{_underscored(name)}"):
            targets[alias] = target
    h = config.hidden_size
    xlabs_names: dict[str, Target] = {}
    for i in range(config.depth):
        for xlabs, bfl in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                           ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
            layer = f"double_blocks.{i}.{bfl}"
            xlabs_names[f"double_blocks.{i}.processor.{xlabs}"] = Target(layer, 0, *shapes[layer])
    for i in range(config.depth_single_blocks):
        linear1 = f"single_blocks.{i}.linear1"
        qkv = Target(linear1, 0, 3 * h, shapes[linear1][1])
        xlabs_names[f"single_blocks.{i}.processor.qkv_lora"] = qkv
        targets[f"diffusion_model.single_blocks.{i}.linear1_qkv"] = qkv
        linear2 = f"single_blocks.{i}.linear2"
        xlabs_names[f"single_blocks.{i}.processor.proj_lora"] = Target(linear2, 0, *shapes[linear2])
    for name, target in xlabs_names.items():  # XLabs files come with and without ComfyUI's prefix
        targets[name] = targets[f"diffusion_model.{name}"] = target
    return targets
