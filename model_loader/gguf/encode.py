"""float32 weights (numpy) -> GGUF block bytes of a type, for fixtures: test files, the demo, benchmarks.

The `gguf` package quantizes the float and legacy types (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1) itself and is
used for them. It has no quantizer for the K-quants, so `encode` packs those with a plain one written here:
each sub-block's scale (and min) from its range, rounded to the type's bits against the block's float16 scale
(llama.cpp's quantizer searches for better scales; files it makes are at least as accurate). The bytes follow
the layouts `dequantize.py` documents, so gguf's own dequantization reads them; `random_blocks` makes valid
blocks of random bytes with finite scales for the kernel tests.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .types import QUANT_TYPES, QuantType

QK_K = 256
# Byte offsets of each block's float16 scale fields (random bytes there could be NaN or infinite).
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: QuantType, n_blocks: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """(n_blocks, block_bytes) uint8: random quants and sub-scales, float16 scales drawn around `scale`."""
    blocks = rng.integers(0, 256, size=(n_blocks, qtype.block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype.name]:
        half = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        blocks[:, offset:offset + 2] = half.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _half(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bytes (n, 2), the float32 value they hold (n, 1))."""
    h = x.astype(np.float16).reshape(-1, 1)
    return h.view(np.uint8), h.astype(np.float32)


def _levels(x: np.ndarray, step: np.ndarray, low: int, high: int, offset: np.ndarray | float = 0.0) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((x + offset) / step), 0)
    return np.clip(q, low, high).astype(np.int32)


def _scale_and_min(sub: np.ndarray, top: int, bits: int) -> tuple[np.ndarray, ...]:
    """Sub-blocks (n, s, k) -> (d bytes, dmin bytes, scale codes, min codes, effective steps and offsets)."""
    lo = np.minimum(sub.min(axis=-1), 0)
    step = (sub.max(axis=-1) - lo) / top
    d_bytes, d = _half(step.max(axis=-1) / (2**bits - 1))
    m_bytes, dmin = _half((-lo).max(axis=-1) / (2**bits - 1))
    sc = _levels(step, d, 0, 2**bits - 1)
    mn = _levels(-lo, dmin, 0, 2**bits - 1)
    return d_bytes, m_bytes, sc, mn, (d * sc)[..., None], (dmin * mn)[..., None]


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and mins -> 12 bytes (the layout `_k_scales` in dequantize.py reads)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _nibbles_of_32(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) values < 16 -> (n, 128) bytes: sub-blocks 2i and 2i+1 share 32-byte group i."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)


def _crumbs(q: np.ndarray, groups: int) -> np.ndarray:
    """(n, 256) values < 4 -> (n, 64) bytes: element h*128 + s*32 + p sits in byte h*32 + p, bits 2s."""
    q = q.reshape(-1, groups, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, groups * 32)


def _q4_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 8, 32)
    d, dmin, sc, mn, step, offset = _scale_and_min(sub, 15, 6)
    q = _levels(sub, step, 0, 15, offset)
    return np.concatenate([d, dmin, _pack_k_scales(sc, mn), _nibbles_of_32(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 8, 32)
    d, dmin, sc, mn, step, offset = _scale_and_min(sub, 31, 6)
    q = _levels(sub, step, 0, 31, offset)
    high = ((q >> 4) << np.arange(8).reshape(1, 8, 1)).sum(axis=1).astype(np.uint8)  # bit j: sub-block j
    return np.concatenate([d, dmin, _pack_k_scales(sc, mn), high, _nibbles_of_32(q & 0x0F)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    step = np.abs(sub).max(axis=-1) / 31
    d_bytes, d = _half(step.max(axis=-1) / 127)
    sc = _levels(step, d, -128, 127)
    q = _levels(sub, (d * sc)[..., None], -32, 31).reshape(-1, 256) + 32
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = _crumbs(q >> 4, 2)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.astype(np.int8).view(np.uint8), d_bytes],
                          axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    step = np.abs(sub).max(axis=-1) / 4
    d_bytes, d = _half(step.max(axis=-1) / 31)
    sc = _levels(step, d, -32, 31)
    q = _levels(sub, (d * sc)[..., None], -4, 3).reshape(-1, 256)
    high = (q >= 0).astype(np.int32)  # set: no -4 offset
    low = q + 4 * (1 - high)
    hmask = (high.reshape(-1, 8, 32) << np.arange(8).reshape(1, 8, 1)).sum(axis=1)
    codes = sc + 32
    packed = np.empty((x.shape[0], 12), dtype=np.int32)
    packed[:, :8] = (codes[:, :8] & 0x0F) | ((codes[:, 8:] & 0x0F) << 4)
    top = (codes >> 4).reshape(-1, 4, 4)  # index s*4 + j -> byte 8 + j, bits 2s
    packed[:, 8:] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([hmask.astype(np.uint8), _crumbs(low, 2).astype(np.uint8), packed.astype(np.uint8),
                           d_bytes], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    d, dmin, sc, mn, step, offset = _scale_and_min(sub, 3, 4)
    q = _levels(sub, step, 0, 3, offset).reshape(-1, 256)
    return np.concatenate([(sc | (mn << 4)).astype(np.uint8), _crumbs(q, 2).astype(np.uint8), d, dmin], axis=1)


_K_ENCODERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def encode(weights: np.ndarray, qtype: QuantType, gguf: Any) -> np.ndarray:
    """float weights (..., row) -> what gguf's writer takes for `qtype`: the float array for F32/F16, else
    uint8 (..., row_bytes). `gguf` is the imported package (an optional dependency)."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    ggml = gguf.GGMLQuantizationType[qtype.name]
    if qtype.name not in _K_ENCODERS:
        return gguf.quants.quantize(weights, ggml)
    rows = weights.reshape(-1, QK_K)
    blocks = _K_ENCODERS[qtype.name](rows)
    return blocks.reshape(*weights.shape[:-1], qtype.row_bytes(weights.shape[-1]))


__all__ = ["HALF_FIELDS", "QUANT_TYPES", "encode", "random_blocks"]
