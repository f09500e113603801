"""LoRA files in each format users have, written by the tests themselves for a (reduced) FLUX config: random
factors under the key names each trainer writes. The names are spelled out here, independently of the pack's own
tables (model_loader/lora/formats.py), so that the oracles (diffusers/peft, ComfyUI) judge the pack's mapping.

Every format touches layers in both kinds of block at several indices (block 1 of the double blocks, blocks 0 and
2 of the single ones), the fused projections, the final modulation whose halves diffusers swaps, and the
embedders; with unequal depths (2 double, 3 single blocks) a swapped block mapping cannot pass.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader.flux import FluxConfig

FORMATS = ("kohya", "comfyui", "comfyui_peft", "diffusers", "diffusers_alpha", "onetrainer", "xlabs", "lokr", "loha")


def _bfl_layers(c: FluxConfig) -> dict[str, tuple[int, int]]:
    """BFL Linear layers the BFL-named formats touch: name -> (out, in)."""
    h, m = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    return {
        "double_blocks.1.img_attn.qkv": (3 * h, h), "double_blocks.0.txt_attn.proj": (h, h),
        "double_blocks.1.img_mlp.0": (m, h), "double_blocks.0.txt_mlp.2": (h, m),
        "double_blocks.1.txt_mod.lin": (6 * h, h), "single_blocks.2.linear1": (3 * h + m, h),
        "single_blocks.0.linear2": (h, h + m), "single_blocks.1.modulation.lin": (3 * h, h),
        "final_layer.adaLN_modulation.1": (2 * h, h), "final_layer.linear": (c.out_channels, h),
        "img_in": (h, c.in_channels), "txt_in": (h, c.context_in_dim), "time_in.in_layer": (h, 256),
        "vector_in.out_layer": (h, h), "guidance_in.in_layer": (h, 256),
    }


def _diffusers_modules(c: FluxConfig) -> dict[str, tuple[int, int]]:
    """diffusers module names the diffusers-named formats touch: name -> (out, in)."""
    h, m = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    return {
        "transformer_blocks.1.attn.to_q": (h, h), "transformer_blocks.1.attn.to_k": (h, h),
        "transformer_blocks.1.attn.to_v": (h, h), "transformer_blocks.0.attn.add_k_proj": (h, h),
        "transformer_blocks.0.attn.to_out.0": (h, h), "transformer_blocks.1.attn.to_add_out": (h, h),
        "transformer_blocks.1.ff.net.0.proj": (m, h), "transformer_blocks.0.ff_context.net.2": (h, m),
        "transformer_blocks.0.norm1.linear": (6 * h, h), "transformer_blocks.1.norm1_context.linear": (6 * h, h),
        "single_transformer_blocks.2.attn.to_q": (h, h), "single_transformer_blocks.2.attn.to_v": (h, h),
        "single_transformer_blocks.0.proj_mlp": (m, h), "single_transformer_blocks.2.proj_mlp": (m, h),
        "single_transformer_blocks.1.proj_out": (h, h + m), "single_transformer_blocks.0.norm.linear": (3 * h, h),
        "norm_out.linear": (2 * h, h), "proj_out": (c.out_channels, h), "x_embedder": (h, c.in_channels),
        "context_embedder": (h, c.context_in_dim), "time_text_embed.timestep_embedder.linear_1": (h, 256),
        "time_text_embed.guidance_embedder.linear_2": (h, h), "time_text_embed.text_embedder.linear_1":
            (h, c.vec_in_dim),
    }


def _xlabs_modules(c: FluxConfig) -> dict[str, tuple[int, int]]:
    h, m = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    out = {}
    for i in (0, 1):
        out[f"double_blocks.{i}.processor.qkv_lora1"] = (3 * h, h)
        out[f"double_blocks.{i}.processor.qkv_lora2"] = (3 * h, h)
        out[f"double_blocks.{i}.processor.proj_lora1"] = (h, h)
        out[f"double_blocks.{i}.processor.proj_lora2"] = (h, h)
    out["single_blocks.2.processor.qkv_lora"] = (3 * h, h)
    out["single_blocks.1.processor.proj_lora"] = (h, h + m)
    return out


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def lora_tensors(config: FluxConfig, fmt: str, seed: int = 0, rank: int = 4, alpha: float = 2.0,
                 magnitude: float = 0.5, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file of format `fmt` (one of FORMATS) for `config`; factors are sized so that
    magnitude ~ ||delta|| / ||weight|| of random_flux_tensor weights (unit gain). `keep(module)`: only the
    modules (BFL or diffusers names, as the format uses) it accepts, for oracles that convert only some."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def pair(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        # up @ down has about `magnitude` of a unit-gain weight's entries (1/sqrt(in)) at scale alpha / rank
        s = (magnitude / (inp ** 0.5 * rank ** 0.5)) ** 0.5
        return randn(out, rank, scale=s), randn(rank, inp, scale=s)

    t: dict[str, torch.Tensor] = {}
    alpha_t = torch.tensor(alpha)
    if fmt in ("kohya", "comfyui", "comfyui_peft"):
        for layer, (out, inp) in _bfl_layers(config).items():
            if keep is not None and not keep(layer):
                continue
            up, down = pair(out, inp)
            stem = {"kohya": f"lora_unet_{_underscored(layer)}", "comfyui": f"diffusion_model.{layer}",
                    "comfyui_peft": f"diffusion_model.{layer}"}[fmt]
            up_name, down_name = ("lora_B", "lora_A") if fmt == "comfyui_peft" else ("lora_up", "lora_down")
            t[f"{stem}.{up_name}.weight"], t[f"{stem}.{down_name}.weight"] = up, down
            t[f"{stem}.alpha"] = alpha_t
        if fmt == "kohya":  # a text encoder module: skipped outside ComfyUI, as by LoraLoaderModelOnly
            t["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = randn(rank, 8)
            t["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = randn(8, rank)
            t["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"] = alpha_t
        if fmt == "comfyui" and keep is None:  # ComfyUI's own name for the attention rows of a single block's linear1
            h = config.hidden_size
            up, down = pair(3 * h, h)
            t["diffusion_model.single_blocks.1.linear1_qkv.lora_up.weight"] = up
            t["diffusion_model.single_blocks.1.linear1_qkv.lora_down.weight"] = down
    elif fmt in ("diffusers", "diffusers_alpha", "onetrainer"):
        for module, (out, inp) in _diffusers_modules(config).items():
            if keep is not None and not keep(module):
                continue
            up, down = pair(out, inp)
            if fmt.startswith("diffusers"):  # peft's own files have no alpha (alpha = rank); converted ones do
                stem = f"transformer.{module}"
                t[f"{stem}.lora_B.weight"], t[f"{stem}.lora_A.weight"] = up, down
                if fmt == "diffusers_alpha":
                    t[f"{stem}.alpha"] = alpha_t
            else:
                stem = f"lora_transformer_{_underscored(module)}"
                t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"] = up, down
                t[f"{stem}.alpha"] = alpha_t
    elif fmt == "xlabs":
        for module, (out, inp) in _xlabs_modules(config).items():
            t[f"{module}.up.weight"], t[f"{module}.down.weight"] = pair(out, inp)
    elif fmt in ("lokr", "loha"):
        for layer, (out, inp) in list(_bfl_layers(config).items())[::2]:
            stem = f"lora_unet_{_underscored(layer)}"
            if fmt == "loha":
                s = (magnitude / inp ** 0.5) ** 0.25 / rank ** 0.25
                for w in ("w1", "w2"):
                    t[f"{stem}.hada_{w}_a"], t[f"{stem}.hada_{w}_b"] = randn(out, rank, scale=s), randn(rank, inp,
                                                                                                        scale=s)
            else:  # w1 whole (a small Kronecker factor), w2 low rank: LyCORIS' usual factoring
                f = 2 if out % 2 == 0 and inp % 2 == 0 else 1
                t[f"{stem}.lokr_w1"] = randn(f, f)
                s = (magnitude / inp ** 0.5 / rank ** 0.5) ** 0.5
                t[f"{stem}.lokr_w2_a"], t[f"{stem}.lokr_w2_b"] = randn(out // f, rank, scale=s), randn(rank, inp // f,
                                                                                                        scale=s)
            t[f"{stem}.alpha"] = alpha_t
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    return t


def write_lora(path: Path, config: FluxConfig, fmt: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               **kwargs) -> Path:
    """A LoRA file of format `fmt` for `config` at `path` (tensors in `dtype`, alphas in float32)."""
    tensors = lora_tensors(config, fmt, seed, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() if k.endswith(".alpha") else v.to(dtype).contiguous() for k, v in tensors.items()},
              str(path))
    return path
