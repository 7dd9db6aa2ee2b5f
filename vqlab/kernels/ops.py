"""VQ matmul / conv as torch custom ops with backends "torch", "dense", "numba" and "auto", plus their FLOP formulas.

One signature for every backend (public meaning W[i, s*d:(s+1)*d] = codebook[indices[i, s]]):
    vq_matmul(x (..., n), codebook (K, d) | (G, K, d), indices (m, n/d)) -> (..., m)
The reference (dequantize + GEMM) is the correctness oracle and the fallback on every device;
numba is imported only when its backend is chosen.  `auto` times the LUT kernel against dequantize + GEMM
(the dequantize done by numba's parallel gather) once per shape/batch bucket and keeps the faster (CPU);
on CUDA the torch path runs.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .reference import dequantize, vq_matmul_reference

__all__ = ["vq_matmul", "vq_conv2d", "available_backends", "auto_choices", "conv_weight_from_rows"]

BACKENDS = ("torch", "dense", "numba", "auto")
_LAYOUT_CACHE: dict = {}   # (data_ptr, shape, stride, dtype, version) -> (indices, segment-major numpy copy)
_AUTO: dict = {}           # shape/batch key -> "dense" | "numba"


def available_backends() -> list[str]:
    """Backends usable here: always "torch" and "dense"; "numba" when numba imports; "auto"."""
    try:
        import numba  # noqa: F401
        return ["torch", "dense", "numba", "auto"]
    except ImportError:
        return ["torch", "dense", "auto"]


def auto_choices() -> dict:
    """What `auto` picked so far, per (m, n, K, d, groups, batch bucket, threads)."""
    return dict(_AUTO)


def _check(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be (K, d) or (G, K, d), got shape {tuple(codebook.shape)}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be (m, n/d), got shape {tuple(indices.shape)}")
    n = indices.shape[1] * codebook.shape[-1]
    if x.shape[-1] != n:
        raise ValueError(f"x has {x.shape[-1]} features but indices ({tuple(indices.shape)}) x d={codebook.shape[-1]} "
                         f"need n={n}")


def _layout(indices: torch.Tensor, k: int):
    """The numba kernel's copy of `indices` (see lut_numba.lut_layout), built once per tensor and version.

    The cache holds a reference to the indices tensor itself, so its memory cannot be freed and reused
    by another tensor at the same address while the entry lives (a stale hit would give wrong results);
    an in-place change bumps `_version` and misses.
    """
    from .lut_numba import lut_layout

    key = (indices.data_ptr(), tuple(indices.shape), tuple(indices.stride()), indices.dtype, indices._version, k)
    hit = _LAYOUT_CACHE.get(key)
    if hit is None:
        if len(_LAYOUT_CACHE) >= 128:
            _LAYOUT_CACHE.pop(next(iter(_LAYOUT_CACHE)))       # drop the oldest entry
        hit = _LAYOUT_CACHE[key] = (indices, lut_layout(indices, k))
    return hit[1]


def _row_blocks(codebook: torch.Tensor, indices: torch.Tensor):
    """(codebook (K, d), indices block) pairs: one for a (K, d) codebook, G blocks of rows for (G, K, d)."""
    if codebook.dim() == 2:
        return [(codebook, indices)]
    g = codebook.shape[0]
    rows = indices.shape[0] // g
    return [(codebook[j], indices[j * rows:(j + 1) * rows]) for j in range(g)]


def _numba_2d(x2: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x2: (B, n) -> (B, m) float32 through the numba LUT; groups split rows into G blocks."""
    from .lut_numba import lut_matmul

    xf = x2.detach().to(torch.float32).contiguous()
    outs = [lut_matmul(xf, book, _layout(idx, book.shape[0])) for book, idx in _row_blocks(codebook, indices)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _dequantize_fast(codebook: torch.Tensor, indices: torch.Tensor, temporary: bool = False) -> torch.Tensor:
    """dequantize() for the dense path on CPU: numba's parallel gather when available (4-7x faster than
    torch's indexing here), else the reference.  No autograd.  temporary: write into this thread's reused
    scratch buffer (float32; overwritten by the next temporary call) instead of fresh memory."""
    if "numba" not in available_backends() or indices.device.type != "cpu":
        return dequantize(codebook, indices)
    from .lut_numba import dequantize_rows, scratch

    shape = (indices.shape[0], indices.shape[1] * codebook.shape[-1])
    out = scratch("weight", shape) if temporary else np.empty(shape, dtype=np.float32)
    blocks = _row_blocks(codebook, indices)
    rows = shape[0] // len(blocks)
    for j, (book, idx) in enumerate(blocks):                # G codebook groups: G blocks of output rows
        dequantize_rows(book, idx, out[j * rows:(j + 1) * rows])
    return torch.from_numpy(out).to(codebook.dtype)


def _dense_fast(x2: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.linear(x2, _dequantize_fast(codebook, indices, temporary=True).to(x2.dtype))


def _time_best(fn, budget: float = 0.05, max_runs: int = 5) -> float:
    """Fastest of up to max_runs timed calls after one warm-up; stops once budget seconds are spent, so a
    slow path is timed once and a fast one several times (a single sample misjudged ~1 ms calls by 20-30 %)."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(max_runs):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


def _pick(x2: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> str:
    b = x2.shape[0]
    key = (tuple(indices.shape), tuple(codebook.shape), 1 << max(0, (b - 1).bit_length()), torch.get_num_threads())
    choice = _AUTO.get(key)
    if choice is None:
        if "numba" not in available_backends():
            choice = "dense"
        else:
            t_dense = _time_best(lambda: _dense_fast(x2, codebook, indices))
            t_numba = _time_best(lambda: _numba_2d(x2, codebook, indices))
            choice = "numba" if t_numba < t_dense else "dense"
        _AUTO[key] = choice
    return choice


def _matmul_impl(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    if x.device.type != "cpu" or backend == "torch" or x2.shape[0] == 0:
        y = vq_matmul_reference(x2.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu"
                                else x2, codebook.to(x2.device), indices.to(x2.device))
    else:
        if backend == "auto":
            backend = _pick(x2.to(torch.float32), codebook, indices)
        if backend == "numba":
            y = _numba_2d(x2, codebook, indices)
        else:
            y = _dense_fast(x2.to(torch.float32), codebook, indices)
    return y.to(x.dtype).reshape(*lead, indices.shape[0])


# ---------------------------------------------------------------- custom ops (seen by FlopCounterMode, torch.compile)

@torch.library.custom_op("vqlab::vq_matmul", mutates_args=())
def _vq_matmul_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    return _matmul_impl(x, codebook, indices, backend)


@_vq_matmul_op.register_fake
def _(x, codebook, indices, backend):
    return x.new_empty((*x.shape[:-1], indices.shape[0]))


def _matmul_flops(x_shape, codebook_shape, indices_shape) -> int:
    """2 FLOPs per multiply-add of the table (n*K per row) + 1 FLOP per accumulate add (m*n/d per row)."""
    rows = 1
    for v in x_shape[:-1]:
        rows *= v
    m, s = indices_shape
    k, d = codebook_shape[-2], codebook_shape[-1]
    groups = codebook_shape[0] if len(codebook_shape) == 3 else 1
    return rows * (2 * groups * s * d * k + m * s)


@register_flop_formula(torch.ops.vqlab.vq_matmul)
def _(x_shape, codebook_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    return _matmul_flops(x_shape, codebook_shape, indices_shape)


def vq_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = x @ W.T with W[i, s*d:(s+1)*d] = codebook[indices[i, s]].

    x: (..., n) any float dtype (float16/bfloat16 computed in float32 on CPU); codebook: (K, d) or (G, K, d)
    (G groups of output rows); indices: (m, n/d) uint8/int16/int32/int64.  returns (..., m) in x's dtype on
    x's device.  backend: "torch" (the reference: torch indexing + GEMM), "dense" (dequantize with a
    parallel gather, then GEMM), "numba" (CPU LUT kernel), "auto" ("dense" or "numba", whichever was faster
    when timed once per shape and batch bucket).  On CUDA every backend runs the reference.
    Not differentiable: train through `dequantize` (what VQ layers do in training mode).
    """
    _check(x, codebook, indices, backend)
    return torch.ops.vqlab.vq_matmul(x, codebook, indices, backend)


# ---------------------------------------------------------------- convolution

def conv_weight_from_rows(rows: torch.Tensor, weight_shape, segment: str) -> torch.Tensor:
    """(out, n) dequantized rows -> conv weight (out, cin/g, kh, kw) for the two row layouts."""
    out, cin, kh, kw = weight_shape
    if segment == "input":      # rows ordered (kh, kw, cin)
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    if segment == "kernel":     # rows ordered (cin, kh, kw)
        return rows.reshape(out, cin, kh, kw)
    raise ValueError(f"segment must be 'input' or 'kernel', got {segment!r}")


def _conv_lut(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend):
    """im2col (F.unfold) in the row layout's column order, then vq_matmul per group."""
    out_c, cin_g, kh, kw = weight_shape
    b = x.shape[0]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)   # (B, C*kh*kw, L), order (c, kh, kw)
    L = cols.shape[-1]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.view(b, groups, cin_g, kh * kw, L)
    if segment == "input":
        cols = cols.transpose(2, 3)                                                    # (B, g, kh*kw, cin_g, L)
    cols = cols.reshape(b, groups, cin_g * kh * kw, L).permute(1, 0, 3, 2)            # (g, B, L, n)
    rows = out_c // groups
    g_books = codebook.dim() == 3
    outs = []
    for j in range(groups):
        idx = indices[j * rows:(j + 1) * rows]
        if g_books and codebook.shape[0] > 1:
            per = out_c // codebook.shape[0]       # codebook groups over output rows, aligned with conv groups
            book = codebook[j * rows // per:((j + 1) * rows - 1) // per + 1]
        else:
            book = codebook
        outs.append(_matmul_impl(cols[j].reshape(b * L, -1), book, idx, backend).view(b, L, rows))
    y = torch.cat(outs, dim=2)                                                         # (B, L, out)
    return y.permute(0, 2, 1).reshape(b, out_c, ho, wo)


def _conv_dense(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, fast=False):
    rows = _dequantize_fast(codebook, indices, temporary=True) if fast else dequantize(codebook, indices)
    w = conv_weight_from_rows(rows, weight_shape, segment).to(x.dtype)
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


@torch.library.custom_op("vqlab::vq_conv2d", mutates_args=())
def _vq_conv2d_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape: list[int],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, segment: str,
                  backend: str) -> torch.Tensor:
    args = (x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment)
    if x.device.type != "cpu" or backend == "torch":
        return _conv_dense(*args)
    if backend == "dense":
        return _conv_dense(*args, fast=True)
    if backend == "numba":
        return _conv_lut(*args, "numba")
    key = ("conv", tuple(x.shape[1:]), 1 << max(0, (x.shape[0] - 1).bit_length()), tuple(weight_shape),
           tuple(codebook.shape), tuple(stride), tuple(padding), tuple(dilation), groups, segment, torch.get_num_threads())
    choice = _AUTO.get(key)
    if choice is None:
        choice = "dense"
        if "numba" in available_backends():
            t_dense = _time_best(lambda: _conv_dense(*args, fast=True))
            t_lut = _time_best(lambda: _conv_lut(*args, "numba"))
            choice = "numba" if t_lut < t_dense else "dense"
        _AUTO[key] = choice
    return _conv_dense(*args, fast=True) if choice == "dense" else _conv_lut(*args, "numba")


@_vq_conv2d_op.register_fake
def _(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend):
    kh, kw = weight_shape[2], weight_shape[3]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], weight_shape[0], ho, wo))


