"""VQ codes stored in the "simd" kernel's own 4-bit layout, for fast CPU inference with K <= 16 codewords.

    report = vqlab.pack_simd_(model)   # every eligible VQLinear -> QuantizedLinear(code=SimdCode), in place
    with torch.no_grad():
        y = model(x)                   # CPU: the register-table kernel (vqlab.kernels.simd) on the packed code

Why a code of its own: backend "simd" on a VQLinear reads the layer's (m, S) uint8 indices row-major and in
place on every call (8 MB for 4096 x 4096 at d=2) and must transpose them in registers; the kernel is twice
as fast on its own interleaved layout (4 bits per index, one 32-byte load per two shuffles).  A cached copy in
that layout would go stale when the indices are written behind torch's back (`.numpy()`), so here the layout
is the code's only storage — the buffer `packed` — and nothing can go stale.  As with torch's int8 dynamic
Linear (whose packed weight is canonical and `weight()` a copy), there is no `indices` attribute:
`code.unpack()` returns a copy (m, S) uint8, `code.set_indices(t)` checks and repacks.

Results are the backend's (bit-identical to `vq_matmul(..., backend="simd")` on the same indices): tables
quantized to uint8 per group of 64 segments, error sigma = sqrt(sum_g G * step_g**2 / 12) per output, tests hold
every output within 6 sigma of the float reference (`vqlab.kernels.simd`).  The reference runs instead (exact,
F.linear on `rows()`) in training mode, on CUDA, for float64 inputs and where no native kernel exists (one
notice).  Gradients, when asked for in eval mode, are those of the exact product (as for the backend).

Safety: `packed` is checked when built, by `set_indices`, and by `validate` (which `vqlab.load` and `save` run:
shape, dtype, every index < K, padding zero); a nibble can only select one of 16 entries inside a register,
so no stored value can address memory, and for K < 16 the kernel also returns the largest nibble it read, so a
value >= K written behind torch's back raises ValueError at the next call.

Only VQLinear layers without padding (in_features divisible by d) are converted; VQConv2d keeps its layout
(its backend "simd" path reads the indices in place).
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import FLOAT_DTYPE_NAMES, index_bits_per_weight
from .bits import huffman_bytes, pack_indices
from .codebook import Codebook
from .kernels import simd as _simd
from .kernels.ops import _float32, lut_flops, table_count
from .kernels.reference import check_codebook_groups, check_indices, dequantize as _dequantize
from .layers import VQCode, VQConv2d, VQLinear
from .quantized import CodeSize, QuantizedLinear, WeightCode, packed_ans_bytes, register_code, stored_bytes

__all__ = ["SimdCode", "pack_simd_"]


class _PackedMatmul(torch.autograd.Function):
    """y = kernel(x, packed code); backward: the gradients of the exact product x @ dequantize(book, I).T."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, book: torch.Tensor, code: "SimdCode") -> torch.Tensor:
        ctx.code = code
        ctx.save_for_backward(x2, book)
        books = book.detach()
        books = books[0] if books.shape[0] == 1 else books
        return _simd.simd_matmul_packed(_float32(x2), books, code.packed, code.shape[0], code.group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, book = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            xr = x2.detach().requires_grad_(need_x)
            br = book.detach().requires_grad_(need_b)
            y = F.linear(xr.to(torch.float32), _dequantize(br.to(torch.float32), ctx.code.unpack()))
            wanted = [t for t in (xr, br) if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, g.to(y.dtype)))
        return (next(grads).to(x2.dtype) if need_x else None), (next(grads).to(book.dtype) if need_b else None), None


