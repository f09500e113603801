"""GGUF tensor bytes -> float tensors, in torch on whatever device the bytes are on.

`dequantize(raw, qtype, shape)` takes a uint8 tensor of whole blocks (any leading shape, e.g. the
(rows, row_bytes) a Linear weight is held as) and returns the float32 weights of `shape`, then cast to
`dtype`. Every step is float32 arithmetic in the same order as the `gguf` package's numpy reference
(`gguf.quants.dequantize`), so the result is bit-identical to it; the tests check each type on random blocks.

Block layouts (little-endian, `d`/`dmin` float16, q the packed quants), per block:
  Q8_0  d, 32 int8                                 w = d * q
  Q4_0  d, 16 bytes of nibbles                     w = d * (q - 8)
  Q4_1  d, m, 16 bytes of nibbles                  w = d * q + m
  Q5_0  d, 4 bytes of 5th bits, 16 of nibbles      w = d * (q - 16)
  Q5_1  d, m, 4 bytes of 5th bits, 16 of nibbles   w = d * q + m
  K-quants: 256 weights in 8 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K) sub-blocks, each with its own scale
  (and min) quantized against the block's d (and dmin).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .types import QuantType

QK_K = 256
CPU_CHUNK = 1 << 17  # weights dequantized at a time on a CPU

# (n_blocks, block_bytes) uint8 -> (n_blocks, block_size) float32
BlockDecoder = Callable[[Tensor], Tensor]


def _f16(raw: Tensor) -> Tensor:
    """(n, 2) bytes -> (n, 1) float32 of the float16 they hold."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles (the order GGML packs them in)."""
    k = qs.shape[-1]
    out = torch.empty((*qs.shape[:-1], 2 * k), dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[..., :k])
    torch.bitwise_right_shift(qs, 4, out=out[..., k:])
    return out


def _signed(raw: Tensor) -> Tensor:
    """int8 bytes (as uint8) -> their float32 values: (u ^ 0x80) - 128, by way of uint8 (whose conversion to
    float is the fast one on CPUs)."""
    return (raw ^ 0x80).float().sub_(128)


def _bits(raw: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 8k) of 0/1: bit j of the little-endian integer they form at position j."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).flatten(-2)


# The float steps run in place on the one float32 tensor each kernel makes; IEEE products commute, so
# q *= d is the reference's d * q bit for bit.


def _q8_0(blocks: Tensor) -> Tensor:
    return _signed(blocks[:, 2:]).mul_(_f16(blocks[:, :2]))


def _q4_0(blocks: Tensor) -> Tensor:
    return _nibbles(blocks[:, 2:]).float().sub_(8).mul_(_f16(blocks[:, :2]))


def _q4_1(blocks: Tensor) -> Tensor:
    return _nibbles(blocks[:, 4:]).float().mul_(_f16(blocks[:, :2])).add_(_f16(blocks[:, 2:4]))


def _q5_0(blocks: Tensor) -> Tensor:
    q = _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(blocks[:, :2]))


def _q5_1(blocks: Tensor) -> Tensor:
    q = _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4)
    return q.float().mul_(_f16(blocks[:, :2])).add_(_f16(blocks[:, 2:4]))


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> the 8 six-bit sub-block scales and 8 mins, (n, 8) each, as float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the
    mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble).
    """
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _sub_blocks_of_32(qs: Tensor) -> Tensor:
    """Q4_K/Q5_K quants: (n, 128) bytes -> (n, 8, 32) nibbles; 32-byte group i gives sub-blocks 2i (low
    nibbles) and 2i+1 (high nibbles)."""
    groups = qs.reshape(-1, 4, 1, 32)
    return torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(blocks: Tensor) -> Tensor:
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks[:, 0:2]) * scales).unsqueeze(-1)
    dm = (_f16(blocks[:, 2:4]) * mins).unsqueeze(-1)
    return _sub_blocks_of_32(blocks[:, 16:]).float().mul_(d).sub_(dm).reshape(-1, QK_K)


def _q5_k(blocks: Tensor) -> Tensor:
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks[:, 0:2]) * scales).unsqueeze(-1)
    dm = (_f16(blocks[:, 2:4]) * mins).unsqueeze(-1)
    # bit j of the 32 high-bit bytes is the 5th bit of sub-block j
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1
    q = _sub_blocks_of_32(blocks[:, 48:]) | (high << 4)
    return q.float().mul_(d).sub_(dm).reshape(-1, QK_K)


def _q6_k(blocks: Tensor) -> Tensor:
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = _signed(blocks[:, 192:208])
    d = (_f16(blocks[:, 208:210]) * scales).unsqueeze(-1)  # (n, 16, 1)
    low = ql.reshape(-1, 2, 1, 64)
    low = torch.cat([low & 0x0F, low >> 4], dim=2).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    return (low | (high << 4)).float().sub_(32).reshape(-1, 16, 16).mul_(d).reshape(-1, QK_K)


def _q3_k(blocks: Tensor) -> Tensor:
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    # 16 six-bit signed scales: low 4 bits in bytes 0-7 (low nibbles first), top 2 bits in bytes 8-11.
    low = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 4, 1)
    high = ((packed[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    scales = ((low | (high << 4)).float() - 32)
    dl = (_f16(blocks[:, 108:110]) * scales).unsqueeze(-1)  # (n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    ql = ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)
    bit_shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 8, 1)
    qh = ((hmask.unsqueeze(1) >> bit_shifts) & 1).reshape(-1, 16, 16)
    q = ql + (qh << 2)  # q - 4 + 4 * bit: a set high bit means no offset of -4
    return q.float().sub_(4).mul_(dl).reshape(-1, QK_K)


def _q2_k(blocks: Tensor) -> Tensor:
    packed, qs = blocks[:, :16], blocks[:, 16:80]
    dl = (_f16(blocks[:, 80:82]) * (packed & 0x0F).float()).unsqueeze(-1)  # (n, 16, 1)
    ml = (_f16(blocks[:, 82:84]) * (packed >> 4).float()).unsqueeze(-1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(-1, QK_K)


DECODERS: dict[str, BlockDecoder] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: Tensor, qtype: QuantType, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """GGUF bytes of `qtype` -> a `dtype` tensor of `shape` (computed in float32, on raw's device).

    For the plain float types `raw` is their bytes (or already a tensor of that dtype)."""
    if qtype.dense is not None:
        values = raw if raw.dtype == qtype.dense else raw.contiguous().view(qtype.dense)
        return values.reshape(shape).to(dtype)
    blocks = raw.reshape(-1, qtype.block_bytes)
    decode = DECODERS[qtype.name]
    if blocks.device.type != "cpu" or blocks.shape[0] * qtype.block_size <= CPU_CHUNK:
        return decode(blocks).reshape(shape).to(dtype)
    # On a CPU, piece by piece: the temporaries stay small (a large layer's would be several times its float32
    # size) and only the output is a large allocation.
    out = torch.empty((blocks.shape[0], qtype.block_size), dtype=dtype)
    step = max(1, CPU_CHUNK // qtype.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = decode(blocks[start:start + step])
    return out.reshape(shape)
