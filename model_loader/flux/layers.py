"""FLUX.1's layers, laid out like Black Forest Labs' reference (attribute names = the checkpoint's keys): the
embedders, norms, modulation, the double-stream and single-stream blocks and the last layer.

Every Linear is built from `operations.Linear`, so weights can be stored in one dtype (fp8) and computed in
another. Each block mixes its tokens through its `attention(q, k, v, pe)` callable (default: math.attention).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .math import attention, clamp_fp16, rope, split_heads

# (q, k, v (B,H,L,D), pe (B,1,L,D/2,2,2)) -> (B,L,H*D): rotary attention over the joint text+image sequence.
Attention = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class EmbedND(nn.Module):
    """Rotary embedding of n-axis position ids (B,L,n) -> (B,1,L,sum(axes_dim)/2,2,2)."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        parts = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(parts, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, operations: Any, **factory: Any) -> None:
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, **factory)
        self.silu = nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, **factory: Any) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        rrms = torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + 1e-6)
        # The scale follows the input's device too: under ComfyUI's partial loading it may stay offloaded.
        return (x32 * rrms).to(x.dtype) * self.scale.to(device=x.device, dtype=x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, **factory: Any) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim, **factory)
        self.key_norm = RMSNorm(dim, **factory)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the weights of one stream's attention (qkv, norm, proj); the mixing happens in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, operations: Any, **factory: Any) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.norm = QKNorm(dim // num_heads, **factory)
        self.proj = operations.Linear(dim, dim, bias=True, **factory)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B,L,D) -> normalised q, k and v, each (B,H,L,D/H)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor  # (B,1,D)
    scale: Tensor
    gate: Tensor

    def apply(self, x: Tensor) -> Tensor:
        # shift + (1 + scale) * x in one kernel (no full-size temporary)
        return torch.addcmul(self.shift, 1 + self.scale, x)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, operations: Any, **factory: Any) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, **factory)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        return first, (ModulationOut(*out[3:]) if self.is_double else None)


def _mlp(hidden: int, mlp_hidden: int, operations: Any, **factory: Any) -> nn.Sequential:
    return nn.Sequential(
        operations.Linear(hidden, mlp_hidden, bias=True, **factory),
        nn.GELU(approximate="tanh"),
        operations.Linear(mlp_hidden, hidden, bias=True, **factory),
    )


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly.

    forward(img (B,L,D), txt (B,T,D), vec (B,D), pe (B,1,T+L,head_dim/2,2,2)) -> (img, txt), same shapes.
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, operations: Any,
                 attention: Attention = attention, **factory: Any) -> None:
        super().__init__()
        self.attention = attention
        mlp_hidden = int(hidden * mlp_ratio)

        def norm() -> nn.Module:
            return operations.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **factory)

        self.img_mod = Modulation(hidden, True, operations, **factory)
        self.img_norm1 = norm()
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias, operations, **factory)
        self.img_norm2 = norm()
        self.img_mlp = _mlp(hidden, mlp_hidden, operations, **factory)
        self.txt_mod = Modulation(hidden, True, operations, **factory)
        self.txt_norm1 = norm()
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias, operations, **factory)
        self.txt_norm2 = norm()
        self.txt_mlp = _mlp(hidden, mlp_hidden, operations, **factory)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.project(img_mod1.apply(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.project(txt_mod1.apply(self.txt_norm1(txt)))
        # Text tokens come first in the joint sequence (and in pe).
        attn = self.attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                              torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        # Gated residuals, x + gate * f(x), each as one addcmul.
        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(img_mod2.apply(self.img_norm2(img))))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt))))
        return clamp_fp16(img), clamp_fp16(txt)


class SingleStreamBlock(nn.Module):
    """One stream over the joined text+image tokens, attention and MLP in parallel from one projection.

    forward(x (B,T+L,D), vec (B,D), pe (B,1,T+L,head_dim/2,2,2)) -> x (B,T+L,D).
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, operations: Any,
                 attention: Attention = attention, **factory: Any) -> None:
        super().__init__()
        self.attention = attention
        self.hidden_size = hidden
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = operations.Linear(hidden, hidden * 3 + self.mlp_hidden_dim, bias=True, **factory)
        self.linear2 = operations.Linear(hidden + self.mlp_hidden_dim, hidden, bias=True, **factory)
        self.norm = QKNorm(hidden // num_heads, **factory)
        self.pre_norm = operations.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **factory)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, False, operations, **factory)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((self.attention(q, k, v, pe), self.mlp_act(mlp)), dim=2))
        return clamp_fp16(torch.addcmul(x, mod.gate, out))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int, operations: Any, **factory: Any) -> None:
        super().__init__()
        self.norm_final = operations.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, **factory)
        self.linear = operations.Linear(hidden, patch_size * patch_size * out_channels, bias=True, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden, 2 * hidden, bias=True, **factory))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # BFL order: shift first
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
