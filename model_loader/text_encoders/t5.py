"""T5 v1.1 encoder (FLUX's prompt sequence encoder), with HF's module names.

Attribute names are the keys of `t5xxl_fp16.safetensors` (`encoder.block.N.layer.0.SelfAttention.q.weight`,
`encoder.block.N.layer.1.DenseReluDense.wi_0.weight`, `shared.weight`...), so those files load with no
renaming. Sizes are read off the checkpoint.

Half precision: T5 v1.1's feed-forward outputs exceed fp16's range (65504) in the XXL model. The residual
stream and the RMS norms are kept in float32 whatever the compute dtype, and in fp16 the two projections
that write into the residual stream (attention `o`, feed-forward `wo`) run in float32, so nothing
overflows; the large matmuls (q, k, v, wi_0, wi_1) stay in the compute dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import Checkpoint
from ..errors import ModelFileError
from ..operations import unfilled_embedding

_FP16_SAFE_MAX = torch.finfo(torch.float16).max - 1000  # the bound HF's T5 clamps to in fp16


@dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    heads: int = 64
    d_ff: int = 10240
    layers: int = 24
    relative_buckets: int = 32
    relative_max_distance: int = 128  # not stored in the weights; 128 for every T5
    layer_norm_eps: float = 1e-6


EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: files keep one or both
# llama.cpp's names (encoder-only t5xxl GGUF files) -> transformers' T5 names, replaced in this order.
LLAMA_CPP_NAMES = (("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
                   ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
                   ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
                   ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
                   ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
                   ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_up", "layer.1.DenseReluDense.wi_1"),
                   ("ffn_down", "layer.1.DenseReluDense.wo"), ("ffn_norm", "layer.1.layer_norm"))
_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def transformers_name(llama_cpp_name: str) -> str:
    """`enc.blk.0.attn_q.weight` -> `encoder.block.0.layer.0.SelfAttention.q.weight` (other names unchanged)."""
    name = llama_cpp_name
    for old, new in LLAMA_CPP_NAMES:
        name = name.replace(old, new)
    return name


def llama_cpp_name(transformers_name: str) -> str:
    """The way back (for writing GGUF test files): `shared.weight` -> `token_embd.weight`."""
    name = transformers_name
    for old, new in reversed(LLAMA_CPP_NAMES):
        name = name.replace(new, old)
    return name


def config_from_checkpoint(ckpt: Checkpoint, prefix: str = "") -> T5EncoderConfig:
    """Sizes of the T5 encoder stored under `prefix` in `ckpt`."""
    embedding = next((prefix + k for k in EMBEDDING_KEYS if prefix + k in ckpt), None)
    if embedding is None:
        raise ModelFileError(f"{ckpt.path}: the T5 token embedding (shared.weight) is missing; the file is incomplete.")
    vocab_size, d_model = ckpt.shape(embedding)
    buckets, heads = ckpt.shape(prefix + _BIAS_KEY)
    inner = ckpt.shape(f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gate = f"{prefix}encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    if gate not in ckpt:
        raise ModelFileError(
            f"{ckpt.path} is a T5 v1.0 encoder (plain ReLU feed-forward, no wi_0/wi_1). FLUX uses T5 v1.1 XXL: "
            "use t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors."
        )
    d_ff = ckpt.shape(gate)[0]
    block_prefix = f"{prefix}encoder.block."
    layer_ids = {int(k[len(block_prefix):].split(".", 1)[0]) for k in ckpt.keys() if k.startswith(block_prefix)}
    if sorted(layer_ids) != list(range(len(layer_ids))) or inner % heads:
        raise ModelFileError(f"{ckpt.path}: the T5 blocks or attention sizes are inconsistent; the file is damaged.")
    return T5EncoderConfig(vocab_size=vocab_size, d_model=d_model, d_kv=inner // heads, heads=heads, d_ff=d_ff,
                           layers=len(layer_ids), relative_buckets=buckets)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """(length, length) bucket of key position minus query position (bidirectional T5 encoder scheme).

    Half the buckets per direction; in each, distances below a quarter of the buckets get their own bucket and
    larger ones share logarithmically wider buckets up to `max_distance`.
    """
    position = torch.arange(length, device=device)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction, always computed in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight.float()


def _fp16_guard(x: torch.Tensor) -> torch.Tensor:
    """In fp16, turn overflowed values into large finite ones (HF's clamp), elsewhere a no-op."""
    return x.clamp(-_FP16_SAFE_MAX, _FP16_SAFE_MAX) if x.dtype == torch.float16 else x


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_bias: bool, operations) -> None:
        super().__init__()
        self.config = config
        inner = config.heads * config.d_kv
        self.q = operations.Linear(config.d_model, inner, bias=False)
        self.k = operations.Linear(config.d_model, inner, bias=False)
        self.v = operations.Linear(config.d_model, inner, bias=False)
        self.o = operations.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = unfilled_embedding(config.relative_buckets, config.heads)

    def position_bias(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, length, length) additive attention bias."""
        c = self.config
        buckets = relative_position_buckets(length, c.relative_buckets, c.relative_max_distance, device)
        table = self.relative_attention_bias.weight
        return table.to(device=device, dtype=dtype)[buckets].permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, heads*d_kv) -> (B, heads, N, d_kv)
        q, k, v = (_fp16_guard(proj(x)).view(b, n, self.config.heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # T5 folds the scale into its weights: no 1/sqrt(d) here.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        if out.dtype == torch.float16:
            out = out.float()
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_bias: bool, operations) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias, operations)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_eps)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5EncoderConfig, operations) -> None:
        super().__init__()
        self.wi_0 = operations.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = operations.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = operations.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(_fp16_guard(self.wi_0(x)), approximate="tanh")
        linear = _fp16_guard(self.wi_1(x))
        if x.dtype == torch.float16:  # the gated product and wo's output overflow fp16 in T5-XXL
            gate, linear = gate.float(), linear.float()
        return self.wo(gate * linear)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5EncoderConfig, operations) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config, operations)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_eps)


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_bias: bool, operations) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_bias, operations),
                                    T5LayerFF(config, operations)])

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, N, d_model) float32 residual stream. Block 0 computes the position bias, later blocks reuse it."""
        attention, ff = self.layer
        if bias is None:
            bias = attention.SelfAttention.position_bias(h.shape[1], h.device, dtype)
        h = h + attention.SelfAttention(attention.layer_norm(h).to(dtype), bias).float()
        h = h + ff.DenseReluDense(ff.layer_norm(h).to(dtype)).float()
        return h, bias


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig, operations) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, i == 0, operations) for i in range(config.layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_eps)


class T5EncoderModel(nn.Module):
    """ids (B, N) -> last hidden state (B, N, d_model) float32."""

    def __init__(self, config: T5EncoderConfig, operations=nn) -> None:
        super().__init__()
        self.config = config
        self.shared = unfilled_embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, operations)

    def streamed_parts(self) -> list[nn.Module]:
        """Sub-modules holding every weight except the token table, in call order. The table (263 MB in the
        XXL model) stays where it is: only the looked-up rows move."""
        return [*self.encoder.block, self.encoder.final_layer_norm]

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = self.shared.weight
        h = table[ids.to(table.device)].to(device=ids.device, dtype=torch.float32)
        bias = None
        for block in self.encoder.block:
            h, bias = block(h, bias, dtype)
        return self.encoder.final_layer_norm(h)


def build_t5(config: T5EncoderConfig, operations=nn) -> T5EncoderModel:
    """The model with its weights on the meta device (to be loaded with `assign=True`)."""
    with torch.device("meta"):
        model = T5EncoderModel(config, operations)
    return model.eval().requires_grad_(False)
