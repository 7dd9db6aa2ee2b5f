"""The seam, code side: a `WeightCode` is how one layer's weight is stored; `quantize_`'s report,
`compressed_size`, `save`/`load` and `count_flops` ask it instead of testing for a concrete class.

A code knows:

    shape, rows()          (out, n_pad) and the weight as rows in its layer's row layout, differentiable w.r.t. the
                           code's trainable parts (what training and the reference forward use)
    size(seen)             a `CodeSize`: bytes of packed indices / codebooks / other tensors, entropy-coded
                           (Huffman, ANS) index figures and the packed streams; objects whose id() is in `seen`
                           (a shared codebook, also across models) are counted once, and the code adds what it
                           counts.  Float tensors are counted with `stored_bytes` (at the storage dtype that
                           `compressed_size(store_dtype=...)` / `save(store_dtype=...)` set), integers at their dtype
    config(), packing()    the constructor arguments as JSON data and, per buffer, the bits to pack it at;
                           `from_config(**config)` rebuilds an empty code that `vqlab.load` fills — a file holds
                           data only, never pickle, and records the code by its registry name `kind`
    describe()             method (its one name), setting, K, d, bits_per_weight for reports and plots
    validate(), decoded_values()
                           checks of the stored values (`load` and `save` run them) and the count of values decoded
                           from compressed streams (bounded by `load` by the file's size)
    flops(rows, groups)    (table, accumulate) FLOPs for `rows` input vectors; the default is a dense product
and, optionally, its eval product `matmul(x)`, its own convolution `conv2d(x, layer)` (with `conv_flops`), a
training forward `train_rows()`, attributes its layer forwards to it (`layer_attrs`) and training-only tensors
(`training_only`: neither saved nor counted).

Codes register by `kind` (`@register_code`); a method is one module: a code, a config (`vqlab.config`) and a
handler.  The layers that hold a code are `vqlab.layers.QuantizedLinear` / `QuantizedConv2d`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
import torch.nn as nn

from .bits import ans_bytes
from .dtypes import check_store_dtype

__all__ = ["WeightCode", "CodeSize", "register_code", "CODES", "code_class", "tensor_bytes", "stored_dtype",
           "stored_bytes", "storing_as", "packed_ans_bytes", "add_bias"]

CODES: dict[str, type["WeightCode"]] = {}


def register_code(cls: type["WeightCode"]) -> type["WeightCode"]:
    """Class decorator: make a WeightCode subclass known by its `kind` (the name a file records)."""
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


def add_bias(y: torch.Tensor, bias: torch.Tensor | None, conv: bool = False) -> torch.Tensor:
    """y + bias in y's dtype (conv: bias over the channel dimension of (B, C, H, W)); y itself without a bias."""
    if bias is None:
        return y
    return y + (bias.to(y.dtype).view(1, -1, 1, 1) if conv else bias.to(y.dtype))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor at its dtype."""
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- the storage dtype of float tensors

# The storage dtype in effect while `storing_as` runs (None: every tensor at its own dtype).  A context
# variable, so that every code's `size(seen)` counts at it without a new argument; set only by `storing_as`.
_STORE_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("vqlab_store_dtype", default=None)


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
    """Base class of a stored weight; subclasses set `kind` and implement shape/rows/size/config/from_config.

    kind: the registry name files record (stable: renaming a class never breaks a file).  method: the method's
    one name, as its config's `name` (default: kind; a code may be one layout of a method, e.g. "vq_simd" of
    "vq").  layer_attrs: attribute names the holding layer reads and writes through to this code
    (`layer.codebook` for `layer.code.codebook`).  training_only: tensor attributes that are training state
    only, neither saved by `vqlab.save` nor counted by `compressed_size`.
    """

    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""
    layer_attrs: ClassVar[tuple[str, ...]] = ()
    training_only: ClassVar[tuple[str, ...]] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """(out, n_pad): the rows the code rebuilds."""
        raise NotImplementedError

    def rows(self) -> torch.Tensor:
        """The weight as (out, n_pad) rows, differentiable w.r.t. the code's trainable parts."""
        raise NotImplementedError

    def train_rows(self) -> torch.Tensor:
        """The rows a training forward uses (default: `rows()`; a code may add straight-through paths or count
        steps here)."""
        return self.rows()

    def size(self, seen: set[int]) -> "CodeSize":
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

    def decoded_values(self) -> int:
        """How many values the code decodes from its stored streams beyond its tensors' own sizes (a lattice code:
        its coordinates, from a compressed stream); `vqlab.load` refuses a file whose codes claim more than
        `vqlab.io.DECODE_CAP` + `DECODE_PER_BYTE` per payload byte before decoding any.  Default: 0."""
        return 0

    def after_load(self) -> None:
        """Rebuild training-only state after `vqlab.load` filled the stored tensors (default: nothing)."""

    def describe(self) -> dict:
        """Report fields: method (the method's one name), setting (its knobs, short), K, d, bits_per_weight
        (index bits per weight, codebooks not included); None where they mean nothing."""
        return {"method": self.method or self.kind, "setting": "", "K": None, "d": None, "bits_per_weight": None}

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """(table, accumulate) FLOPs of the product for `rows` input vectors (conv: output positions times
        batch), `groups` the convolution's groups; default: a dense product, 2 * rows * out * n, no table."""
        out, n = self.shape
        return 0, 2 * rows * out * n

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """An eval-mode product of the code's own, y = x @ rows().T + bias (x: (..., n_pad)), or None: the layer
        then runs F.linear on the rebuilt rows."""
        return None

    def conv2d(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
        """An eval-mode convolution of the code's own, bias (`layer.bias`) included (x: (B, C, H, W) already
        padded by the layer as `layer.conv_padding` says), or None: the layer then convolves with the rebuilt
        weight."""
        return None

    def conv_flops(self, layer: nn.Module, x_shape: tuple[int, ...] | None, rows: int) -> tuple[int, int] | None:
        """(table, accumulate) FLOPs of `conv2d` on an input of `x_shape` (None: not known) with `rows` = batch *
        output positions, or None when the layer convolves with the rebuilt weight (a dense count)."""
        return None
