"""VQ codes in the "simd" kernel's own 4-bit layout, for fast CPU inference with K <= 16 codewords.

    report = vqlab.pack_simd_(model)   # every eligible VQ linear: its code becomes a SimdCode, in place
    with torch.no_grad():
        y = model(x)                   # CPU: the register-table kernel (vqlab.kernels.simd) on the packed code

Why a code of its own: backend "simd" on a VQ layer reads the (m, S) uint8 indices row-major and in place on every
call and must transpose them in registers; the kernel is twice as fast on its own interleaved layout (4 bits per
index, one 32-byte load per two shuffles).  A cached copy in that layout would go stale when the indices are
written behind torch's back (`.numpy()`), so here the layout is the code's only storage — the buffer `packed` —
and nothing can go stale.  As with torch's int8 dynamic Linear (whose packed weight is canonical and `weight()` a
copy), there is no `indices` attribute: `code.unpack()` returns a copy, `code.set_indices(t)` checks and repacks.
It is a VQ code like `VQCode` (the same codebook, shared; `isinstance(layer, VQLinear)` holds).

Results are the backend's (bit-identical to `vq_matmul(..., backend="simd")` on the same indices): tables
quantized to uint8 per table group of 64 segments, error sigma = sqrt(sum_g G * step_g**2 / 12) per output, tests
hold every output within 6 sigma of the float reference (`vqlab.kernels.simd`).  The reference runs instead
(exact, F.linear on `rows()`) in training mode, on CUDA, for float64 inputs and where no native kernel exists
(one notice).  Gradients, when asked for in eval mode, are those of the exact product (as for the backend).

Only linears without padding (in_features divisible by d) get a SimdCode; `pack_simd_` gives convolutions with
segment="input" a `SimdConvCode` (`vqlab.methods.vq_simd_conv`, the lookup-table convolution).
"""
from __future__ import annotations

import weakref

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_int
from ..codebook import Codebook
from ..codes import add_bias, register_code
from ..dtypes import float_dtype
from ..kernels import simd as _simd
from ..kernels.backends import as_float32
from ..kernels.reference import dequantize
from ..layers import QuantizedConv2d, QuantizedLayer
from .vq import VQCode, VQCodeBase
from .vq_packed import PackedVQCode
from .vq_simd_conv import SimdConvCode

__all__ = ["SimdCode", "pack_simd_"]

_FAST: "weakref.WeakKeyDictionary[object, _simd.PackedCall]" = weakref.WeakKeyDictionary()


