"""The quantization methods, one module each, plugged in through the seam (a `vqlab.codes.WeightCode`, a
`vqlab.config.QuantConfig` and a handler registered with `register_handler`).  Importing vqlab registers them all.

    vq       VQ-DNN: k-means codebooks (VQConfig, VQCode, the VQLinear / VQConv2d names)
    vq_simd  the same VQ code in the simd kernel's 4-bit layout (SimdCode, pack_simd_)
    vq_simd_conv  a VQ convolution's code in the lookup-table convolution's layout (SimdConvCode)
    vq_packed  what the two packed layouts share (PackedVQCode)
    uniform  uniform per-channel int-b quantization, the int8/int4 baselines (UniformConfig)
    gong     Gong et al. 2014: binarization, scalar k-means, product and residual quantization
    lattice  Choi et al.: universal randomized (dithered) lattice quantization with universal source coding
    vq4all   VQ4ALL: one KDE-sampled universal codebook for several networks, progressive candidate assignment
    qaf      quantization-aware CP factorization (ADMM with a b-bit grid constraint) vs CP-ALS + PTQ
"""
from . import gong, lattice, qaf, uniform, vq, vq4all, vq_simd, vq_simd_conv  # noqa: F401  (registers every built-in method)

__all__ = ["vq", "vq_simd", "vq_simd_conv", "uniform", "gong", "lattice", "vq4all", "qaf"]
