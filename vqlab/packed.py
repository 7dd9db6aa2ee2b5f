"""The simd layout of VQ codes now lives in `vqlab.methods.vq`; this name stays for existing code (for BC)."""
from .methods.vq_simd import SimdCode, pack_simd_  # noqa: F401

__all__ = ["SimdCode", "pack_simd_"]
