"""The seam every quantizer plugs into: a `WeightCode` (how one layer's weight is stored) held by a
`QuantizedLayer` (QuantizedLinear / QuantizedConv2d, or the VQ layers built on them).

A code object knows four things, and `quantize_`'s report, `compressed_size`, `save`/`load` and
`count_flops` ask it instead of testing for a concrete class:

    rows()                 the weight as (out, n_pad) rows in the layer's row layout, differentiable w.r.t. the
                           code's trainable parts (what training and the reference forward use)
    size(seen)             a `CodeSize`: bytes of packed indices / codebooks / other tensors, entropy-coded
                           (Huffman, ANS) index figures and the packed streams; objects whose id() is in `seen`
                           (a shared codebook, also across models) are counted once, and the method adds what it
                           counts.  Float tensors are counted with `stored_bytes` (at the storage dtype that
                           `compressed_size(store_dtype=...)` / `save(store_dtype=...)` set), integers at their dtype
    config(), packing()    the constructor arguments as JSON data and, per buffer, the bits to pack it at
                           (0 = raw bytes at its dtype); `from_config(**config)` rebuilds an empty code that
                           `vqlab.load` fills — the file holds data only, never pickle
    flops(rows, groups)    (table, accumulate) FLOPs for `rows` input vectors; the default is a dense product

Codes register by a short `kind` name (`@register_code`), which the file format records.  A new method is one
module: a WeightCode subclass, a config dataclass and a handler registered with `vqlab.register_handler` that
returns `QuantizedLinear.from_code(...)` / `QuantizedConv2d.from_code(...)` layers.

Row layouts: QuantizedLinear rows are the weight itself (out, in); QuantizedConv2d rows are the flattened
kernel (out, cin/groups * kh * kw).  The VQ layers (vqlab.layers) add padding and the "input" layout.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import pair
from .bits import ans_bytes

__all__ = ["WeightCode", "CodeSize", "QuantizedLayer", "QuantizedLinear", "QuantizedConv2d", "register_code",
           "CODES", "code_class", "tensor_bytes", "check_layer", "wrap", "STORE_DTYPES", "check_store_dtype",
           "stored_dtype", "stored_bytes", "storing_as", "packed_ans_bytes"]

CODES: dict[str, type["WeightCode"]] = {}


def register_code(cls: type["WeightCode"]) -> type["WeightCode"]:
    """Class decorator: make a WeightCode subclass known by its `kind` (to the file format)."""
    kind = getattr(cls, "kind", "")
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"{cls.__name__}.kind must be a short identifier, got {kind!r}")
    if kind in CODES and CODES[kind] is not cls and CODES[kind].__qualname__ != cls.__qualname__:
        raise ValueError(f"code kind {kind!r} is already registered by {CODES[kind].__name__}")
    CODES[kind] = cls
    return cls


def code_class(kind: str) -> type["WeightCode"]:
    """The registered WeightCode class of `kind`; ValueError listing the known kinds otherwise."""
    if kind not in CODES:
        raise ValueError(f"unknown weight code kind {kind!r}; registered: {sorted(CODES)} (import the module "
                         f"that defines it before loading)")
    return CODES[kind]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor at its dtype."""
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- the storage dtype of float tensors

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The storage dtype in effect while `storing_as` runs (None: every tensor at its own dtype).  A context
# variable, so that every code's `size(seen)` counts at it without a new argument; set only by `storing_as`.
_STORE_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("vqlab_store_dtype", default=None)


def check_store_dtype(store_dtype) -> torch.dtype | None:
    """None, or the torch dtype of `store_dtype` (torch.float16 / torch.bfloat16 / torch.float32 or the name);
    ValueError naming the value and the allowed names otherwise."""
    if store_dtype is None:
        return None
    if isinstance(store_dtype, str) and store_dtype.removeprefix("torch.") in STORE_DTYPES:
        return STORE_DTYPES[store_dtype.removeprefix("torch.")]
    if isinstance(store_dtype, torch.dtype) and store_dtype in STORE_DTYPES.values():
        return store_dtype
    raise ValueError(f"store_dtype must be None or one of {sorted(STORE_DTYPES)} (a name or a torch dtype), "
                     f"got {store_dtype!r}")


