"""VQ convolution codes in the simd lookup-table convolution's own layout (`vqlab.kernels.simd_conv`), K <= 16.

    report = vqlab.pack_simd_(model)   # VQ convs with segment="input" get a SimdConvCode, linears a SimdCode
    with torch.no_grad():
        y = model(x)                   # CPU: one uint8 table per (input pixel, segment), shared by every output
                                       # channel and every kernel tap that reads the pixel

As with `SimdCode`, the layout is the code's only storage (buffer `packed`, 4 bits per index, 16 output channels
per 16-byte vector), so nothing can go stale: `unpack()` returns a copy of the indices, `set_indices(t)` checks
and repacks.  Results are the kernel's (bit-identical to `vqlab.kernels.simd_conv.conv_emulate`): tables quantized
to uint8 with one step per image, error sigma = step * sqrt(kh * kw * S / 12) per output.  The exact product
(the rebuilt weight through F.conv2d) runs instead in training mode, when gradients are wanted, on CUDA, for
float64 inputs, for a codebook with a NaN / Inf value and where no native kernel exists.  Only one codebook
group (`codebook_groups=1`); conv groups are supported.
"""
from __future__ import annotations

import weakref

import torch

from ..checks import check_int
from ..codebook import Codebook
from ..codes import register_code
from ..dtypes import float_dtype
from ..kernels import simd as _simd
from ..kernels import simd_conv as _conv
from ..layers import QuantizedConv2d
from .vq import VQCode
from .vq_packed import PackedVQCode

__all__ = ["SimdConvCode"]

_CALLS: "weakref.WeakKeyDictionary[object, _conv.ConvCall]" = weakref.WeakKeyDictionary()


