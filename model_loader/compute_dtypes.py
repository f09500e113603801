"""(device, how the weights are stored) -> the dtype each model computes in. The one place that decides it.

On the CPU everything computes in float32: CPUs are slow and inexact in half precision, whatever the
storage. On a GPU each model has its own rule, because each has its own numeric limits (below).
"""
from __future__ import annotations

import torch

CLASSIFIER_DTYPE = torch.float32  # the safety checker is small: exact float32 everywhere


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def flux_compute_dtype(device: torch.device, weight_dtype: str, stored: torch.dtype) -> torch.dtype:
    """The transformer: fp16 when asked for or stored so, else bf16 (fp8 and float32 storage included)."""
    if device.type == "cpu":
        return torch.float32
    if weight_dtype == "fp16" or (weight_dtype == "default" and stored == torch.float16):
        return torch.float16
    return torch.bfloat16


def text_encoder_compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """CLIP / T5: bf16 for bf16 weights, else fp16 (exact for fp16 and fp8 weights; the T5 code keeps
    fp16 activations from overflowing)."""
    if device.type != "cuda":
        return torch.float32
    if stored == torch.bfloat16 and _bf16_supported(device):
        return torch.bfloat16
    return torch.float16


def autoencoder_compute_dtype(device: torch.device) -> torch.dtype:
    """The VAE: bf16 on GPUs that support it (fp16 overflows in this VAE), else float32."""
    return torch.bfloat16 if _bf16_supported(device) else torch.float32