def stored_dtype(t: torch.Tensor, store_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype `t` is stored at: `store_dtype` (default: the one `storing_as` set) for a floating-point
    tensor wider than it (float32/float64 under float16), else t's own dtype (integers, narrower floats)."""
    store = _STORE_DTYPE.get() if store_dtype is None else store_dtype
    if store is not None and t.is_floating_point() and t.element_size() > store.itemsize:
        return store
    return t.dtype


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor as stored: at `stored_dtype(t)` (its own dtype unless `storing_as` is in effect)."""
    return t.numel() * stored_dtype(t).itemsize


@contextlib.contextmanager
def storing_as(store_dtype) -> Iterator[torch.dtype | None]:
    """Within the block, `stored_bytes` counts wider floats at `store_dtype` (checked; None: at their own
    dtype).  `compressed_size(store_dtype=...)` counts every code's size under it."""
    token = _STORE_DTYPE.set(check_store_dtype(store_dtype))
    try:
        yield _STORE_DTYPE.get()
    finally:
        _STORE_DTYPE.reset(token)


def packed_ans_bytes(code: "WeightCode") -> int:
    """Bytes of a code's bit-packed buffers (`packing()`) ANS-coded one by one, as `vqlab.save(...,
    index_coding="ans")` writes them (`vqlab.bits.ans_encode` with k = 2**bits)."""
    return sum(ans_bytes(getattr(code, name), 1 << bits) for name, bits in code.packing().items())


@dataclass
class CodeSize:
    """What one code stores, in bytes (see `WeightCode.size`).

    index_bytes: packed index/code streams; codebook_bytes: codebooks and other shared tables (counted by the
    first code that reaches them); other_bytes: per-layer side tensors (scales, ...); entropy_index_bytes: the
    index streams entropy-coded (Huffman; equal to index_bytes when the method has no such figure);
    ans_index_bytes: the index streams ANS-coded, headers included (`packed_ans_bytes`: what
    `save(..., index_coding="ans")` writes; default: entropy_index_bytes); streams: the packed streams
    themselves (for the lzma figure); k, d, index_bits: for reports (None where they mean nothing).
    """

    index_bytes: int = 0
    codebook_bytes: int = 0
    other_bytes: int = 0
    entropy_index_bytes: int | None = None
    streams: list[bytes] = field(default_factory=list)
    k: int | None = None
    d: int | None = None
    index_bits: int | None = None
    ans_index_bytes: int | None = None

    def __post_init__(self):
        if self.entropy_index_bytes is None:
            self.entropy_index_bytes = self.index_bytes
        if self.ans_index_bytes is None:
            self.ans_index_bytes = self.entropy_index_bytes


class WeightCode(nn.Module):
    """Base class of a stored weight; subclasses set `kind` and implement rows/size/config/from_config.

    `shape`: (out, n_pad) of the rows it rebuilds.
    """

    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""          # a readable name for reports ("vq", "uniform int8", ...)
    has_matmul: ClassVar[bool] = False  # True: `matmul` is a fast path (QuantizedConv2d then runs it on im2col)

    def rows(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def size(self, seen: set[int]) -> CodeSize:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able keyword arguments of `from_config`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, **config) -> "WeightCode":
        raise NotImplementedError

    def packing(self) -> dict[str, int]:
        """{buffer name: bits per value} for buffers the file stores bit-packed (non-negative integers)."""
        return {}

    def validate(self) -> None:
        """Raise ValueError when the stored values cannot be used (e.g. an index outside the codebook);
        `vqlab.load` calls it on every code it reads and `save` before writing."""

    def describe(self) -> dict:
        """Report fields: method, K, d, bits_per_weight (index bits per weight, codebooks not included)."""
        return {"method": self.method or self.kind, "K": None, "d": None, "bits_per_weight": None}

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """(table, accumulate) FLOPs of the layer's product for `rows` input vectors (conv: output positions
        times batch), `groups` conv groups; default: a dense product, 2 * rows * out * n, no table."""
        out, n = self.shape
        return 0, 2 * rows * out * n

    def matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """An eval-mode fast path y = x @ rows().T (x: (..., n_pad)), or None to use F.linear on rows().
        Codes that implement it set `has_matmul = True`."""
        return None

    def conv_via_matmul(self) -> bool:
        """Whether QuantizedConv2d runs this code's `matmul` on im2col rows in eval (default: when it has one);
        otherwise it convolves with the rebuilt weight, and `flops` counts that dense product."""
        return self.has_matmul


# ---------------------------------------------------------------- the layers that hold a code

class QuantizedLayer(nn.Module):
    """Common part of layers whose weight is a `WeightCode` (`self.code`).

    Subclasses define `out_dim`, `n` (unpadded row length), `n_pad`, `_flat_to_weight(flat)` and
    `_weight_to_flat(weight)`.  `weight` rebuilds the dense weight on each access.
    """

    code: WeightCode

    @property
    def weight_numel(self) -> int:
        """Weights of the dense layer this one stands for (padding excluded)."""
        return self.out_dim * self.n

    def flat_weight(self) -> torch.Tensor:
        """(out, n_pad) rows, differentiable w.r.t. the code's trainable parts."""
        return self.code.rows()

    def dequantize(self) -> torch.Tensor:
        """The dense weight in nn.Linear / nn.Conv2d shape (padding removed)."""
        return self._flat_to_weight(self.flat_weight())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @property
    def bits_per_weight(self) -> float | None:
        return self.code.describe()["bits_per_weight"]

    def flops(self, rows: int) -> tuple[int, int]:
        """(table, accumulate) FLOPs for `rows` input vectors."""
        return self.code.flops(rows, getattr(self, "groups", 1))

    def validate(self) -> None:
        """Raise ValueError unless the code fits this layer (rows (out_dim, n_pad)) and its values are usable."""
        if tuple(self.code.shape) != (self.out_dim, self.n_pad) or self.n_pad < self.n:
            raise ValueError(f"{type(self).__name__}: code rows {tuple(self.code.shape)} do not fit its geometry: "
                             f"out_dim={self.out_dim}, n={self.n}, n_pad={self.n_pad} (n <= n_pad)")
        self.code.validate()

    def after_load(self) -> None:
        """Rebuild training-only state after `vqlab.load` filled the stored tensors (default: nothing)."""


class QuantizedLinear(QuantizedLayer):
    """nn.Linear whose weight is any WeightCode with rows (out_features, in_features).  x: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, code: WeightCode):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dim, self.n, self.n_pad = out_features, in_features, in_features
        if tuple(code.shape) != (out_features, in_features):
            raise ValueError(f"QuantizedLinear: code rows {tuple(code.shape)} do not match ({out_features}, {in_features})")
        self.code = code
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_code(cls, module: nn.Linear, code: WeightCode) -> "QuantizedLinear":
        """Wrap `code` (rows = module.weight's shape) with module's bias (copied) and training mode."""
        layer = cls(module.in_features, module.out_features, module.bias is not None, code=code)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return layer.train(module.training)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def _flat_to_weight(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def _weight_to_flat(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.training else self.code.matmul(x)
        if y is None:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedConv2d(QuantizedLayer):
    """nn.Conv2d (zeros padding mode) whose weight is a WeightCode with rows (out, cin/groups * kh * kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, code: WeightCode):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        kh, kw = self.kernel_size
        self.out_dim, self.n = out_channels, in_channels // groups * kh * kw
        self.n_pad = self.n
        if tuple(code.shape) != (self.out_dim, self.n):
            raise ValueError(f"QuantizedConv2d: code rows {tuple(code.shape)} do not match ({self.out_dim}, {self.n})")
        self.code = code
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_code(cls, module: nn.Conv2d, code: WeightCode) -> "QuantizedConv2d":
        """Wrap `code` (rows = module.weight flattened per output channel) with module's geometry and bias."""
        if module.padding_mode != "zeros":
            raise ValueError(f"QuantizedConv2d supports padding_mode='zeros', got {module.padding_mode!r}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, code=code)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return layer.train(module.training)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None}

    def _flat_to_weight(self, flat: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        return flat.reshape(self.out_channels, self.in_channels // self.groups, kh, kw)

    def _weight_to_flat(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _via_matmul(self) -> bool:
        return (not self.training and self.code.has_matmul and self.groups == 1 and not isinstance(self.padding, str)
                and self.code.conv_via_matmul())

    def flops(self, rows: int) -> tuple[int, int]:
        """(table, accumulate) FLOPs for `rows` output positions: the code's count when the convolution runs
        through its matmul, else the dense convolution's."""
        if self.code.has_matmul and not self._via_matmul():
            return 0, 2 * rows * self.out_dim * self.n
        return super().flops(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._via_matmul():
            return self._im2col_forward(x)
        return F.conv2d(x, self.dequantize().to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _im2col_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval with a code's fast matmul: x (B, cin, H, W) -> im2col (B, Ho*Wo, cin*kh*kw), whose column order
        (cin, kh, kw) is the rows' -> code.matmul -> (B, out, Ho, Wo)."""
        if x.dim() != 4:
            raise ValueError(f"QuantizedConv2d expects x of shape (B, C, H, W), got {tuple(x.shape)}")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)     # (B, n, Ho*Wo)
        y = self.code.matmul(cols.transpose(1, 2))                                         # (B, Ho*Wo, out)
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, ho, wo)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


# ---------------------------------------------------------------- what every method's config and handler need

def check_layer(module: nn.Module, name: str, method: str) -> None:
    """Raise unless `module` is an nn.Linear or an nn.Conv2d with zeros padding (what QuantizedLinear /
    QuantizedConv2d can stand for); the message names the layer and the method."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"layer {name!r}: {method} supports nn.Linear and nn.Conv2d, not {type(module).__name__}")
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: {method} supports padding_mode='zeros', got {module.padding_mode!r}")


def wrap(module: nn.Module, code: WeightCode) -> QuantizedLayer:
    """The quantized layer standing for `module` (nn.Linear or nn.Conv2d) with weight `code` (moved to the
    module's device), its bias and training mode."""
    cls = QuantizedConv2d if isinstance(module, nn.Conv2d) else QuantizedLinear
    return cls.from_code(module, code.to(module.weight.device))

