"""VQ matmul / conv as torch custom ops over the registered kernel backends, plus their FLOP formulas.

One signature for every backend (public meaning W[i, s*d:(s+1)*d] = codebook[indices[i, s]]):
    vq_matmul(x (..., n), codebook (K, d) | (G, K, d), indices (m, n/d)) -> (..., m)
The reference (dequantize + GEMM, backend "torch") is the correctness oracle and the fallback on every device.
Native backends live in `registry` ("dense": numba's parallel gather + GEMM, "numba": the LUT kernel, "simd":
the approximate register-table kernel in C, opt-in only); numba is imported only when one of them runs.  `auto` times the candidates once per shape/batch bucket and keeps the
faster (CPU), unless `set_backend` / $VQLAB_BACKEND pins one; on CUDA the reference runs.

Native code reads a checked private copy of the indices (`checked.checked_indices`), checked once per tensor
contents and compared with the caller's bytes on every call -- except a backend with a `direct` entry ("simd"),
which, for contiguous uint8 CPU indices, reads the caller's tensor itself and range-checks every index byte on
every call, memory-safe whatever the values (see `registry.KernelBackend.direct`).
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .checked import CheckedIndices, checked_indices, clear_checked
from .reference import INDEX_DTYPES, check_codebook_groups, dequantize, vq_matmul_reference
from .registry import (_REGISTRY, KernelBackend, available_backends, backend_names, get_backend, pinned_backend,
                       register_backend, set_backend)

__all__ = ["vq_matmul", "vq_conv2d", "available_backends", "auto_choices", "conv_weight_from_rows",
           "matmul_flops", "conv_flops", "clear_caches", "set_backend"]

_AUTO: dict = {}           # shape/batch key -> backend name


def auto_choices() -> dict:
    """What `auto` picked so far, per ((m, S), codebook shape, batch bucket, threads, candidates)."""
    return dict(_AUTO)


def clear_caches() -> None:
    """Forget every checked index copy, kernel layout and `auto` timing decision."""
    clear_checked()
    _AUTO.clear()


@functools.cache
def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- argument checks

def _check_backend(backend: str) -> None:
    if backend not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")


def _check_weight(codebook: torch.Tensor, indices: torch.Tensor) -> None:
    """Shapes and dtypes of a (codebook, indices) pair; the index values are checked later, once per tensor."""
    if not isinstance(codebook, torch.Tensor) or codebook.dim() not in (2, 3) or 0 in codebook.shape:
        raise ValueError(f"codebook must be a non-empty (K, d) or (G, K, d) tensor, got "
                         f"{tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__}")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook must be a float tensor, got {codebook.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D (m, n/d) tensor, got "
                         f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"indices must have an integer dtype {[str(t) for t in INDEX_DTYPES]}, got {indices.dtype}")
    if indices.shape[0] == 0 or indices.shape[1] == 0:
        raise ValueError(f"indices must have at least one row and one segment, got shape {tuple(indices.shape)}")
    check_codebook_groups(codebook, indices.shape[0])


def _check_x(x: torch.Tensor, min_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"x must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def _check(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> None:
    _check_backend(backend)
    _check_x(x, 1)
    _check_weight(codebook, indices)
    n = indices.shape[1] * codebook.shape[-1]
    if x.shape[-1] != n:
        raise ValueError(f"x has {x.shape[-1]} features but indices ({tuple(indices.shape)}) x d={codebook.shape[-1]} "
                         f"need n={n}")


# ---------------------------------------------------------------- the built-in native backends

def _group_pieces(rows: int, groups: int) -> list[tuple[int, int, int]]:
    """G equal consecutive row blocks (a, b, g) of `rows` output rows."""
    per = rows // groups
    return [(g * per, (g + 1) * per, g) for g in range(groups)]


def _book(codebook: torch.Tensor, g: int) -> torch.Tensor:
    return codebook[g] if codebook.dim() == 3 else codebook


def _numba_matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """The LUT kernel: xf (B, n) float32, book (K, d) -> (B, m)."""
    from .lut_numba import lut_layout, lut_matmul

    k = book.shape[0]
    return lut_matmul(xf, book, checked.layout(f"numba/{k}", lambda c: lut_layout(c, k)))


def _dequantize_checked(codebook: torch.Tensor, checked: CheckedIndices, temporary: bool) -> torch.Tensor:
    """Dense (m, n) float32 rows from the checked copy by numba's parallel gather (no autograd).
    temporary: write into this thread's reused scratch buffer (overwritten by the next temporary call; only
    for results that never reach the caller) instead of fresh memory."""
    from .lut_numba import dequantize_rows, scratch

    idx = checked.copy
    shape = (idx.shape[0], idx.shape[1] * codebook.shape[-1])
    out = scratch("weight", shape) if temporary else np.empty(shape, dtype=np.float32)
    for a, b, g in _group_pieces(shape[0], codebook.shape[0] if codebook.dim() == 3 else 1):
        dequantize_rows(_book(codebook, g), idx[a:b], out[a:b])
    return torch.from_numpy(out)


def _dense_matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """Dequantize (parallel gather into a reused buffer) + one GEMM: xf (B, n), book (K, d) -> (B, m)."""
    return F.linear(xf, _dequantize_checked(book, checked, temporary=True))


def _dense_conv(x, codebook, checked, weight_shape, stride, padding, dilation, groups, segment):
    w = conv_weight_from_rows(_dequantize_checked(codebook, checked, temporary=True), weight_shape, segment)
    return F.conv2d(x, w.to(x.dtype), None, stride, padding, dilation, groups)


register_backend(KernelBackend("dense", matmul=_dense_matmul, conv=_dense_conv, available=_numba_available,
                               description="numba's parallel gather rebuilds the float weight, then one GEMM"))
register_backend(KernelBackend("numba", matmul=_numba_matmul, available=_numba_available,
                               description="lookup-table kernel: per input segment the K dot products once, "
                                           "then one table read per output and segment"))


def _dequantize_fast(codebook: torch.Tensor, indices: torch.Tensor, temporary: bool = False) -> torch.Tensor:
    """dequantize() on CPU by numba's parallel gather over the checked copy of `indices` when available
    (4-7x faster than torch's indexing here), else the reference.  No autograd."""
    if not _numba_available() or indices.device.type != "cpu":
        return dequantize(codebook, indices)
    _check_weight(codebook, indices)
    return _dequantize_checked(codebook, checked_indices(indices, codebook.shape[-2]), temporary).to(codebook.dtype)


# ---------------------------------------------------------------- dispatch

def _by_groups(be: KernelBackend, xf: torch.Tensor, codebook: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """A backend's matmul over G codebook groups (G blocks of output rows), concatenated: (B, m)."""
    groups = codebook.shape[0] if codebook.dim() == 3 else 1
    outs = [be.matmul(xf, _book(codebook, g), checked.rows(a, b)) for a, b, g in _group_pieces(checked.copy.shape[0], groups)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


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


def _candidates(k: int, d: int) -> list[str]:
    return [n for n in available_backends()[1:-1]
            if get_backend(n).auto and get_backend(n).exact and get_backend(n).supports(k, d)]


def _resolve(backend: str, k: int, d: int, key, run) -> str:
    """The native backend to run: a named one, the pinned one, or auto's timed choice for `key`.
    run(name): runs that backend once (called only while timing a new key)."""
    if backend == "auto":
        backend = pinned_backend() or "auto"
    if backend != "auto":
        return backend if get_backend(backend).supports(k, d) else "dense"
    names = _candidates(k, d)
    key = (*key, tuple(names))
    choice = _AUTO.get(key)
    if choice is None:
        choice = names[0] if len(names) == 1 else min(names, key=lambda n: _time_best(lambda: run(n)))
        _AUTO[key] = choice
    return choice


def _uses_reference(x: torch.Tensor, backend: str) -> bool:
    """The torch reference runs on CUDA, for float64 inputs (exact in float64; the native kernels compute in
    float32), for backend "torch" (or "auto" pinned to it), and when the asked backend is not available here."""
    if backend == "auto":
        backend = pinned_backend() or "auto"
    native = available_backends(approximate=True)[1:-1]
    return (x.device.type != "cpu" or x.dtype == torch.float64 or backend == "torch"
            or not native or (backend != "auto" and backend not in native))


def _direct_backend(backend: str, codebook: torch.Tensor, indices: torch.Tensor) -> KernelBackend | None:
    """The backend named (or pinned) for this call when it reads the caller's indices itself (`direct`), is
    available and supports (K, d), and the indices are a contiguous uint8 CPU tensor; else None (checked path)."""
    name = pinned_backend() if backend == "auto" else backend
    be = _REGISTRY.get(name) if name is not None else None
    if (be is None or be.direct is None or indices.dtype != torch.uint8 or indices.device.type != "cpu"
            or not indices.is_contiguous() or not be.supports(codebook.shape[-2], codebook.shape[-1])
            or not be.available()):
        return None
    return be


def _float32(x2: torch.Tensor) -> torch.Tensor:
    """x2 as a contiguous float32 tensor without autograd history (no copy when it already is one)."""
    if x2.requires_grad:
        x2 = x2.detach()
    return x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()


def _direct_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor | None:
    """vq_matmul through a backend's direct entry (the caller's uint8 indices, read and range-checked by the
    kernel on every call), or None when this call does not take that path."""
    if x.device.type != "cpu" or x.dtype == torch.float64:
        return None                                          # the reference runs (see _uses_reference)
    be = _direct_backend(backend, codebook, indices)
    if be is None:
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = be.direct(_float32(x2), codebook, indices)
    if y is None:
        return None
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], indices.shape[0])


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether a call may skip the custom op's dispatch (about 20-40 us a call): plain tensors, no dispatch or
    function mode (FlopCounterMode, ...), no functorch transform, not tracing or compiling, no gradient asked for.
    The op is then nothing but a redispatch to _matmul_impl."""
    C = torch._C
    return (not C._len_torch_dispatch_stack() and not C._is_torch_function_mode_enabled()
            and C._functorch.peek_interpreter_stack() is None and C._get_tracing_state() is None
            and not torch.compiler.is_compiling()
            and all(type(t) is torch.Tensor for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _matmul_impl(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    reference = _uses_reference(x, backend)
    if not reference:
        y = _direct_matmul(x, codebook, indices, backend)   # reads (and range-checks) the caller's indices itself
        if y is not None:
            return y
    if reference:
        half_cpu = x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu"
        y = vq_matmul_reference(x2.to(torch.float32) if half_cpu else x2, codebook.to(x2.device), indices.to(x2.device))
    else:
        checked = checked_indices(indices, codebook.shape[-2])      # check + private copy, once per tensor content
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, indices.shape[0]), dtype=torch.float32)
        else:
            xf = _float32(x2)
            k, d = codebook.shape[-2], codebook.shape[-1]
            key = (tuple(indices.shape), tuple(codebook.shape), 1 << max(0, (x2.shape[0] - 1).bit_length()),
                   torch.get_num_threads())
            name = _resolve(backend, k, d, key, lambda n: _by_groups(get_backend(n), xf, codebook, checked))
            y = _by_groups(get_backend(name), xf, codebook, checked)
    return y.to(x.dtype).reshape(*lead, indices.shape[0])


# ---------------------------------------------------------------- FLOPs: one formula per op, used by FlopCounterMode and count_flops

def lut_flops(rows: int, m: int, segments: int, d: int, k: int, tables: int) -> tuple[int, int]:
    """(table FLOPs, accumulate FLOPs) of a lookup-table product.

    rows input vectors, each with `tables` tables of segments*d*K multiply-adds (2 FLOPs each: every input
    segment against all K codewords of one codebook), then one add per output and segment (m * segments).
    """
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


def conv_flops(out_shape, codebook_shape, indices_shape, groups: int) -> tuple[int, int]:
    """(table, accumulate) FLOPs of vq_conv2d as run here (im2col + LUT): out_shape (B, out, Ho, Wo)."""
    b, out_c, ho, wo = out_shape
    m, s = indices_shape
    g = codebook_shape[0] if len(codebook_shape) == 3 else 1
    return lut_flops(b * ho * wo, m, s, codebook_shape[-1], codebook_shape[-2], table_count(groups, g))


# ---------------------------------------------------------------- custom ops (seen by FlopCounterMode, torch.compile)

@torch.library.custom_op("vqlab::vq_matmul", mutates_args=())
def _vq_matmul_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    return _matmul_impl(x, codebook, indices, backend)


@_vq_matmul_op.register_fake
def _(x, codebook, indices, backend):
    return x.new_empty((*x.shape[:-1], indices.shape[0]))


@register_flop_formula(torch.ops.vqlab.vq_matmul)
def _(x_shape, codebook_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    return sum(matmul_flops(x_shape, codebook_shape, indices_shape))


def vq_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = x @ W.T with W[i, s*d:(s+1)*d] = codebook[indices[i, s]].

    x: (..., n) float (float16/bfloat16 computed in float32 on CPU; float64 runs the reference in float64);
    codebook: (K, d) or (G, K, d) (G groups of output rows, G must divide m); indices: (m, n/d)
    uint8/int8/int16/int32/int64 with every value in [0, K).  returns (..., m) in x's dtype on x's device.
    backend: "torch" (the reference: torch indexing + GEMM), a registered native backend ("dense": dequantize
    with a parallel gather, then GEMM; "numba": CPU LUT kernel; "simd": approximate uint8-table kernel for
    K <= 16, opt-in only, see `vqlab.kernels.simd`; see `vqlab.kernels.registry`), or "auto" (the
    backend pinned by `set_backend`/$VQLAB_BACKEND, else the fastest candidate, timed once per shape and batch
    bucket).  On CUDA every backend runs the reference.
    raises: ValueError for an index outside [0, K) (on every backend, checked once per index tensor's
    contents), non-integer indices, a G not dividing m, or mismatched shapes; TypeError for a non-float x.
    Not differentiable: train through `dequantize` (what VQ layers do in training mode).
    """
    _check(x, codebook, indices, backend)
    if _plain_eager(x, codebook, indices):                  # the custom op would only redispatch: skip it
        y = _direct_matmul(x, codebook, indices, backend)
        if y is not None:
            return y
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


def _conv_out_hw(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = weight_shape[2], weight_shape[3]
    ho = (x_shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x_shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


class _RawRows:
    """The caller's contiguous uint8 indices, for a backend's `direct` entry, sliced by output rows like
    `CheckedIndices.rows` (a block of rows of a contiguous tensor is contiguous)."""

    def __init__(self, indices: torch.Tensor):
        self.indices = indices

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.indices[a:b]


class _Declined(Exception):
    """A backend's direct entry returned None (no native kernel here): take the checked-copy path."""


def _conv_im2col(be: KernelBackend, x, codebook, checked, weight_shape, stride, padding, dilation, groups, segment):
    """im2col (F.unfold) in the row layout's column order, then the backend's matmul per (conv group,
    codebook group) block of output rows (its direct entry when `checked` is the caller's raw indices)."""
    raw = isinstance(checked, _RawRows)
    out_c, cin_g, kh, kw = weight_shape
    b = x.shape[0]
    cols = F.unfold(x.to(torch.float32), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    L = cols.shape[-1]
    ho, wo = _conv_out_hw(x.shape, weight_shape, stride, padding, dilation)
    cols = cols.view(b, groups, cin_g, kh * kw, L)
    if segment == "input":
        cols = cols.transpose(2, 3)                                                    # (B, g, kh*kw, cin_g, L)
    cols = cols.reshape(b, groups, cin_g * kh * kw, L).permute(1, 0, 3, 2)            # (g, B, L, n)
    rows = out_c // groups
    per_book = out_c // (codebook.shape[0] if codebook.dim() == 3 else 1)
    outs = []
    for j in range(groups):
        xf = cols[j].reshape(b * L, -1).contiguous()
        cuts = sorted({j * rows, (j + 1) * rows} | {c for c in range(0, out_c, per_book) if j * rows < c < (j + 1) * rows})
        for a, e in zip(cuts, cuts[1:]):
            y = (be.direct if raw else be.matmul)(xf, _book(codebook, a // per_book), checked.rows(a, e))
            if y is None:
                raise _Declined
            outs.append(y.view(b, L, e - a))
    y = torch.cat(outs, dim=2)                                                         # (B, L, out)
    return y.permute(0, 2, 1).reshape(b, out_c, ho, wo).to(x.dtype)


def _conv_with(name: str, *args):
    be = get_backend(name)
    return (be.conv or (lambda *a: _conv_im2col(be, *a)))(*args)


@torch.library.custom_op("vqlab::vq_conv2d", mutates_args=())
def _vq_conv2d_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape: list[int],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, segment: str,
                  backend: str) -> torch.Tensor:
    if _uses_reference(x, backend):
        w = conv_weight_from_rows(dequantize(codebook, indices), weight_shape, segment).to(x.dtype)
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    be = _direct_backend(backend, codebook, indices)
    if be is not None and be.conv is None:
        try:
            return _conv_im2col(be, x, codebook, _RawRows(indices), weight_shape, stride, padding, dilation, groups,
                                segment)
        except _Declined:
            pass
    checked = checked_indices(indices, codebook.shape[-2])
    args = (x, codebook, checked, weight_shape, stride, padding, dilation, groups, segment)
    k, d = codebook.shape[-2], codebook.shape[-1]
    key = ("conv", tuple(x.shape[1:]), 1 << max(0, (x.shape[0] - 1).bit_length()), tuple(weight_shape),
           tuple(codebook.shape), tuple(stride), tuple(padding), tuple(dilation), groups, segment, torch.get_num_threads())
    name = _resolve(backend, k, d, key, lambda n: _conv_with(n, *args))
    return _conv_with(name, *args)


@_vq_conv2d_op.register_fake
def _(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend):
    ho, wo = _conv_out_hw(x.shape, weight_shape, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight_shape[0], ho, wo))


@register_flop_formula(torch.ops.vqlab.vq_conv2d)
def _(x_shape, codebook_shape, indices_shape, weight_shape, stride, padding, dilation, groups, *args,
      out_shape=None, **kwargs) -> int:
    ho, wo = _conv_out_hw(x_shape, weight_shape, stride, padding, dilation)
    return sum(conv_flops((x_shape[0], weight_shape[0], ho, wo), codebook_shape, indices_shape, groups))


def _int_pair(name: str, v, low: int) -> list[int]:
    """An int or a pair of ints (each >= low) -> [a, b]; anything else (e.g. padding='same') raises."""
    pair = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) or t < low for t in pair)):
        hint = " (VQConv2d resolves 'same'/'valid' padding before calling vq_conv2d)" if isinstance(v, str) else ""
        raise ValueError(f"vq_conv2d: {name} must be an int >= {low} or a pair of them, got {v!r}{hint}")
    return [int(t) for t in pair]


def vq_conv2d(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape, stride=1, padding=0,
              dilation=1, groups: int = 1, segment: str = "input", bias: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """2-D convolution with a VQ weight.  x: (B, C, H, W) -> (B, out, Ho, Wo).

    weight_shape: (out, C/groups, kh, kw); indices: (out, n/d) with n = C/groups*kh*kw in the row layout
    `segment` ("input": (kh, kw, cin) order, "kernel": (cin, kh, kw)).  padding: int or pair (no strings).
    backend as in `vq_matmul`: "numba" runs im2col + the LUT kernel, "torch"/"dense" dequantize + F.conv2d.
    Indices are checked as in `vq_matmul` (ValueError for a value outside [0, K)).
    """
    _check_backend(backend)
    if segment not in ("input", "kernel"):
        raise ValueError(f"segment must be 'input' or 'kernel', got {segment!r}")
    _check_x(x, 4)
    if x.dim() != 4:
        raise ValueError(f"vq_conv2d: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    _check_weight(codebook, indices)
    out_c, cin_g, kh, kw = (int(v) for v in weight_shape)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out_c % groups or x.shape[1] != cin_g * groups:
        raise ValueError(f"vq_conv2d: groups={groups!r} must divide out={out_c} and x's {x.shape[1]} channels must "
                         f"equal groups * C/groups = {groups} * {cin_g}")
    if indices.shape[0] != out_c or indices.shape[1] * codebook.shape[-1] != cin_g * kh * kw:
        raise ValueError(f"indices {tuple(indices.shape)} with d={codebook.shape[-1]} do not fit weight shape "
                         f"{tuple(weight_shape)}")
    y = torch.ops.vqlab.vq_conv2d(x, codebook, indices, [out_c, cin_g, kh, kw], _int_pair("stride", stride, 1),
                                  _int_pair("padding", padding, 0), _int_pair("dilation", dilation, 1), int(groups),
                                  segment, backend)
    return y if bias is None else y + bias.view(1, -1, 1, 1).to(y.dtype)