def _conv_flops(x_shape, codebook_shape, indices_shape, weight_shape, stride, padding, dilation, groups) -> int:
    """im2col + LUT: per output position and group, a table of n*K MACs (2 FLOPs each) and m_g*n/d adds."""
    kh, kw = weight_shape[2], weight_shape[3]
    ho = (x_shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x_shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    positions = x_shape[0] * ho * wo
    m, s = indices_shape
    k, d = codebook_shape[-2], codebook_shape[-1]
    return positions * (groups * 2 * s * d * k + m * s)


@register_flop_formula(torch.ops.vqlab.vq_conv2d)
def _(x_shape, codebook_shape, indices_shape, weight_shape, stride, padding, dilation, groups, *args,
      out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, codebook_shape, indices_shape, weight_shape, stride, padding, dilation, groups)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def vq_conv2d(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape, stride=1, padding=0,
              dilation=1, groups: int = 1, segment: str = "input", bias: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """2-D convolution with a VQ weight.  x: (B, C, H, W) -> (B, out, Ho, Wo).

    weight_shape: (out, C/groups, kh, kw); indices: (out, n/d) with n = C/groups*kh*kw in the row layout
    `segment` ("input": (kh, kw, cin) order, "kernel": (cin, kh, kw)).  padding: int or pair (no strings).
    backend as in `vq_matmul`: "numba" runs im2col + the LUT kernel, "torch"/"dense" dequantize + F.conv2d.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if segment not in ("input", "kernel"):
        raise ValueError(f"segment must be 'input' or 'kernel', got {segment!r}")
    out_c, cin_g, kh, kw = (int(v) for v in weight_shape)
    if indices.shape[0] != out_c or indices.shape[1] * codebook.shape[-1] != cin_g * kh * kw:
        raise ValueError(f"indices {tuple(indices.shape)} with d={codebook.shape[-1]} do not fit weight shape "
                         f"{tuple(weight_shape)}")
    y = torch.ops.vqlab.vq_conv2d(x, codebook, indices, [out_c, cin_g, kh, kw], _pair(stride), _pair(padding),
                                  _pair(dilation), int(groups), segment, backend)
    return y if bias is None else y + bias.view(1, -1, 1, 1).to(y.dtype)
