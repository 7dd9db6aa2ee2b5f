"""The seam moved: codes to `vqlab.codes`, the quantized layers to `vqlab.layers`; this name stays for existing code
(for BC)."""
from .codes import CodeSize, WeightCode, register_code  # noqa: F401
from .layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear  # noqa: F401

__all__ = ["WeightCode", "CodeSize", "register_code", "QuantizedLayer", "QuantizedLinear", "QuantizedConv2d"]