@register_code
class SimdCode(WeightCode):
    """A VQ code (Codebook (G, K <= 16, d), one index per segment) stored only in the simd kernel's layout:
    buffer `packed` (G, ngroups, nblk, Gs/2, 32) uint8 (`vqlab.kernels.simd.simd_pack`), 4 bits per index,
    rows padded to 32 and each group of `group` segments to a multiple of 32 with zeros.

    rows() = dequantize(codebook, unpack()): (rows, n_pad), differentiable w.r.t. the codebook.
    Stored: the packed buffer as it is (4 bits per index plus the padding); Huffman / ANS figures from the
    index histogram; the codebook once per object (shared codebooks stay shared).
    """

    kind = "vq_simd"
    method = "vq (simd layout)"
    has_matmul = True

    def __init__(self, rows: int, n_pad: int, k: int, d: int, groups: int = 1, codebook: Codebook | None = None,
                 *, group: int = _simd.GROUP, pinned_zero: bool = False, device=None, dtype=None):
        super().__init__()
        if codebook is None:
            codebook = Codebook(k, d, groups, device=device, dtype=dtype)
        if codebook.k > _simd.ROW:
            raise ValueError(f"SimdCode holds K <= {_simd.ROW} codewords (4-bit indices), got K={codebook.k}")
        if n_pad % codebook.d:
            raise ValueError(f"SimdCode: n_pad={n_pad} is not a multiple of d={codebook.d}")
        self.codebook = codebook
        _simd.group_size(n_pad // codebook.d, group)           # raises for a group the kernel cannot sum exactly
        self.group = group
        self.m, self.s = rows, n_pad // codebook.d
        self.register_buffer("packed", torch.zeros(_simd.packed_shape(rows, self.s, codebook.groups, group),
                                                   dtype=torch.uint8, device=device))
        if pinned_zero:
            self._pinned_zero = True

    @classmethod
    def from_vq(cls, code) -> "SimdCode":
        """The same weight as a `VQCode` (K <= 16), sharing its Codebook object: the layouts differ, the values
        do not (`unpack()` equals `code.indices`)."""
        out = cls(code.shape[0], code.shape[1], code.codebook.k, code.codebook.d, code.codebook.groups,
                  code.codebook, pinned_zero=code.pinned_zero, device=code.indices.device)
        out.set_indices(code.indices)
        return out

    pinned_zero = VQCode.pinned_zero      # the same flag and rebuild as VQCode's (codeword 0 pinned to zero)
    book = VQCode.book

    def unpack(self) -> torch.Tensor:
        """A copy of the indices: (rows, n_pad / d) uint8.  Writing to it changes nothing; use set_indices."""
        return _simd.simd_unpack(self.packed, self.m, self.s, self.group)

    def set_indices(self, indices: torch.Tensor) -> None:
        """Store new (rows, n_pad / d) integer indices in [0, K) (checked; ValueError otherwise)."""
        if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != (self.m, self.s):
            raise ValueError(f"indices must have shape {(self.m, self.s)}, got "
                             f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        check_indices(indices, self.codebook.k, what="indices")
        packed = _simd.simd_pack(indices.to(self.packed.device), self.codebook.k, self.codebook.groups, self.group)
        with torch.no_grad():
            self.packed.copy_(packed)

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.s * self.codebook.d

    def rows(self) -> torch.Tensor:
        return _dequantize(self.book(), self.unpack())

    def matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (..., n_pad) -> (..., rows) by the kernel on CPU for float16/bfloat16/float32 inputs (computed in
        float32); None (the exact reference) elsewhere or where no native kernel exists."""
        book = self.book()
        if (x.device.type != "cpu" or book.device.type != "cpu" or x.dtype == torch.float64
                or not x.is_floating_point() or x.shape[-1] != self.shape[1]):
            return None
        isa = _simd.native_isa()
        if isa is None:
            _simd._notice(_simd.native_status().split(": ", 1)[-1])
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and (x2.requires_grad or book.requires_grad):
            y = _PackedMatmul.apply(x2, book, self)
        else:
            p = self.packed
            if (p.dtype != torch.uint8 or p.device.type != "cpu" or not p.is_contiguous()
                    or tuple(p.shape) != _simd.packed_shape(self.m, self.s, book.shape[0], self.group)):
                self.validate()                                        # raises, naming what is wrong
            y = _simd._run_packed(_float32(x2), book.detach(), p, self.m, self.group, _simd.ISAS[isa], None)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.m)

    def size(self, seen: set[int]) -> CodeSize:
        book = self.codebook.weight
        shared = id(book) in seen
        seen.update((id(book), id(self.packed)))
        idx = self.unpack()
        return CodeSize(index_bytes=self.packed.numel(), codebook_bytes=0 if shared else stored_bytes(book),
                        entropy_index_bytes=huffman_bytes(idx, self.codebook.k),
                        ans_index_bytes=packed_ans_bytes(self),
                        streams=[pack_indices(idx, 4)], k=self.codebook.k, d=self.codebook.d, index_bits=4)

    def config(self) -> dict:
        book = self.codebook
        out = {"rows": self.m, "n_pad": self.shape[1], "k": book.k, "d": book.d, "groups": book.groups,
               "group": self.group, "dtype": str(book.weight.dtype).removeprefix("torch.")}
        if self.pinned_zero:
            out["pinned_zero"] = True
        return out

    @classmethod
    def from_config(cls, rows: int, n_pad: int, k: int, d: int, groups: int = 1, group: int = _simd.GROUP,
                    dtype: str = "float32", pinned_zero: bool = False) -> "SimdCode":
        if dtype not in FLOAT_DTYPE_NAMES:
            raise ValueError(f"SimdCode: dtype must be one of {sorted(FLOAT_DTYPE_NAMES)}, got {dtype!r}")
        if not isinstance(pinned_zero, bool):
            raise ValueError(f"SimdCode: pinned_zero must be True or False, got {pinned_zero!r}")
        for name, v in (("rows", rows), ("n_pad", n_pad), ("k", k), ("d", d), ("groups", groups), ("group", group)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SimdCode: {name} must be a positive integer, got {v!r}")
        return cls(rows, n_pad, k, d, groups, group=group, pinned_zero=pinned_zero, dtype=FLOAT_DTYPE_NAMES[dtype])

    def packing(self) -> dict[str, int]:
        return {"packed": 8}          # the layout's bytes as they are (ANS-coded by save(index_coding="ans"))

    def validate(self) -> None:
        """A (G, K <= 16, d) float codebook, G dividing the rows, `packed` of the layout's shape and dtype, every
        index < K and the padding zero (the buffer equals the packing of its own indices)."""
        book = self.codebook.weight
        if book.dim() != 3 or not book.is_floating_point() or book.shape[1] > _simd.ROW:
            raise ValueError(f"codebook must be a (G, K <= 16, d) float tensor, got {list(book.shape)} {book.dtype}")
        check_codebook_groups(book, self.m)
        want = _simd.packed_shape(self.m, self.s, book.shape[0], self.group)
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != want:
            raise ValueError(f"packed must be uint8 {want}, got {tuple(self.packed.shape)} {self.packed.dtype}")
        idx = self.unpack()
        check_indices(idx, book.shape[1], what="packed indices")
        if not torch.equal(_simd.simd_pack(idx, book.shape[1], book.shape[0], self.group), self.packed):
            raise ValueError("packed: the padding of the layout must be zero")
        if self.pinned_zero and bool((book[:, 0] != 0).any()):
            raise ValueError("pinned_zero: codeword 0 must be exactly zero in every codebook group")

    def describe(self) -> dict:
        book = self.codebook
        return {"method": self.method, "K": book.k, "d": book.d, "bits_per_weight": index_bits_per_weight(book.k, book.d)}

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        book = self.codebook
        return lut_flops(rows, self.m, self.s, book.d, book.k, table_count(groups, book.groups))

    def extra_repr(self) -> str:
        return f"rows={self.m}, n_pad={self.shape[1]}, group={self.group}" + (", pinned_zero=True" if self.pinned_zero else "")


def pack_simd_(model: nn.Module) -> pd.DataFrame:
    """Replace every VQLinear with K <= 16 and no padding by a QuantizedLinear holding the same weight as a
    `SimdCode` (in place; bias and training mode kept; shared codebooks stay shared).  Returns one row per VQ
    layer: layer, K, d, packed (bool), reason (why not, else "").  Modules used in several places are converted
    once and stay shared."""
    from .quantize import _set_module

    rows, done = [], {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(mod, (VQLinear, VQConv2d)):
            continue
        k, d = mod.codebook.k, mod.codebook.d
        why = ("VQConv2d keeps its own layout" if isinstance(mod, VQConv2d)
               else f"K={k} > {_simd.ROW}" if k > _simd.ROW
               else f"padded rows (in_features={mod.n} not divisible by d={d})" if mod.n_pad != mod.n
               else "the model itself (wrap it in a container to replace it)" if name == "" else "")
        if not why and id(mod) not in done:
            layer = QuantizedLinear(mod.in_features, mod.out_features, mod.bias is not None,
                                    code=SimdCode.from_vq(mod.code))
            layer.bias = mod.bias
            done[id(mod)] = layer.train(mod.training)
        if not why:
            _set_module(model, name, done[id(mod)])
        rows.append({"layer": name, "K": k, "d": d, "packed": not why, "reason": why})
    return pd.DataFrame(rows, columns=["layer", "K", "d", "packed", "reason"])