@register_code
class SimdConvCode(PackedVQCode):
    """A VQ code of a segment="input" convolution (Codebook (1, K <= 16, d)) stored only in the lookup-table
    convolution's layout: buffer `packed` (groups, ceil(out / groups / 16), taps, ceil(S / 2), 16) uint8
    (`vqlab.kernels.simd_conv.conv_pack`), rows = output channels, n_pad = taps * S * d (taps = kh * kw).

    rows() = dequantize(codebook, unpack()): (rows, n_pad).  Stored: the packed buffer as it is (4 bits per index
    plus the padding to 16 channels and to an even S), the codebook once per object.  Safety: `packed` is checked
    when built, by `set_indices` and by `validate` (run by `vqlab.load` and `save`); for K < 16 the kernel checks
    the largest nibble on every call (ValueError for one >= K), and a nibble can only select one of 16 entries
    inside a register.
    """

    kind = "vq_simd_conv"
    layer_attrs = ("codebook", "k", "d", "codebook_groups", "pinned_zero", "unpack", "set_indices", "sparsity")

    def __init__(self, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1,
                 codebook: Codebook | None = None, *, taps: int = 1, groups: int = 1, pinned_zero: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self._init_base(codebook, k, d, codebook_groups, pinned_zero, device, dtype)
        book = self.codebook
        if book.k > _simd.ROW or book.codebook_groups != 1:
            raise ValueError(f"SimdConvCode holds one codebook of K <= {_simd.ROW} codewords, got K={book.k} in "
                             f"{book.codebook_groups} groups")
        if n_pad % (taps * book.d) or rows % groups:
            raise ValueError(f"SimdConvCode: n_pad={n_pad} is not {taps} taps of whole d={book.d} segments, or "
                             f"groups={groups} does not divide rows={rows}")
        self.m, self.taps, self.groups = rows, taps, groups
        self.s = n_pad // (taps * book.d)                                   # segments per tap
        self.register_buffer("packed", torch.zeros(_conv.conv_packed_shape(rows, taps, self.s, groups),
                                                   dtype=torch.uint8, device=device))

    @classmethod
    def from_vq(cls, code: VQCode, layer: QuantizedConv2d) -> "SimdConvCode":
        """The same weight as `code` (K <= 16, one codebook group), sharing its Codebook object."""
        kh, kw = layer.kernel_size
        out = cls(code.shape[0], code.shape[1], code.k, code.d, 1, code.codebook, taps=kh * kw, groups=layer.groups,
                  pinned_zero=code.pinned_zero, device=code.indices.device)
        out.set_indices(code.indices)
        return out

    def unpack(self) -> torch.Tensor:
        """A copy of the indices: (rows, taps * S) uint8.  Writing to it changes nothing; use set_indices."""
        return _conv.conv_unpack(self.packed, self.m, self.taps, self.s)

    def index_shape(self) -> tuple[int, int]:
        return self.m, self.taps * self.s

    def packed_shape(self) -> tuple[int, ...]:
        return _conv.conv_packed_shape(self.m, self.taps, self.s, self.groups)

    def pack(self, indices: torch.Tensor) -> torch.Tensor:
        """(rows, taps * S) indices in [0, 16) -> this layout (`simd_conv.conv_pack`)."""
        return _conv.conv_pack(indices, self.taps, self.groups)

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.taps * self.s * self.codebook.d

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        return None                                  # a convolution's code: the layer calls conv2d

    def conv2d(self, x: torch.Tensor, layer: QuantizedConv2d) -> torch.Tensor | None:
        """The lookup-table convolution on CPU for float inputs in eval mode (computed in float32); None (the exact
        product of the rebuilt weight) elsewhere."""
        call = _CALLS.get(self)
        if (call is not None and not torch.is_grad_enabled() and call.key[0] == x.shape and x.dtype == torch.float32
                and x.is_contiguous() and x.is_cpu):
            owner = call.owner                                     # (packed, codebook weight, bias, layer, threads)
            if (owner[0] is self.packed and owner[1] is self.codebook.weight and owner[2] is layer.bias
                    and owner[3] is layer and owner[4] == torch.get_num_threads()):
                y = call.run(x, owner[5], owner[0], owner[6])
                if y is not None:
                    return y
        return self._conv2d(x, layer)

    def _conv2d(self, x: torch.Tensor, layer: QuantizedConv2d) -> torch.Tensor | None:
        """conv2d's full path: every check, then a new call plan (kept when inputs, codebook, bias and layer are
        plain float32 CPU tensors that the fast path may reuse)."""
        _CALLS.pop(self, None)
        kh, kw = layer.kernel_size
        if self.taps != kh * kw or self.groups != layer.groups or layer.segment != "input":
            raise ValueError(f"SimdConvCode: taps={self.taps}, groups={self.groups} do not fit a segment='input' "
                             f"{kh}x{kw} convolution with groups={layer.groups} (segment={layer.segment!r})")
        book = self.book()
        bias = layer.bias
        if (not x.is_cpu or not book.is_cpu or x.dtype == torch.float64 or not x.is_floating_point() or x.dim() != 4
                or x.shape[1] != layer.in_channels
                or (torch.is_grad_enabled() and (x.requires_grad or book.requires_grad
                                                 or (bias is not None and bias.requires_grad)))):
            return None
        p = self.packed
        if (p.dtype != torch.uint8 or not p.is_cpu or not p.is_contiguous()
                or tuple(p.shape) != self.packed_shape()):
            self.validate()                                        # raises, naming what is wrong
        isa = _simd.native_isa()
        if isa is None:
            _simd.notice(_simd.native_status().split(": ", 1)[-1])
            return None
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        bk = book.detach()[0]
        bk = bk if bk.dtype == torch.float32 and bk.is_contiguous() else bk.to(torch.float32).contiguous()
        bf = None if bias is None else bias.detach()
        if bf is not None and (bf.dtype != torch.float32 or not bf.is_contiguous() or not bf.is_cpu):
            bf = bf.to("cpu", torch.float32).contiguous()
        call = _conv.conv_call(xf, bk, p, self.m, layer.kernel_size, layer.stride, layer.conv_padding,
                               layer.dilation, self.groups, isa)
        y = call.run(xf, bk, p, bf)
        if y is None:
            return None                                            # a NaN / Inf codeword: the exact product
        weight = self.codebook.weight
        plain = (not self.pinned_zero and weight.dtype == torch.float32 and weight.is_contiguous()
                 and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.is_cpu)))
        if plain:                                                  # the fast path may reuse this plan
            call.key = (xf.shape,)
            call.owner = (p, weight, bias, layer, torch.get_num_threads(), bk, bf)
            _CALLS[self] = call
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def conv_flops(self, layer: QuantizedConv2d, x_shape: tuple[int, ...] | None, rows: int) -> tuple[int, int]:
        """(tables, accumulate): a table of K entries of d multiply-adds per input pixel and segment (all conv
        groups), one add per output and segment; without x_shape the per-output formula of the VQ code."""
        if x_shape is None:
            return self.flops(rows, layer.groups)
        b, c, h, w = x_shape
        return 2 * b * h * w * c * self.k, rows * self.m * self.taps * self.s

    def config(self) -> dict:
        out = self._base_config()
        out["taps"] = self.taps
        if self.groups != 1:
            out["groups"] = self.groups
        return out

    @classmethod
    def from_config(cls, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1, taps: int = 1,
                    groups: int = 1, dtype: str = "float32", pinned_zero: bool = False) -> "SimdConvCode":
        for name, v in (("rows", rows), ("n_pad", n_pad), ("k", k), ("d", d), ("codebook_groups", codebook_groups),
                        ("taps", taps), ("groups", groups)):
            check_int(f"SimdConvCode {name}", v, 1)
        return cls(rows, n_pad, k, d, codebook_groups, taps=taps, groups=groups, pinned_zero=pinned_zero,
                   dtype=float_dtype(dtype, "SimdConvCode dtype"))

    def validate(self) -> None:
        """A (1, K <= 16, d) float codebook, `packed` of the layout's shape and dtype, every index < K and the
        padding zero (the buffer equals the packing of its own indices)."""
        self._validate_codebook(self.m, _simd.ROW)
        if self.codebook.weight.shape[0] != 1:
            raise ValueError(f"SimdConvCode needs one codebook group, got {self.codebook.weight.shape[0]}")
        self._validate_packed()

    def describe(self) -> dict:
        out = super().describe()
        out["setting"] += " simd conv layout"
        return out

    def extra_repr(self) -> str:
        return (f"K={self.k}, d={self.d}, rows={self.m}, taps={self.taps}, segments={self.s}, groups={self.groups}"
                + (", pinned_zero=True" if self.pinned_zero else ""))
