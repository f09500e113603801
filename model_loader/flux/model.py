"""The FLUX.1 flow transformer in plain torch, laid out like Black Forest Labs' reference (math -> layers -> model).

Module attribute names are the checkpoint keys of the BFL release (`double_blocks.0.img_attn.qkv.weight`,
`single_blocks.0.linear1.weight`, `final_layer.adaLN_modulation.1.weight`, ...), so the official file loads
strictly without remapping. The model computes in the dtype of its inputs; the rotary and timestep embeddings
are computed in float32 (rope frequencies in float64) like the reference.

The forward pass is split in three public steps so a step cache can run parts of it on its own:

    img, txt, vec, pe = model.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
    for block in model.double_blocks:
        img, txt = block(img, txt, vec, pe)         # DoubleStreamBlock: (B,L,D), (B,T,D) -> same
    x = torch.cat((txt, img), dim=1)
    for block in model.single_blocks:
        x = block(x, vec, pe)                       # SingleStreamBlock: (B,T+L,D) -> (B,T+L,D)
    out = model.final(x[:, txt.shape[1]:], vec)     # (B,L,D) -> (B,L,out_channels)

`run_blocks(img, txt, vec, pe, first_double_block)` runs the two loops (optionally skipping leading double
blocks that the caller already ran) and returns the image tokens.

Every block mixes its tokens through one `attention(q, k, v, pe)` call, injectable (constructor argument or
`set_attention`), so other kernels or a sequence-parallel attention replace it without editing the model; the
default is math.attention, the reference computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from .math import attention, image_ids, pack, text_ids, timestep_embedding, unpack

# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every rotary axis dim must be even, got {self.axes_dim}")


FLUX_DEV = FluxConfig()  # FLUX.1 [dev] and FLUX.1 Krea [dev]

# img_in's input features of the FLUX.1 variants that condition on more than the noisy latent (64: 2x2 patches of its
# 16 channels). Fill adds the masked image's latent (64) and the mask packed 8x8 per latent pixel (256); Depth and
# Canny add the control image's latent (64). Kontext keeps 64 (its reference image joins as extra tokens).
OTHER_VARIANTS = {384: "FLUX.1 Fill (inpainting and outpainting)",
                  128: "FLUX.1 Depth or FLUX.1 Canny (structure control)"}


def variant_problem(in_features: int) -> str | None:
    """Why a transformer whose img_in takes `in_features` cannot run text-to-image sampling (None: it can)."""
    if in_features == FLUX_DEV.in_channels:
        return None
    variant = OTHER_VARIANTS.get(in_features, "a FLUX variant this pack does not know")
    return (f"the model is {variant}: its img_in takes {in_features} features per token, where text-to-image "
            f"FLUX.1 models (FLUX.1 [dev], FLUX.1 Krea [dev]) take {FLUX_DEV.in_channels}. Krea Sampler runs "
            "text-to-image models: load one of those.")

# ---------------------------------------------------------------------------------------------- layers

# ----------------------------------------------------------------------------------------------- model


class FluxTransformer(nn.Module):
    """FLUX.1 transformer: packed latents (B,L,in_channels) -> velocity (B,L,out_channels) (`forward_orig`),
    or ComfyUI's (B,C,H,W) latents -> velocity (`forward`). Not named `Flux`: nodes that patch ComfyUI's own
    FLUX by class name must not take it for theirs."""

    def __init__(self, config: FluxConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 operations: Any = nn, attention: Attention = attention) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # The dtype callers should feed the model (load_flux sets it from how the weights are stored).
        if dtype is None:
            dtype_for_compute = torch.get_default_dtype()
        else:
            dtype_for_compute = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        self.compute_dtype: torch.dtype = dtype_for_compute
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        hidden = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.hidden_size = hidden
        self.num_heads = config.num_heads
        self.pe_embedder = EmbedND(config.head_dim, config.theta, config.axes_dim)
        self.img_in = operations.Linear(config.in_channels, hidden, bias=True, **factory)
        self.time_in = MLPEmbedder(256, hidden, operations, **factory)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden, operations, **factory)
        self.guidance_in = MLPEmbedder(256, hidden, operations, **factory) if config.guidance_embed else nn.Identity()
        self.txt_in = operations.Linear(config.context_in_dim, hidden, bias=True, **factory)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_ratio, config.qkv_bias, operations, attention,
                              **factory)
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_ratio, operations, attention, **factory)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, 1, config.out_channels, operations, **factory)

    def set_attention(self, attention: Attention) -> None:
        """Every block's attention call from now on (math.attention is the reference one)."""
        for block in (*self.double_blocks, *self.single_blocks):
            block.attention = attention

    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
              guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Input projections: -> img (B,L,D), txt (B,T,D), vec (B,D), pe (B,1,T+L,head_dim/2,2,2) float32.

        timesteps and guidance are (B,) with t in [0,1]; both are scaled by 1000 inside the embedding.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C); got {tuple(img.shape)} and {tuple(txt.shape)}")
        dtype = img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("This FLUX model has a guidance embedding: pass `guidance` (B,).")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        return img, txt, vec, pe

    def run_blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, first_double_block: int = 0) -> Tensor:
        """Double blocks from `first_double_block` on, then all single blocks: -> image tokens (B,L,D)."""
        for block in self.double_blocks[first_double_block:]:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return x[:, txt.shape[1]:]

    def final(self, img: Tensor, vec: Tensor) -> Tensor:
        """Image tokens (B,L,D) -> model output (B,L,out_channels)."""
        return self.final_layer(img, vec)

    def forward_orig(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                     guidance: Tensor | None = None, control: dict | None = None,
                     transformer_options: dict | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """The reference computation on packed tokens: (B,L,in_channels) -> velocity (B,L,out_channels).

        Named and ordered as ComfyUI's own FLUX `forward_orig`, so one sampler call serves both models. What
        only ComfyUI's FLUX implements (ControlNet residuals, block patches, attention masks) is refused by
        name instead of being silently ignored.
        """
        _refuse_comfy_extras(control, transformer_options, attn_mask)
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        return self.final(self.run_blocks(img, txt, vec, pe), vec)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                guidance: Tensor | None = None, control: dict | None = None,
                transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        """ComfyUI's diffusion-model contract, so native samplers run this model: latents (B,C,H,W) in model
        space, t (B,) in [0,1], context (B,T,context_in_dim), y (B,vec_in_dim) -> velocity (B,C,H,W)."""
        if type(self).forward_orig is not getattr(self.forward_orig, "__func__", None):
            raise NotImplementedError(
                "Krea node pack: a node replaced this transformer's forward_orig (a patch written for ComfyUI's own "
                "FLUX, e.g. TeaCache); it does not fit the Krea transformer. Remove that node, or load the model "
                "with ComfyUI's UNETLoader; Krea Sampler's `acceleration` is the pack's own step cache.")
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in ("attention_mask",))
        if unsupported:
            raise NotImplementedError(f"Krea node pack: the Krea transformer does not take {', '.join(unsupported)} "
                                      "(reference latents and other inputs of ComfyUI's FLUX variants).")
        b, _, h, w = x.shape
        pad_h, pad_w = h % 2, w % 2  # the transformer sees 2x2 patches
        x_padded = F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x
        lh, lw = x_padded.shape[-2:]
        img_ids_ = image_ids(b, lh, lw).to(x.device)
        txt_ids_ = text_ids(b, context.shape[1]).to(x.device)
        out = self.forward_orig(pack(x_padded), img_ids_, context, txt_ids_, timestep, y, guidance, control,
                                transformer_options, kwargs.get("attention_mask"))
        return unpack(out, lh, lw)[:, :, :h, :w]


def _refuse_comfy_extras(control: dict | None, transformer_options: dict | None, attn_mask: Tensor | None) -> None:
    if control is not None:
        raise NotImplementedError("Krea node pack: ControlNet is not supported by the Krea transformer; load the "
                                  "model with ComfyUI's UNETLoader to use ControlNet.")
    if attn_mask is not None:
        raise NotImplementedError("Krea node pack: the Krea transformer takes no attention mask.")
    options = transformer_options or {}
    patches = options.get("patches_replace", {}).get("dit") or options.get("patches", {}) or \
        options.get("wrappers", {}).get("diffusion_model")
    if patches:
        raise NotImplementedError("Krea node pack: the Krea transformer does not run block patches or model "
                                  "wrappers written for ComfyUI's FLUX (PuLID, TeaCache-style caches and similar "
                                  "nodes); load the model with ComfyUI's UNETLoader for them.")
