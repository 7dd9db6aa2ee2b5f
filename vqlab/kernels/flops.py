"""FLOP formulas of the quantized products, one per op, used by the ops' FlopCounterMode formulas and by every
code's `flops` (so `vqlab.count_flops` and FlopCounterMode agree by construction).

Convention (as torch.utils.flop_counter): a multiply-add is 2 FLOPs, an add 1, biases are not counted.
    lookup-table product   table:      2 * rows * T * S * d * K   (every input segment against all K codewords
                                        of one codebook; T tables per input row)
                           accumulate:     rows * m * S            (one add per output and segment)
    bucket sums (PQ along the output axis): rows * s * n adds, then 2 * rows * s * K * L
"""
from __future__ import annotations

import math

__all__ = ["lut_flops", "table_count", "matmul_flops", "conv_flops", "bucket_flops", "conv_out_hw"]


def lut_flops(rows: int, m: int, segments: int, d: int, k: int, tables: int) -> tuple[int, int]:
    """(table FLOPs, accumulate FLOPs) of a lookup-table product: `rows` input vectors, each with `tables`
    tables of segments * d * K multiply-adds, then one add per output (m) and segment."""
    return rows * 2 * tables * segments * d * k, rows * m * segments


def table_count(conv_groups: int, codebook_groups: int) -> int:
    """Tables per input vector: one per piece of the common refinement of the conv groups and the codebook
    groups over the output rows (each piece sees one conv group's input and one codebook): c + G - gcd(c, G)."""
    return conv_groups + codebook_groups - math.gcd(conv_groups, codebook_groups)


def matmul_flops(x_shape, codebook_shape, indices_shape) -> tuple[int, int]:
    """(table, accumulate) FLOPs of vq_matmul(x (..., n), codebook (K, d) | (G, K, d), indices (m, S))."""
    rows = math.prod(x_shape[:-1])
    m, s = indices_shape
    g = codebook_shape[0] if len(codebook_shape) == 3 else 1
    return lut_flops(rows, m, s, codebook_shape[-1], codebook_shape[-2], g)


def conv_flops(out_shape, codebook_shape, indices_shape, conv_groups: int) -> tuple[int, int]:
    """(table, accumulate) FLOPs of vq_conv2d as run here (im2col + LUT): out_shape (B, out, Ho, Wo)."""
    b, _, ho, wo = out_shape
    m, s = indices_shape
    g = codebook_shape[0] if len(codebook_shape) == 3 else 1
    return lut_flops(b * ho * wo, m, s, codebook_shape[-1], codebook_shape[-2], table_count(conv_groups, g))


def bucket_flops(rows: int, subspaces: int, n: int, k: int, length: int) -> tuple[int, int]:
    """(product, accumulate) FLOPs of PQ's bucket-sum product along the output axis: rows * s * n adds into
    the buckets, then per sub-space a (K,) x (K, length) product."""
    return rows * subspaces * 2 * k * length, rows * subspaces * n


def conv_out_hw(x_shape, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution: x_shape (..., H, W), the other arguments (h, w) pairs."""
    kh, kw = kernel_size
    ho = (x_shape[-2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x_shape[-1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo
