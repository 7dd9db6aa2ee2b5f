"""Gong et al. 2014, "Compressing Deep Convolutional Networks using Vector Quantization": the paper's
post-training quantizers of a layer's weight, each a `WeightCode` with a frozen config and a handler, so that
`quantize_`, `compressed_size`, `save`/`load` and `count_flops` work on them unchanged.

Every method sees a layer's weight as its rows W (out, n): nn.Linear's weight (out, in), nn.Conv2d's kernel
flattened per output channel (out, cin/groups * kh * kw).

    BinaryConfig()                       W ~ alpha * sign(W), one alpha = mean |w| per output row;
                                         1 bit per weight + one float32 per row          (kind "gong_binary")
    ScalarConfig(k)                      scalar k-means on the individual weights of a layer: a (k,) codebook and
                                         one ceil(log2 k)-bit index per weight            (kind "gong_scalar")
    PQConfig(k, subspaces, axis)         product quantization: W split into `subspaces` blocks, one k-entry
                                         codebook per block, one index per vector          (kind "gong_pq")
    RVQConfig(k, stages, d)              residual quantization of length-d row segments over `stages` stages,
                                         one k-entry codebook per stage                    (kind "gong_rvq")

Import this module to register the configs:

    >>> import vqlab, vqlab.methods.gong as gong
    >>> vqlab.quantize_(model, gong.PQConfig(k=16, subspaces=4))

PQ and RVQ run through the lookup-table kernels in eval mode (`WeightCode.matmul`): RVQ is one `vq_matmul` per
stage, summed; PQ along the input axis one per sub-space, each a table of the sub-space's K dot products; PQ along
the output axis sums each input over the columns sharing a code ("bucket sums", one add per weight column) and
multiplies the (K,) sums by the sub-space codebook.  Their FLOPs (`flops`) are those ops' own formulas, as
FlopCounterMode counts them.  Convolutions take the same path on im2col rows (`conv2d`) when a lookup-table
backend is pinned (`vqlab.kernels.set_backend("numba")`); otherwise they convolve with the rebuilt weight (on
narrow convolutions the im2col product costs more FLOPs and memory than the dense convolution, see `count_flops`).

The paper's methods are post-training: codebooks and indices are buffers.  `finetune=True` (scalar, PQ, RVQ) makes
the codebooks trainable parameters instead (indices fixed), so `vqlab.fit` fine-tunes the codewords, the gradient
of each being the sum over the weights or vectors that use it — an option the paper does not have, for the
comparison of notebook 08.  Stored bytes (`size`) are exactly what `vqlab.save` writes for the code's tensors:
index buffers bit-packed at the bits `packing()` names, codebooks / scales raw at float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import register_flop_formula

from ..bits import bits_for, huffman_bytes, pack_indices, packed_bytes
from ..checks import check_bool, check_choice, check_int
from ..codebook import kmeans, pq_decode, product_quantize, residual_quantize, rvq_decode
from ..codes import CodeSize, WeightCode, add_bias, packed_ans_bytes, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..kernels.flops import bucket_flops, lut_flops
from ..kernels.ops import vq_matmul
from ..kernels.reference import check_indices
from ..kernels.registry import pinned_backend
from ..layers import QuantizedConv2d, quantized_layer

__all__ = ["BinaryConfig", "BinaryCode", "ScalarConfig", "ScalarCode", "PQConfig", "PQCode", "RVQConfig", "RVQCode"]

MAX_K = 1 << 16


# ---------------------------------------------------------------- helpers

def _flat(w: torch.Tensor) -> torch.Tensor:
    """A layer weight as float32 rows (out, n), detached."""
    return w.detach().reshape(len(w), -1).float()


def _idx_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int32


def _check_indices(name: str, idx: torch.Tensor, k: int) -> None:
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"{name} must lie in [0, {k}), got range [{int(idx.min())}, {int(idx.max())}]")


def _check_float(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape {list(shape)}, got {list(t.shape)} {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values")


def _rows_n(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return w.shape[0], w[0].numel()


def _lut_pinned() -> bool:
    """True when a lookup-table backend is pinned (set_backend / $VQLAB_BACKEND other than dense / torch)."""
    return pinned_backend() not in (None, "dense", "torch")


class _LUTConv:
    """Convolutions of a code with a lookup-table `matmul`: on im2col rows when a lookup-table backend is
    pinned and the layer allows it, else (None) the dense convolution of the rebuilt weight."""

    def conv2d(self, x: torch.Tensor, layer: QuantizedConv2d) -> torch.Tensor | None:
        return layer.im2col_matmul(x, self.matmul) if _lut_pinned() else None

    def conv_flops(self, layer: QuantizedConv2d, x_shape: tuple[int, ...], rows: int) -> tuple[int, int] | None:
        return self.flops(rows) if _lut_pinned() and layer.im2col_applies() else None


def _mark(seen: set[int], code: nn.Module) -> None:
    seen.update(id(t) for t in list(code.buffers()) + list(code.parameters()))


def _table(code: nn.Module, name: str, t: torch.Tensor, trainable: bool) -> None:
    """Register a codebook tensor as a trainable parameter (finetune=True) or a buffer."""
    check_bool("finetune", trainable)
    if trainable:
        setattr(code, name, nn.Parameter(t))
    else:
        code.register_buffer(name, t)


def _with_finetune(config: dict, finetune: bool) -> dict:
    return {**config, "finetune": True} if finetune else config


# ---------------------------------------------------------------- binarization

@register_code
class BinaryCode(WeightCode):
    """W ~ alpha * sign(W): `signs` (rows, n) uint8 bits (1 = w >= 0, i.e. sign(0) is taken as +1, since one bit
    cannot hold 0), packed at 1 bit, and `alpha` (rows,) float32 = mean |w| of each row (the L2-optimal scale
    for fixed signs)."""

    kind = "gong_binary"

    def __init__(self, rows: int, n: int):
        super().__init__()
        self.register_buffer("signs", torch.zeros(rows, n, dtype=torch.uint8))
        self.register_buffer("alpha", torch.zeros(rows))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "BinaryCode":
        flat = _flat(weight)
        code = cls(*flat.shape)
        code.signs.copy_(flat >= 0)
        code.alpha.copy_(flat.abs().mean(1))
        return code

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    def rows(self) -> torch.Tensor:
        return self.alpha[:, None] * (2.0 * self.signs.float() - 1.0)

    def size(self, seen: set[int]) -> CodeSize:
        _mark(seen, self)
        return CodeSize(index_bytes=packed_bytes(self.signs.numel(), 1), other_bytes=stored_bytes(self.alpha),
                        ans_index_bytes=packed_ans_bytes(self), streams=[pack_indices(self.signs, 1)], k=2, d=1, index_bits=1)

    def config(self) -> dict:
        return {"rows": self.shape[0], "n": self.shape[1]}

    @classmethod
    def from_config(cls, rows: int, n: int) -> "BinaryCode":
        check_int("rows", rows, 1)
        check_int("n", n, 1)
        return cls(rows, n)

    def packing(self) -> dict[str, int]:
        return {"signs": 1}

    def validate(self) -> None:
        _check_indices("signs", self.signs, 2)
        _check_float("alpha", self.alpha, (self.shape[0],))

    def describe(self) -> dict:
        return {"method": self.kind, "setting": "sign", "K": 2, "d": 1, "bits_per_weight": 1.0}

    def extra_repr(self) -> str:
        return f"rows={self.shape[0]}, n={self.shape[1]}"


@dataclass(frozen=True)
class BinaryConfig(QuantConfig):
    """Gong et al.'s binarization: W ~ alpha * sign(W), one float32 alpha (mean |w|) per output row.

    Example:
        >>> quantize_(model, BinaryConfig())
    """

    name: ClassVar[str] = "gong_binary"


@register_handler(BinaryConfig)
def _binary_handler(modules: list[tuple[str, nn.Module]], config: BinaryConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        yield name, quantized_layer(m, BinaryCode.from_weight(m.weight))


# ---------------------------------------------------------------- scalar k-means

@register_code
class ScalarCode(WeightCode):
    """Scalar k-means of a layer's weights (Deep Compression style): `codebook` (k,) float32 and `indices`
    (rows, n) packed at ceil(log2 k) bits; rows() = codebook[indices]."""

    kind = "gong_scalar"

    def __init__(self, rows: int, n: int, k: int, finetune: bool = False):
        super().__init__()
        check_int("k", k, 2, MAX_K)
        self.k = k
        self.register_buffer("indices", torch.zeros(rows, n, dtype=_idx_dtype(k)))
        _table(self, "codebook", torch.zeros(k), finetune)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, k: int, iters: int = 25, seed: int = 0,
                    finetune: bool = False) -> "ScalarCode":
        flat = _flat(weight)
        res = kmeans(flat.reshape(-1, 1), k, iters=iters, seed=seed)
        code = cls(flat.shape[0], flat.shape[1], k, finetune)
        code.codebook.copy_(res.codebook[:, 0])
        code.indices.copy_(res.assignments.reshape(flat.shape))
        return code

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)

    def rows(self) -> torch.Tensor:
        return self.codebook[self.indices.long()]

    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.k)
        _mark(seen, self)
        return CodeSize(index_bytes=packed_bytes(self.indices.numel(), bits), codebook_bytes=stored_bytes(self.codebook),
                        entropy_index_bytes=huffman_bytes(self.indices, self.k), ans_index_bytes=packed_ans_bytes(self),
                        streams=[pack_indices(self.indices, bits)], k=self.k, d=1, index_bits=bits)

    def config(self) -> dict:
        return _with_finetune({"rows": self.shape[0], "n": self.shape[1], "k": self.k},
                              isinstance(self.codebook, nn.Parameter))

    @classmethod
    def from_config(cls, rows: int, n: int, k: int, finetune: bool = False) -> "ScalarCode":
        check_int("rows", rows, 1)
        check_int("n", n, 1)
        return cls(rows, n, k, finetune)

    def packing(self) -> dict[str, int]:
        return {"indices": bits_for(self.k)}

    def validate(self) -> None:
        _check_indices("indices", self.indices, self.k)
        _check_float("codebook", self.codebook, (self.k,))

    def describe(self) -> dict:
        return {"method": self.kind, "setting": f"K={self.k}", "K": self.k, "d": 1,
                "bits_per_weight": float(bits_for(self.k))}

    def extra_repr(self) -> str:
        return f"rows={self.shape[0]}, n={self.shape[1]}, k={self.k}"


@dataclass(frozen=True)
class ScalarConfig(QuantConfig):
    """Gong et al.'s scalar k-means: one k-entry codebook per layer, one ceil(log2 k)-bit index per weight.

    Args:
        k: codewords, 2..65536 (at most the layer's number of weights).
        iters: Lloyd iterations (>= 1).  seed: k-means seed (int >= 0).
        finetune: make the codebook trainable (module docstring).
    Example:
        >>> quantize_(model, ScalarConfig(k=16))
    """

    name: ClassVar[str] = "gong_scalar"
    k: int = 16
    iters: int = 25
    seed: int = 0
    finetune: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 2, MAX_K)
        check_int("iters", self.iters, 1)
        check_int("seed", self.seed, 0)
        check_bool("finetune", self.finetune)

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        rows, n = _rows_n(module)
        if self.k > rows * n:
            raise ValueError(f"layer {name!r}: k={self.k} is larger than its {rows * n} weights")


@register_handler(ScalarConfig)
def _scalar_handler(modules: list[tuple[str, nn.Module]], config: ScalarConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        yield name, quantized_layer(m, ScalarCode.from_weight(m.weight, config.k, config.iters, config.seed,
                                                              config.finetune))


# ---------------------------------------------------------------- product quantization

@torch.library.custom_op("vqlab::pq_bucket_matmul", mutates_args=())
def _pq_bucket_matmul(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """PQ along the output axis: x (..., n), codebooks (s, K, L), codes (s, n) -> (..., s * L).

    Output block i is sum_j x_j * codebooks[i, codes[i, j]] = (bucket sums of x by code) @ codebooks[i]."""
    return _pq_bucket(x, codebooks, codes)


def _pq_bucket(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The op's computation in differentiable torch ops (its backward recomputes it under autograd)."""
    s, k, length = codebooks.shape
    n = codes.shape[1]
    check_indices(codes, k, what="codes")
    xf = x.reshape(-1, n)
    dtype = torch.float64 if xf.dtype == torch.float64 else torch.float32
    xf = xf.to(dtype)
    sums = xf.new_zeros(s, xf.shape[0], k)
    for i in range(s):
        sums[i].index_add_(1, codes[i].long(), xf)
    y = torch.bmm(sums, codebooks.to(dtype))                      # (s, B, L)
    return y.transpose(0, 1).reshape(*x.shape[:-1], s * length).to(x.dtype)


@_pq_bucket_matmul.register_fake
def _(x, codebooks, codes):
    return x.new_empty((*x.shape[:-1], codebooks.shape[0] * codebooks.shape[2]))


def _pq_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _pq_backward(ctx, grad: torch.Tensor):
    """The gradients of the product w.r.t. x and the codebooks (input saliency, training through an eval model)."""
    x, codebooks, codes = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    with torch.enable_grad():
        xr, br = x.detach().requires_grad_(need_x), codebooks.detach().requires_grad_(need_b)
        y = _pq_bucket(xr, br, codes)
        wanted = [t for t in (xr, br) if t.requires_grad]
        got = iter(torch.autograd.grad(y, wanted, grad.to(y.dtype)) if wanted else ())
    return (next(got) if need_x else None), (next(got) if need_b else None), None


torch.library.register_autograd("vqlab::pq_bucket_matmul", _pq_backward, setup_context=_pq_setup)


@register_flop_formula(torch.ops.vqlab.pq_bucket_matmul)
def _(x_shape, codebooks_shape, codes_shape, *args, out_shape=None, **kwargs) -> int:
    s, k, length = codebooks_shape
    return sum(bucket_flops(math.prod(x_shape[:-1]), s, codes_shape[1], k, length))


def _pq_vectors(flat: torch.Tensor, axis: str) -> torch.Tensor:
    """The matrix whose rows PQ clusters: W (out, n) for axis="input", W.T (n, out) for axis="output"."""
    return flat if axis == "input" else flat.T.contiguous()


@register_code
class PQCode(_LUTConv, WeightCode):
    """Product quantization of a layer's rows W (out, n), as in Gong et al. Sec. 3.3: W is split into s blocks
    and k-means runs on the vectors of each block, one k-entry codebook per block.

    axis="input": W = [W_1 ... W_s] split along the input (column) axis into s blocks of n/s in-features;
        the vectors of block i are the out row segments W_i[z, :] (length n/s).  s must divide n, k <= out.
    axis="output": W split along the output (row) axis into s blocks of out/s rows; the vectors of block i
        are its n column segments (length out/s), i.e. the same as axis="input" on W.T.  s | out, k <= n.

    Stored: `codes` (s, vectors) — one contiguous index stream per sub-space — packed at ceil(log2 k) bits and
    `codebooks` (s, k, length) float32.  With s = 1 this is plain k-means VQ of the rows (axis="input") or
    columns (axis="output").
    """

    kind = "gong_pq"

    def __init__(self, rows: int, n: int, k: int, subspaces: int, axis: str = "input", finetune: bool = False):
        super().__init__()
        check_int("k", k, 2, MAX_K)
        check_int("subspaces", subspaces, 1)
        check_choice("axis", axis, ("input", "output"))
        split, count = (n, rows) if axis == "input" else (rows, n)
        if split % subspaces:
            raise ValueError(f"subspaces={subspaces} must divide the {axis} axis length {split}")
        self.rows_, self.n, self.k, self.subspaces, self.axis = rows, n, k, subspaces, axis
        self.sub_d = split // subspaces
        self.register_buffer("codes", torch.zeros(subspaces, count, dtype=_idx_dtype(k)))
        _table(self, "codebooks", torch.zeros(subspaces, k, self.sub_d), finetune)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, k: int, subspaces: int, axis: str = "input", iters: int = 25,
                    seed: int = 0, finetune: bool = False) -> "PQCode":
        flat = _flat(weight)
        code = cls(flat.shape[0], flat.shape[1], k, subspaces, axis, finetune)
        res = product_quantize(_pq_vectors(flat, axis), k, subspaces, iters=iters, seed=seed)
        code.codebooks.copy_(res.codebooks)
        code.codes.copy_(res.codes.T)
        return code

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows_, self.n

    def rows(self) -> torch.Tensor:
        v = pq_decode(self.codebooks, self.codes.T)
        return v if self.axis == "input" else v.T

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ rows().T + bias, x: (..., n) -> (..., out).  axis="input": one LUT product per sub-space (its
        slice of x against its K codewords, then one table read per output); axis="output": bucket sums."""
        if self.axis == "output":
            return add_bias(torch.ops.vqlab.pq_bucket_matmul(x, self.codebooks, self.codes), bias)
        y = None
        for i in range(self.subspaces):
            part = vq_matmul(x[..., i * self.sub_d:(i + 1) * self.sub_d], self.codebooks[i],
                             self.codes[i].view(-1, 1))
            y = part if y is None else y + part
        return add_bias(y, bias)

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """axis="input": s tables of K dot products of length n/s, out * s table reads; axis="output": one add
        per input and sub-space (bucket sums), then a (K,) x (K, out/s) product per sub-space."""
        if self.axis == "output":
            return bucket_flops(rows, self.subspaces, self.n, self.k, self.sub_d)
        table, accum = lut_flops(rows, self.rows_, 1, self.sub_d, self.k, 1)
        return table * self.subspaces, accum * self.subspaces

    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.k)
        _mark(seen, self)
        entropy = sum(huffman_bytes(self.codes[i], self.k) for i in range(self.subspaces))
        return CodeSize(index_bytes=packed_bytes(self.codes.numel(), bits), codebook_bytes=stored_bytes(self.codebooks),
                        entropy_index_bytes=entropy, ans_index_bytes=packed_ans_bytes(self), streams=[pack_indices(self.codes, bits)], k=self.k,
                        d=self.sub_d, index_bits=bits)

    def config(self) -> dict:
        return _with_finetune({"rows": self.rows_, "n": self.n, "k": self.k, "subspaces": self.subspaces,
                               "axis": self.axis}, isinstance(self.codebooks, nn.Parameter))

    @classmethod
    def from_config(cls, rows: int, n: int, k: int, subspaces: int, axis: str = "input",
                    finetune: bool = False) -> "PQCode":
        check_int("rows", rows, 1)
        check_int("n", n, 1)
        return cls(rows, n, k, subspaces, axis, finetune)

    def packing(self) -> dict[str, int]:
        return {"codes": bits_for(self.k)}

    def validate(self) -> None:
        _check_indices("codes", self.codes, self.k)
        _check_float("codebooks", self.codebooks, (self.subspaces, self.k, self.sub_d))

    def describe(self) -> dict:
        return {"method": self.kind, "setting": f"K={self.k} subspaces={self.subspaces} axis={self.axis}",
                "K": self.k, "d": self.sub_d, "bits_per_weight": bits_for(self.k) / self.sub_d}

    def extra_repr(self) -> str:
        return (f"rows={self.rows_}, n={self.n}, k={self.k}, subspaces={self.subspaces}, axis={self.axis!r}")


@dataclass(frozen=True)
class PQConfig(QuantConfig):
    """Gong et al.'s product quantization (see `PQCode` for the two split axes).

    Args:
        k: codewords per sub-space codebook, 2..65536 (at most the number of vectors of a block: out for
            axis="input", n for axis="output").
        subspaces: s >= 1 blocks; must divide the split axis of every quantized layer.
        axis: "input" (split the in-features, cluster row segments; the paper's column split) or "output"
            (split the rows, cluster column segments).
        iters, seed: k-means iterations and seed (sub-space i uses seed + i).
        finetune: make the sub-space codebooks trainable (module docstring).
    Example:
        >>> quantize_(model, PQConfig(k=16, subspaces=4))
    """

    name: ClassVar[str] = "gong_pq"
    k: int = 16
    subspaces: int = 1
    axis: str = "input"
    iters: int = 25
    seed: int = 0
    finetune: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 2, MAX_K)
        check_int("subspaces", self.subspaces, 1)
        check_choice("axis", self.axis, ("input", "output"))
        check_int("iters", self.iters, 1)
        check_int("seed", self.seed, 0)
        check_bool("finetune", self.finetune)

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        rows, n = _rows_n(module)
        split, count = (n, rows) if self.axis == "input" else (rows, n)
        if split % self.subspaces:
            raise ValueError(f"layer {name!r}: subspaces={self.subspaces} does not divide its {self.axis} axis "
                             f"length {split}")
        if self.k > count:
            raise ValueError(f"layer {name!r}: k={self.k} is larger than its {count} vectors per sub-space "
                             f"(axis={self.axis!r})")


@register_handler(PQConfig)
def _pq_handler(modules: list[tuple[str, nn.Module]], config: PQConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        yield name, quantized_layer(m, PQCode.from_weight(m.weight, config.k, config.subspaces, config.axis,
                                                          config.iters, config.seed, config.finetune))


# ---------------------------------------------------------------- residual quantization

@register_code
class RVQCode(_LUTConv, WeightCode):
    """Residual VQ of length-d row segments: W (out, n) is cut into out * n / d segments (row-major, d | n);
    stage s runs k-means on what stages 0..s-1 left.  Stored: `codes` (t, segments) packed at ceil(log2 k)
    bits (t contiguous index streams) and `codebooks` (t, k, d) float32; rows() = sum over stages of the chosen
    codewords, and the product is one LUT product per stage, summed."""

    kind = "gong_rvq"

    def __init__(self, rows: int, n: int, k: int, stages: int, d: int, finetune: bool = False):
        super().__init__()
        check_int("k", k, 2, MAX_K)
        check_int("stages", stages, 1)
        check_int("d", d, 1)
        if n % d:
            raise ValueError(f"d={d} must divide the row length {n}")
        self.rows_, self.n, self.k, self.stages, self.d = rows, n, k, stages, d
        self.register_buffer("codes", torch.zeros(stages, rows * n // d, dtype=_idx_dtype(k)))
        _table(self, "codebooks", torch.zeros(stages, k, d), finetune)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, k: int, stages: int, d: int, iters: int = 25,
                    seed: int = 0, finetune: bool = False) -> "RVQCode":
        flat = _flat(weight)
        code = cls(flat.shape[0], flat.shape[1], k, stages, d, finetune)
        res = residual_quantize(flat.reshape(-1, d), k, stages, iters=iters, seed=seed)
        code.codebooks.copy_(res.codebooks)
        code.codes.copy_(res.codes.T)
        code.distortion_per_stage = res.distortion_per_stage           # not stored; for studies
        return code

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows_, self.n

    def rows(self) -> torch.Tensor:
        return rvq_decode(self.codebooks, self.codes.T).reshape(self.rows_, self.n)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ rows().T + bias, x: (..., n) -> (..., out): one LUT product per stage over the same segments."""
        y = None
        for s in range(self.stages):
            part = vq_matmul(x, self.codebooks[s], self.codes[s].view(self.rows_, -1))
            y = part if y is None else y + part
        return add_bias(y, bias)

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """t LUT products: per stage a table of K dot products per segment and one read per output and segment."""
        table, accum = lut_flops(rows, self.rows_, self.n // self.d, self.d, self.k, 1)
        return table * self.stages, accum * self.stages

    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.k)
        _mark(seen, self)
        entropy = sum(huffman_bytes(self.codes[s], self.k) for s in range(self.stages))
        return CodeSize(index_bytes=packed_bytes(self.codes.numel(), bits), codebook_bytes=stored_bytes(self.codebooks),
                        entropy_index_bytes=entropy, ans_index_bytes=packed_ans_bytes(self), streams=[pack_indices(self.codes, bits)], k=self.k, d=self.d,
                        index_bits=bits)

    def config(self) -> dict:
        return _with_finetune({"rows": self.rows_, "n": self.n, "k": self.k, "stages": self.stages, "d": self.d},
                              isinstance(self.codebooks, nn.Parameter))

    @classmethod
    def from_config(cls, rows: int, n: int, k: int, stages: int, d: int, finetune: bool = False) -> "RVQCode":
        check_int("rows", rows, 1)
        check_int("n", n, 1)
        return cls(rows, n, k, stages, d, finetune)

    def packing(self) -> dict[str, int]:
        return {"codes": bits_for(self.k)}

    def validate(self) -> None:
        _check_indices("codes", self.codes, self.k)
        _check_float("codebooks", self.codebooks, (self.stages, self.k, self.d))

    def describe(self) -> dict:
        return {"method": self.kind, "setting": f"K={self.k} stages={self.stages} d={self.d}", "K": self.k,
                "d": self.d, "bits_per_weight": self.stages * bits_for(self.k) / self.d}

    def extra_repr(self) -> str:
        return f"rows={self.rows_}, n={self.n}, k={self.k}, stages={self.stages}, d={self.d}"


@dataclass(frozen=True)
class RVQConfig(QuantConfig):
    """Gong et al.'s residual quantization of length-d row segments over `stages` k-entry codebooks.

    Args:
        k: codewords per stage, 2..65536 (at most the layer's out * n / d segments).
        stages: t >= 1 stages.  d: segment length >= 1; must divide every quantized layer's row length.
        iters, seed: k-means iterations and seed (stage s uses seed + s).
        finetune: make the stage codebooks trainable (module docstring).
    Example:
        >>> quantize_(model, RVQConfig(k=16, stages=2, d=4))
    """

    name: ClassVar[str] = "gong_rvq"
    k: int = 16
    stages: int = 2
    d: int = 4
    iters: int = 25
    seed: int = 0
    finetune: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 2, MAX_K)
        check_int("stages", self.stages, 1)
        check_int("d", self.d, 1)
        check_int("iters", self.iters, 1)
        check_int("seed", self.seed, 0)
        check_bool("finetune", self.finetune)

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        rows, n = _rows_n(module)
        if n % self.d:
            raise ValueError(f"layer {name!r}: d={self.d} does not divide its row length {n}")
        if self.k > rows * n // self.d:
            raise ValueError(f"layer {name!r}: k={self.k} is larger than its {rows * n // self.d} segments")


@register_handler(RVQConfig)
def _rvq_handler(modules: list[tuple[str, nn.Module]], config: RVQConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        yield name, quantized_layer(m, RVQCode.from_weight(m.weight, config.k, config.stages, config.d,
                                                           config.iters, config.seed, config.finetune))
