"""VQ matmul / conv as torch custom ops over the registered kernel backends (and their FLOP formulas).

One signature for every backend (public meaning W[i, s*d:(s+1)*d] = codebook[indices[i, s]]):
    vq_matmul(x (..., n), codebook (K, d) | (G, K, d), indices (m, n/d)) -> (..., m)
    vq_conv2d(x (B, C, H, W), codebook, indices (out, n/d), weight_shape, stride, padding, dilation, groups)
The reference (dequantize + GEMM, backend "torch") is the correctness oracle and the fallback on every device.
Arguments are checked here; `route.route` decides the path of each call (reference / direct / checked copy),
`route.choose` the backend of a checked call; the adapters are in `backends.py` and `simd.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..dtypes import INDEX_DTYPES
from .backends import as_float32, conv_weight_from_rows, group_blocks, group_book
from .checked import CheckedIndices, checked_indices
from .cost import Work
from .flops import conv_flops, conv_out_hw, matmul_flops, table_count
from .reference import check_codebook_groups, dequantize, vq_matmul_reference
from .registry import KernelBackend, backend_names, get_backend
from .route import choose, route

__all__ = ["vq_matmul", "vq_conv2d"]


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


def int_pair(name: str, v, low: int) -> list[int]:
    """An int or a pair of ints (each >= low) -> [a, b]; anything else (e.g. padding='same') raises."""
    pair = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) or t < low for t in pair)):
        hint = " (the layer resolves 'same'/'valid' padding before calling vq_conv2d)" if isinstance(v, str) else ""
        raise ValueError(f"vq_conv2d: {name} must be an int >= {low} or a pair of them, got {v!r}{hint}")
    return [int(t) for t in pair]


# ---------------------------------------------------------------- matmul

def by_groups(be: KernelBackend, xf: torch.Tensor, codebook: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """A backend's matmul over G codebook groups (G blocks of output rows), concatenated: (B, m)."""
    groups = codebook.shape[0] if codebook.dim() == 3 else 1
    outs = [be.matmul(xf, group_book(codebook, g), checked.rows(a, b))
            for a, b, g in group_blocks(checked.copy.shape[0], groups)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def batch_bucket(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


def direct_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, be: KernelBackend) -> torch.Tensor:
    """vq_matmul through a backend's direct entry (the caller's uint8 indices, read and range-checked by the
    kernel on every call)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = be.direct(as_float32(x2), codebook, indices)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], indices.shape[0])


def _matmul_impl(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    r = route(x, codebook, indices, backend)
    if r.path == "direct":
        return direct_matmul(x, codebook, indices, r.backend)
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    if r.path == "reference":
        half_cpu = x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu"
        y = vq_matmul_reference(x2.to(torch.float32) if half_cpu else x2, codebook.to(x2.device), indices.to(x2.device))
    else:
        checked = checked_indices(indices, codebook.shape[-2])      # check + private copy, once per tensor content
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, indices.shape[0]), dtype=torch.float32)
        else:
            y = by_groups(get_backend(matmul_choice(x2.shape[0], codebook, indices, r.name)), as_float32(x2),
                           codebook, checked)
    return y.to(x.dtype).reshape(*lead, indices.shape[0])


def matmul_choice(rows: int, codebook: torch.Tensor, indices: torch.Tensor, name: str) -> str:
    """The backend a "checked" matmul route of `rows` input rows runs (`route.choose`, kept per shape and bucket)."""
    k, d = codebook.shape[-2], codebook.shape[-1]
    bucket = batch_bucket(rows)
    key = (tuple(indices.shape), tuple(codebook.shape), bucket, torch.get_num_threads())
    groups = codebook.shape[0] if codebook.dim() == 3 else 1
    return choose(name, k, d, key, Work(bucket, indices.shape[0], indices.shape[1], d, k, groups))


@torch.library.custom_op("vqlab::vq_matmul", mutates_args=())
def _vq_matmul_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    return _matmul_impl(x, codebook, indices, backend)


@_vq_matmul_op.register_fake
def _(x, codebook, indices, backend):
    return x.new_empty((*x.shape[:-1], indices.shape[0]))


def _matmul_setup(ctx, inputs, output) -> None:
    x, codebook, indices, _ = inputs
    ctx.save_for_backward(x, codebook, indices)


def _reference_grads(ctx, grad: torch.Tensor, forward) -> tuple:
    """(grad x, grad codebook) of the exact product `forward(x, codebook)` (the reference, whatever backend ran the
    call), recomputed under autograd; None for an input that needs none."""
    x, codebook, _ = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    with torch.enable_grad():
        xr = x.detach().requires_grad_(need_x)
        br = codebook.detach().requires_grad_(need_b)
        y = forward(xr, br)
        wanted = [t for t in (xr, br) if t.requires_grad]
        got = iter(torch.autograd.grad(y, wanted, grad.to(y.dtype)) if wanted else ())
    gx = next(got).to(x.dtype) if need_x else None
    gb = next(got).to(codebook.dtype) if need_b else None
    return gx, gb


def _matmul_backward(ctx, grad: torch.Tensor):
    (_, _, indices) = ctx.saved_tensors
    gx, gb = _reference_grads(ctx, grad, lambda x, b: vq_matmul_reference(x, b.to(x.device), indices.to(x.device)))
    return gx, gb, None, None


torch.library.register_autograd("vqlab::vq_matmul", _matmul_backward, setup_context=_matmul_setup)


@register_flop_formula(torch.ops.vqlab.vq_matmul)
def _(x_shape, codebook_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    return sum(matmul_flops(x_shape, codebook_shape, indices_shape))


_PLAIN = (torch.Tensor, torch.nn.Parameter)   # a Parameter's torch function handling is disabled: a plain tensor


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether a call may skip the custom op's dispatch (about 20-40 us a call, and on its first call in a process
    the import of torch._dynamo, which the op's dispatch wraps it in: 1-2 s on a quiet 2-core machine, 15 s on a
    busy one): plain tensors, no dispatch or function mode (FlopCounterMode, ...), no functorch transform, not
    tracing or compiling, no gradient asked for.  The op is then nothing but a redispatch to its implementation
    (`_matmul_impl`, `_conv_impl`)."""
    C = torch._C
    return (not C._len_torch_dispatch_stack() and not C._is_torch_function_mode_enabled()
            and C._functorch.peek_interpreter_stack() is None and C._get_tracing_state() is None
            and not torch.compiler.is_compiling()
            and all(type(t) in _PLAIN for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def vq_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = x @ W.T with W[i, s*d:(s+1)*d] = codebook[indices[i, s]].

    x: (..., n) float (float16/bfloat16 computed in float32 on CPU; float64 runs the reference in float64);
    codebook: (K, d) or (G, K, d) (G codebook groups of output rows, G must divide m); indices: (m, n/d)
    uint8/int8/int16/int32/int64 with every value in [0, K).  returns (..., m) in x's dtype on x's device.
    backend: "torch" (the reference: torch indexing + GEMM), a registered native backend ("dense": dequantize
    with a parallel gather, then GEMM; "numba": CPU LUT kernel; "simd": approximate uint8-table kernel for
    K <= 16, opt-in only, see `vqlab.kernels.simd`; see `vqlab.kernels.registry`), or "auto" (the
    backend pinned by `set_backend`/$VQLAB_BACKEND, else the candidate the cost model predicts fastest for this
    shape and batch bucket, see `vqlab.kernels.cost`; nothing is timed).  On CUDA every backend runs the reference.
    raises: ValueError for an index outside [0, K) (on every backend, checked once per index tensor's
    contents), non-integer indices, a G not dividing m, or mismatched shapes; TypeError for a non-float x.
    Differentiable w.r.t. x and codebook: the gradients of the exact product x @ dequantize(codebook, indices).T,
    whichever backend computed the forward (saliency through an eval-mode model, fine-tuning with frozen
    BatchNorm); training mode's layers rebuild the weight with `dequantize` instead.
    """
    _check_backend(backend)
    _check_x(x, 1)
    _check_weight(codebook, indices)
    n = indices.shape[1] * codebook.shape[-1]
    if x.shape[-1] != n:
        raise ValueError(f"x has {x.shape[-1]} features but indices ({tuple(indices.shape)}) x d={codebook.shape[-1]} "
                         f"need n={n}")
    if plain_eager(x, codebook, indices):                  # the custom op would only redispatch: skip it
        return _matmul_impl(x, codebook, indices, backend)
    return torch.ops.vqlab.vq_matmul(x, codebook, indices, backend)


# ---------------------------------------------------------------- convolution

class RawRows:
    """The caller's contiguous uint8 indices, for a backend's `direct` entry, sliced by output rows like
    `CheckedIndices.rows` (a block of rows of a contiguous tensor is contiguous)."""

    def __init__(self, indices: torch.Tensor):
        self.indices = indices

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.indices[a:b]


def conv_im2col(entry, x, codebook, blocks, weight_shape, stride, padding, dilation, groups, segment):
    """im2col (F.unfold) in the row layout's column order, then entry(xf, book, rows) per (conv group,
    codebook group) block of output rows; `blocks` slices the index rows (`CheckedIndices` or `RawRows`)."""
    out_c, cin_g, kh, kw = weight_shape
    b = x.shape[0]
    cols = F.unfold(x.to(torch.float32), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    L = cols.shape[-1]
    ho, wo = conv_out_hw(x.shape, (kh, kw), stride, padding, dilation)
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
            outs.append(entry(xf, group_book(codebook, a // per_book), blocks.rows(a, e)).view(b, L, e - a))
    y = torch.cat(outs, dim=2)                                                         # (B, L, out)
    return y.permute(0, 2, 1).reshape(b, out_c, ho, wo).to(x.dtype)


def conv_with(name: str, x, codebook, checked, *args):
    be = get_backend(name)
    if be.conv is not None:
        return be.conv(x, codebook, checked, *args)
    return conv_im2col(be.matmul, x, codebook, checked, *args)


@torch.library.custom_op("vqlab::vq_conv2d", mutates_args=())
def _vq_conv2d_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape: list[int],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, segment: str,
                  backend: str) -> torch.Tensor:
    return _conv_impl(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend)


def _conv_impl(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend):
    geometry = (weight_shape, stride, padding, dilation, groups, segment)
    r = route(x, codebook, indices, backend)
    if r.path == "reference":
        w = conv_weight_from_rows(dequantize(codebook, indices), weight_shape, segment).to(x.dtype)
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    if x.shape[0] == 0:                                      # an empty batch: nothing for a native kernel to do
        ho, wo = conv_out_hw(x.shape, weight_shape[2:], stride, padding, dilation)
        return x.new_zeros((0, weight_shape[0], ho, wo))
    if r.path == "direct":
        return conv_im2col(r.backend.direct, x, codebook, RawRows(indices), *geometry)
    checked = checked_indices(indices, codebook.shape[-2])
    return conv_with(conv_choice(x, codebook, indices, geometry, r.name), x, codebook, checked, *geometry)


def conv_choice(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, geometry: tuple, name: str) -> str:
    """The backend a "checked" convolution route runs (`route.choose`, kept per shape and batch bucket).
    geometry: (weight_shape, stride, padding, dilation, groups, segment) as `_conv_impl` takes them."""
    weight_shape, stride, padding, dilation, groups, segment = geometry
    key = ("conv", tuple(x.shape[1:]), batch_bucket(x.shape[0]), tuple(weight_shape), tuple(codebook.shape),
           tuple(stride), tuple(padding), tuple(dilation), groups, segment, torch.get_num_threads())
    ho, wo = conv_out_hw(x.shape, weight_shape[2:], stride, padding, dilation)
    books = codebook.shape[0] if codebook.dim() == 3 else 1
    work = Work(batch_bucket(x.shape[0]) * ho * wo, weight_shape[0], indices.shape[1], codebook.shape[-1],
                codebook.shape[-2], table_count(groups, books), im2col=True)
    return choose(name, codebook.shape[-2], codebook.shape[-1], key, work)


@_vq_conv2d_op.register_fake
def _(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, backend):
    ho, wo = conv_out_hw(x.shape, weight_shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight_shape[0], ho, wo))


def _conv_setup(ctx, inputs, output) -> None:
    x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, _ = inputs
    ctx.save_for_backward(x, codebook, indices)
    ctx.geometry = (weight_shape, stride, padding, dilation, groups, segment)


def _conv_backward(ctx, grad: torch.Tensor):
    (_, _, indices) = ctx.saved_tensors
    weight_shape, stride, padding, dilation, groups, segment = ctx.geometry

    def forward(x, book):
        w = conv_weight_from_rows(dequantize(book.to(x.device), indices.to(x.device)), weight_shape, segment)
        return F.conv2d(x, w.to(x.dtype), None, stride, padding, dilation, groups)
    gx, gb = _reference_grads(ctx, grad, forward)
    return gx, gb, None, None, None, None, None, None, None, None


torch.library.register_autograd("vqlab::vq_conv2d", _conv_backward, setup_context=_conv_setup)


@register_flop_formula(torch.ops.vqlab.vq_conv2d)
def _(x_shape, codebook_shape, indices_shape, weight_shape, stride, padding, dilation, groups, *args,
      out_shape=None, **kwargs) -> int:
    ho, wo = conv_out_hw(x_shape, weight_shape[2:], stride, padding, dilation)
    return sum(conv_flops((x_shape[0], weight_shape[0], ho, wo), codebook_shape, indices_shape, groups))


def vq_conv2d(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape, stride=1, padding=0,
              dilation=1, groups: int = 1, segment: str = "input", bias: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """2-D convolution with a VQ weight.  x: (B, C, H, W) -> (B, out, Ho, Wo).

    weight_shape: (out, C/groups, kh, kw); indices: (out, n/d) with n = C/groups*kh*kw in the row layout
    `segment` ("input": (kh, kw, cin) order, "kernel": (cin, kh, kw)).  groups: the convolution's groups (not
    codebook groups, which are the codebook's first dimension).  padding: int or pair (no strings).
    backend as in `vq_matmul`: "numba" runs im2col + the LUT kernel, "torch"/"dense" dequantize + F.conv2d.
    Indices are checked as in `vq_matmul` (ValueError for a value outside [0, K)).  Differentiable w.r.t. x and
    codebook like `vq_matmul` (the exact convolution's gradients).
    """
    _check_backend(backend)
    if segment not in ("input", "kernel"):
        raise ValueError(f"segment must be 'input' or 'kernel', got {segment!r}")
    _check_x(x, 4)
    if x.dim() != 4:
        raise ValueError(f"vq_conv2d: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    _check_weight(codebook, indices)
    if (not isinstance(weight_shape, (tuple, list, torch.Size)) or len(weight_shape) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in weight_shape)):
        raise ValueError(f"vq_conv2d: weight_shape must be 4 positive ints (out, C/groups, kh, kw), got "
                         f"{weight_shape!r}")
    out_c, cin_g, kh, kw = (int(v) for v in weight_shape)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out_c % groups or x.shape[1] != cin_g * groups:
        raise ValueError(f"vq_conv2d: groups={groups!r} must divide out={out_c} and x's {x.shape[1]} channels must "
                         f"equal groups * C/groups = {groups} * {cin_g}")
    if indices.shape[0] != out_c or indices.shape[1] * codebook.shape[-1] != cin_g * kh * kw:
        raise ValueError(f"indices {tuple(indices.shape)} with d={codebook.shape[-1]} do not fit weight shape "
                         f"{tuple(weight_shape)}")
    args = (x, codebook, indices, [out_c, cin_g, kh, kw], int_pair("stride", stride, 1),
            int_pair("padding", padding, 0), int_pair("dilation", dilation, 1), int(groups), segment, backend)
    y = _conv_impl(*args) if plain_eager(x, codebook, indices) else torch.ops.vqlab.vq_conv2d(*args)
    return y if bias is None else y + bias.view(1, -1, 1, 1).to(y.dtype)