class _PackedMatmul(torch.autograd.Function):
    """y = kernel(x, packed code); backward: the gradients of the exact product x @ dequantize(book, I).T."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, book: torch.Tensor, code: "SimdCode") -> torch.Tensor:
        ctx.code = code
        ctx.save_for_backward(x2, book)
        books = book.detach()
        books = books[0] if books.shape[0] == 1 else books
        return _simd._matmul_packed(as_float32(x2), books, code.packed, code.shape[0], code.table_group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, book = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            xr = x2.detach().requires_grad_(need_x)
            br = book.detach().requires_grad_(need_b)
            y = F.linear(xr.to(torch.float32), dequantize(br.to(torch.float32), ctx.code.unpack()))
            wanted = [t for t in (xr, br) if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, g.to(y.dtype)))
        return (next(grads).to(x2.dtype) if need_x else None), (next(grads).to(book.dtype) if need_b else None), None


@register_code
class SimdCode(PackedVQCode):
    """A VQ code (Codebook (G, K <= 16, d), one index per segment) stored only in the simd kernel's layout:
    buffer `packed` (G, ngroups, nblk, Gs/2, 32) uint8 (`vqlab.kernels.simd.simd_pack`), 4 bits per index,
    rows padded to 32 and each table group of `table_group` segments to a multiple of 32 with zeros.

    rows() = dequantize(codebook, unpack()): (rows, n_pad), differentiable w.r.t. the codebook.
    Stored: the packed buffer as it is (4 bits per index plus the padding); Huffman / ANS figures from the
    index histogram; the codebook once per object (shared codebooks stay shared).
    Safety: `packed` is checked when built, by `set_indices`, and by `validate` (which `vqlab.load` and `save`
    run: shape, dtype, every index < K, padding zero); a nibble can only select one of 16 entries inside a
    register, so no stored value can address memory, and for K < 16 the kernel also returns the largest nibble
    it read, so a value >= K written behind torch's back raises ValueError at the next call.
    """

    kind = "vq_simd"
    layer_attrs = ("codebook", "k", "d", "codebook_groups", "pinned_zero", "unpack", "set_indices", "table_group",
                   "sparsity")

    def __init__(self, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1,
                 codebook: Codebook | None = None, *, table_group: int = _simd.GROUP, pinned_zero: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self._init_base(codebook, k, d, codebook_groups, pinned_zero, device, dtype)
        if self.codebook.k > _simd.ROW:
            raise ValueError(f"SimdCode holds K <= {_simd.ROW} codewords (4-bit indices), got K={self.codebook.k}")
        if n_pad % self.codebook.d:
            raise ValueError(f"SimdCode: n_pad={n_pad} is not a multiple of d={self.codebook.d}")
        _simd.group_size(n_pad // self.codebook.d, table_group)    # raises for a group the kernel cannot sum exactly
        self.table_group = table_group
        self.m, self.s = rows, n_pad // self.codebook.d
        self.register_buffer("packed", torch.zeros(_simd.packed_shape(rows, self.s, self.codebook_groups, table_group),
                                                   dtype=torch.uint8, device=device))

    @classmethod
    def from_vq(cls, code: VQCode) -> "SimdCode":
        """The same weight as a `VQCode` (K <= 16), sharing its Codebook object: the layouts differ, the values
        do not (`unpack()` equals `code.indices`)."""
        out = cls(code.shape[0], code.shape[1], code.k, code.d, code.codebook_groups, code.codebook,
                  pinned_zero=code.pinned_zero, device=code.indices.device)
        out.set_indices(code.indices)
        return out

    def unpack(self) -> torch.Tensor:
        """A copy of the indices: (rows, n_pad / d) uint8.  Writing to it changes nothing; use set_indices."""
        return _simd._unpack(self.packed, self.m, self.s, self.table_group)

    def index_shape(self) -> tuple[int, int]:
        return self.m, self.s

    def packed_shape(self) -> tuple[int, ...]:
        return _simd.packed_shape(self.m, self.s, self.codebook.weight.shape[0], self.table_group)

    def pack(self, indices: torch.Tensor) -> torch.Tensor:
        """(rows, n_pad / d) indices in [0, K) -> this layout (`simd.simd_pack`)."""
        book = self.codebook.weight
        return _simd.simd_pack(indices, book.shape[1], book.shape[0], self.table_group)

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.s * self.codebook.d

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """x (..., n_pad) -> (..., rows) + bias by the kernel on CPU for float16/bfloat16/float32 inputs (computed in
        float32); None (the exact reference) elsewhere or where no native kernel exists."""
        call = _FAST.get(self)
        if (call is not None and not torch.is_grad_enabled() and call.key == x.shape and x.dtype == torch.float32
                and x.is_contiguous() and x.is_cpu):
            owner = call.owner                                    # (packed, codebook weight, bias, threads)
            if (owner[0] is self.packed and owner[1] is self.codebook.weight and owner[2] is bias
                    and owner[3] == torch.get_num_threads()):
                y = call.run(x, owner[1], owner[0], bias)
                if y is not None:
                    return y
        return self._matmul(x, bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """matmul's full path: every check; a small float32 call in no-grad mode leaves a plan the fast path of
        `matmul` reuses while the packed buffer, codebook and bias are the same objects (their values are read
        on every call)."""
        _FAST.pop(self, None)
        book = self.book()
        n = self.shape[1]
        if (not x.is_cpu or not book.is_cpu or x.dtype == torch.float64 or not x.is_floating_point()
                or x.shape[-1] != n):
            return None
        isa = _simd.native_isa()
        if isa is None:
            _simd.notice(_simd.native_status().split(": ", 1)[-1])
            return None
        x2 = x if x.dim() == 2 else x.reshape(-1, n)
        if torch.is_grad_enabled() and (x2.requires_grad or book.requires_grad):
            y = _PackedMatmul.apply(x2, book, self)
        else:
            p = self.packed
            if (p.dtype != torch.uint8 or not p.is_cpu or not p.is_contiguous()
                    or tuple(p.shape) != _simd.packed_shape(self.m, self.s, book.shape[0], self.table_group)):
                self.validate()                                        # raises, naming what is wrong
            xf, bk = as_float32(x2), (book.detach() if book.requires_grad else book)
            weight = self.codebook.weight
            call = _simd.packed_small_call(xf, bk, p, self.m, self.table_group, isa)
            plain = (call is not None and x.dim() == 2 and x.dtype == torch.float32 and not torch.is_grad_enabled()
                     and not self.pinned_zero
                     and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu and bias.is_contiguous())))
            y = call.run(xf, bk, p, bias if plain else None) if call is not None else None
            if y is not None and plain:
                call.key, call.owner = x.shape, (p, weight, bias, torch.get_num_threads())
                _FAST[self] = call
                return y
            if y is None:
                y = _simd._matmul_packed(xf, bk, p, self.m, self.table_group, isa)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.m)
        if (bias is not None and bias.dtype == y.dtype
                and not (torch.is_grad_enabled() and (y.requires_grad or bias.requires_grad))):
            return y.add_(bias)                                        # y + bias, into the fresh output
        return add_bias(y, bias)

    def config(self) -> dict:
        return {**self._base_config(), "table_group": self.table_group}

    @classmethod
    def from_config(cls, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1,
                    table_group: int = _simd.GROUP, dtype: str = "float32", pinned_zero: bool = False) -> "SimdCode":
        for name, v in (("rows", rows), ("n_pad", n_pad), ("k", k), ("d", d), ("codebook_groups", codebook_groups),
                        ("table_group", table_group)):
            check_int(f"SimdCode {name}", v, 1)
        return cls(rows, n_pad, k, d, codebook_groups, table_group=table_group, pinned_zero=pinned_zero,
                   dtype=float_dtype(dtype, "SimdCode dtype"))

    def validate(self) -> None:
        """A (G, K <= 16, d) float codebook, G dividing the rows, `packed` of the layout's shape and dtype, every
        index < K and the padding zero (the buffer equals the packing of its own indices)."""
        self._validate_codebook(self.m, _simd.ROW)
        self._validate_packed()

    def describe(self) -> dict:
        out = super().describe()
        out["setting"] += " simd layout"
        return out

    def extra_repr(self) -> str:
        return (f"K={self.k}, d={self.d}, rows={self.m}, n_pad={self.shape[1]}, table_group={self.table_group}"
                + (", pinned_zero=True" if self.pinned_zero else ""))


# ---------------------------------------------------------------- the simd layout for a whole model

def _why_not(mod: QuantizedLayer, code: VQCodeBase) -> str:
    """Why `pack_simd_` leaves a VQ layer as it is ("" when it converts it)."""
    if code.k > _simd.ROW:
        return f"K={code.k} > {_simd.ROW}"
    if isinstance(mod, QuantizedConv2d):
        if mod.segment != "input":
            return "segment='kernel' (the lookup-table convolution needs segment='input')"
        if mod.cin_pad != mod.in_channels // mod.groups:
            return f"padded channels (in_channels/groups={mod.in_channels // mod.groups} not divisible by d={code.d})"
        if code.codebook_groups != 1:
            return f"codebook_groups={code.codebook_groups} (the convolution layout holds one codebook)"
        return ""
    return f"padded rows (in_features={mod.n} not divisible by d={code.d})" if mod.n_pad != mod.n else ""


def pack_simd_(model: nn.Module) -> pd.DataFrame:
    """Store the indices of every VQ layer with K <= 16 in a simd kernel's layout, in place: linears without
    padding get a `SimdCode`, convolutions with segment="input", unpadded channels and one codebook group a
    `SimdConvCode` (both share the codebook); the layers stay where they are, only their code changes.  Returns
    one row per VQ layer: layer, K, d, packed (bool), reason (why not, else "")."""
    rows, done = [], set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, QuantizedLayer) or not isinstance(mod.code, VQCodeBase):
            continue
        code = mod.code
        why = _why_not(mod, code)
        if not why and id(mod) not in done and isinstance(code, VQCode):
            mod.code = SimdConvCode.from_vq(code, mod) if isinstance(mod, QuantizedConv2d) else SimdCode.from_vq(code)
        if not why:
            done.add(id(mod))
        rows.append({"layer": name, "K": code.k, "d": code.d, "packed": not why, "reason": why})
    return pd.DataFrame(rows, columns=["layer", "K", "d", "packed", "reason"])
