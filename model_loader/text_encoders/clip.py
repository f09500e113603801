"""CLIP-L text encoder (the pooled prompt vector of FLUX), with HF's module names.

Attribute names are the keys of `clip_l.safetensors` (`text_model.encoder.layers.N.self_attn.q_proj.weight`...),
so those files load with no renaming. Sizes are read off the checkpoint, so a reduced test file goes
through the same code as the 246 MB one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import Checkpoint
from ..errors import ModelFileError
from ..operations import unfilled_embedding

PREFIX = "text_model."
HEAD_DIM = 64  # CLIP text towers use 64-wide heads


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    intermediate: int = 3072
    positions: int = 77
    eos_token_id: int = 49407  # the end token; the pooled state is taken at its first position
    layer_norm_eps: float = 1e-5

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)


CLIP_L = CLIPTextConfig()


def config_from_checkpoint(ckpt: Checkpoint, prefix: str = PREFIX) -> CLIPTextConfig:
    """Sizes of the CLIP text tower stored under `prefix` in `ckpt`."""
    vocab_size, width = ckpt.shape(f"{prefix}embeddings.token_embedding.weight")
    positions = ckpt.shape(f"{prefix}embeddings.position_embedding.weight")[0]
    layer_ids = {int(k[len(prefix) + len("encoder.layers."):].split(".", 1)[0])
                 for k in ckpt.keys() if k.startswith(f"{prefix}encoder.layers.")}
    if not layer_ids or sorted(layer_ids) != list(range(len(layer_ids))):
        raise ModelFileError(f"{ckpt.path}: the CLIP text layers are not numbered 0..N-1 ({sorted(layer_ids)[:8]}...).")
    intermediate = ckpt.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0]
    return CLIPTextConfig(vocab_size=vocab_size, width=width, layers=len(layer_ids), intermediate=intermediate,
                          positions=positions, eos_token_id=vocab_size - 1)


class CastLayerNorm(nn.LayerNorm):
    """LayerNorm that computes in the input's dtype whatever dtype its weights are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig, operations) -> None:
        super().__init__()
        self.heads = config.heads
        self.q_proj = operations.Linear(config.width, config.width)
        self.k_proj = operations.Linear(config.width, config.width)
        self.v_proj = operations.Linear(config.width, config.width)
        self.out_proj = operations.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        # (B, N, W) -> (B, heads, N, W/heads)
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig, operations) -> None:
        super().__init__()
        self.fc1 = operations.Linear(config.width, config.intermediate)
        self.fc2 = operations.Linear(config.intermediate, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, operations) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config, operations)
        self.layer_norm1 = CastLayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config, operations)
        self.layer_norm2 = CastLayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, operations) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, operations) for _ in range(config.layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = unfilled_embedding(config.vocab_size, config.width)
        self.position_embedding = unfilled_embedding(config.positions, config.width)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The tables stay where they are (they are not streamed to the GPU): look up there, move the rows.
        table = self.token_embedding.weight
        tokens = table[ids.to(table.device)].to(device=ids.device, dtype=dtype)  # (B, N, W)
        positions = self.position_embedding.weight[: ids.shape[1]].to(device=ids.device, dtype=dtype)
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig, operations) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config, operations)
        self.final_layer_norm = CastLayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """ids (B, N) -> (last_hidden_state (B, N, W), pooled (B, W)), both final-layer-normed."""

    def __init__(self, config: CLIPTextConfig, operations=nn) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config, operations)

    def streamed_parts(self) -> list[nn.Module]:
        """Sub-modules holding every weight but the embedding tables, in call order (for moving weights to
        the compute device one part at a time)."""
        tm = self.text_model
        return [*tm.encoder.layers, tm.final_layer_norm]

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] > self.config.positions:
            raise ValueError(f"CLIP takes at most {self.config.positions} tokens, got {ids.shape[1]}.")
        tm = self.text_model
        x = tm.embeddings(ids, dtype)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        return x, x[torch.arange(x.shape[0], device=x.device), self.end_positions(ids)]

    def end_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the first end token of each row (transformers' pooler_output); rows without one
        fall back to the highest id, as the original CLIP did."""
        is_end = ids == self.config.eos_token_id
        first_end = is_end.int().argmax(dim=-1)
        return torch.where(is_end.any(dim=-1), first_end, ids.argmax(dim=-1))


def build_clip(config: CLIPTextConfig, operations=nn) -> CLIPTextModel:
    """The model with its weights on the meta device (to be loaded with `assign=True`)."""
    with torch.device("meta"):
        model = CLIPTextModel(config, operations)
    return model.eval().requires_grad_(False)

