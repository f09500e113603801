"""FLUX's math on tensors: rotary position embedding, attention, the time embedding, and the token layout of
latents (2x2 patches and their position ids). No weights: the layers in model.py build on these."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for positions `pos` (B,L) on `dim` channels: (B,L,dim/2,2,2) float32."""
    # float64 frequencies as in the reference (MPS has no float64).
    freq_dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=freq_dtype, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(freq_dtype)[..., None] * omega  # (B,L,dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rot.reshape(*angles.shape, 2, 2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate channel pairs of q and k (B,H,L,D) by `freqs` (B,1,L,D/2,2,2); computed in float32."""
    q = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    k = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    q_out = freqs[..., 0] * q[..., 0] + freqs[..., 1] * q[..., 1]
    k_out = freqs[..., 0] * k[..., 0] + freqs[..., 1] * k[..., 1]
    return q_out.reshape(xq.shape).type_as(xq), k_out.reshape(xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Rotary attention over (B,H,L,D) inputs; returns (B,L,H*D)."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding (cos, sin) of t (B,) in [0,1], scaled by `time_factor`: (B,dim) float32."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B,L,3*H*D) -> three (B,H,L,D) tensors."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def clamp_fp16(x: Tensor) -> Tensor:
    # fp16 activations of the 12B model can overflow; keep them finite (bf16/fp32 untouched).
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0)
    return x


def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, row-major, channel-major inside a patch."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """(B, H/2 * W/2, C*4) -> (B, C, H, W); the inverse of `pack`."""
    b, _, d = tokens.shape
    c, h2, w2 = d // 4, latent_height // 2, latent_width // 2
    x = tokens.reshape(b, h2, w2, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, latent_height, latent_width)


def image_ids(batch: int, latent_height: int, latent_width: int) -> Tensor:
    """(B, H/2 * W/2, 3) position ids (0, row, col) of the packed image tokens, float32."""
    h2, w2 = latent_height // 2, latent_width // 2
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(1, h2 * w2, 3).expand(batch, -1, -1).contiguous()


def text_ids(batch: int, num_tokens: int) -> Tensor:
    """(B, T, 3) zeros: text tokens carry no position in FLUX's rotary embedding."""
    return torch.zeros(batch, num_tokens, 3)
