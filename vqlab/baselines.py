"""The int8/int4 baselines now live in `vqlab.methods.uniform`; this name stays for existing code (for BC)."""
from .methods.uniform import UniformCode, UniformConfig, fake_quantize_uniform, uniform_quantize_  # noqa: F401

__all__ = ["UniformConfig", "UniformCode", "uniform_quantize_", "fake_quantize_uniform"]
