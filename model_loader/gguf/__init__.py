"""GGUF block quantization: the types the pack reads, their dequantization in torch, and fixture encoders."""
from .dequantize import dequantize
from .types import QUANT_TYPES, QuantType

__all__ = ["QUANT_TYPES", "QuantType", "dequantize"]
