"""Quantization-aware factorization (QAF, Cherniuk et al.): a CP decomposition of a layer's weight whose factors
lie on a b-bit uniform grid, found by ADMM, against the baseline CP-ALS + post-training quantization (PTQ).

A conv kernel W (O, I, kh, kw) or a linear weight W (O, I) is approximated by R rank-one terms

    W[o, i, y, x] ~ sum_r  lambda_r * A_O[o, r] * A_I[i, r] * A_h[y, r] * A_w[x, r]

with integer factors A_n in {-(2^(b-1)-1), ..., 2^(b-1)-1} (symmetric b-bit grid, per-column scales merged into
one float32 lambda_r).  In eval mode the layer then runs the CP sequence (`QAFCode.conv2d` / `QAFCode.matmul`):

    Conv2d   1x1 conv I -> R,  depthwise kh x 1 (stride, padding, dilation along h),
             depthwise 1 x kw (along w),  1x1 conv R -> O (+ bias)
    Linear   x -> A_I^T x (R) -> (A_O * lambda) (.) (O) (+ bias): two thin linears

`cp_decompose(weight, rank, bits, algorithm)`:
    "als"   CP-ALS (`tensorly.decomposition.parafac`, numpy backend, SVD init); with `bits` the factors are then
            quantized (PTQ): column norms balanced across modes, per-column scale by a small clipping search.
    "admm"  starts from that ALS solution and alternates over the modes (AO-ADMM, Huang et al. 2016): for mode n,
            G = Hadamard product of the other factors' Gram matrices, F = W_(n) KhatriRao(others),
            rho = trace(G) / R * rho_growth^(sweep - 1), and `inner` ADMM steps
                A~  = (F + rho (Z + U)) (G + rho I)^-1          least squares, pulled to Z
                Z   = Q(A~ - U)                                  projection on the b-bit grid (per-column scale)
                U   = U + Z - A~                                 scaled dual
            the other modes enter through their quantized Z.  Residual history per outer iteration: primal
            ||Z - A~|| / ||Z|| and dual ||Z - Z_prev|| / ||Z|| (the change of Z in the last inner step; both summed over
            the modes).  The returned
            factors are the best quantized iterate (so never worse than PTQ of the ALS start).

`QAFConfig(rank | rank_ratio, bits, algorithm="admm" | "ptq")` for `quantize_`: kind "qaf" codes held by the
usual QuantizedConv2d / QuantizedLinear layers; the code's `conv2d` / `matmul` run the sequence.  Stored: each
integer factor packed at b bits (`packing`), lambda (R,) float32, the bias; `compressed_size` counts exactly that.
FLOPs: the sequence's own multiply-adds (`QAFCode.flops`, `QAFCode.conv_flops`).

    >>> import vqlab.methods.qaf as qaf
    >>> vqlab.quantize_(model, qaf.QAFConfig(rank_ratio=0.25, bits=4, algorithm="admm"))
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bits import packed_bytes
from ..checks import check_bool, check_choice, check_int, check_number
from ..codes import CodeSize, WeightCode, packed_ans_bytes, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..kernels.flops import conv_out_hw
from ..layers import QuantizedConv2d, quantized_layer

__all__ = ["CPResult", "cp_decompose", "quantize_factors", "cp_reconstruct", "QAFCode", "QAFConfig", "layer_rank",
           "max_rank"]

_CLIPS = torch.linspace(0.5, 1.0, 11, dtype=torch.float64)


# ---------------------------------------------------------------- helpers

def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_factors(a: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric b-bit quantization of each column of a (I, R): q in [-(2^(b-1)-1), 2^(b-1)-1] (int64) and the
    column scales (R,), chosen among max|a| * c / qmax for 11 clip fractions c in [0.5, 1] by least squared error.
    a ~ q * scale."""
    qm = _qmax(bits)
    a = a.double()
    top = a.abs().amax(0).clamp_min(1e-30)                              # (R,)
    scales = top[None] * _CLIPS.to(a.device)[:, None] / qm              # (C, R)
    q = (a[None] / scales[:, None]).round().clamp(-qm, qm)              # (C, I, R)
    err = (q * scales[:, None] - a[None]).pow(2).sum(1)                 # (C, R)
    best = err.argmin(0)                                                # (R,)
    cols = torch.arange(a.shape[1], device=a.device)
    return q[best, :, cols].T.long(), scales[best, cols]


def _dequant(a: torch.Tensor, bits: int) -> torch.Tensor:
    q, s = quantize_factors(a, bits)
    return q.double() * s


def _kr(mats: list[torch.Tensor]) -> torch.Tensor:
    """Khatri-Rao product of (I_m, R) matrices, the first index slowest: (prod I_m, R)."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])
    return out


def _unfold(x: torch.Tensor, n: int) -> torch.Tensor:
    """Mode-n unfolding (I_n, prod of the other sizes, C order): x_(n) = A_n KR(others)^T for a CP tensor."""
    return x.movedim(n, 0).reshape(x.shape[n], -1)


def cp_reconstruct(factors: list[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_r weights_r * outer(factors[0][:, r], factors[1][:, r], ...): the full tensor (I_0, ..., I_{N-1})."""
    shape = [f.shape[0] for f in factors]
    lead = factors[0] if weights is None else factors[0] * weights
    return (lead @ _kr(factors[1:]).T).reshape(shape)


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Equal column norms across modes (lambda_r^(1/N) each), the same CP tensor."""
    norms = torch.stack([f.norm(dim=0) for f in factors]).clamp_min(1e-30)   # (N, R)
    target = norms.prod(0) ** (1.0 / len(factors))
    return [f / nrm * target for f, nrm in zip(factors, norms)]


def _rel(x: torch.Tensor, factors: list[torch.Tensor]) -> float:
    return float((cp_reconstruct(factors) - x).norm() / x.norm().clamp_min(1e-30))


def _als(x: torch.Tensor, rank: int, iters: int, seed: int) -> list[torch.Tensor]:
    """CP-ALS from an SVD start, or from a seeded random start where the SVD start gives a singular system (a
    weight with a single non-zero entry); an all-zero weight is its own exact decomposition (zero factors)."""
    from tensorly.decomposition import parafac

    if not bool(x.any()):
        return [torch.zeros(d, rank, dtype=torch.float64) for d in x.shape]
    for init in ("svd", "random"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                          # "n_eigenvecs larger than ..." (rank > a mode)
                cp = parafac(x.cpu().numpy(), rank, n_iter_max=iters, init=init, tol=1e-10, random_state=seed)
            break
        except np.linalg.LinAlgError as e:
            why = e
    else:
        raise ValueError(f"CP-ALS of rank {rank} found no solution for this {list(x.shape)} weight ({why})")
    w = torch.as_tensor(np.asarray(cp.weights), dtype=torch.float64)
    fs = [torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in cp.factors]
    fs[0] = fs[0] * w
    return _balance(fs)


# ---------------------------------------------------------------- the decomposition

@dataclass
class CPResult:
    """factors: N float64 (I_n, R) matrices with W ~ cp_reconstruct(factors) (dequantized when bits is set);
    q, scales: with bits, the integer factors (I_n, R) and the merged column scales lambda (R,) with
    factors = [q_0 * lambda, q_1, ..., q_{N-1}] (None without bits); rel_error: ||W - W_hat|| / ||W||;
    history: per iteration (ADMM: iter, primal, dual, rel_error; ALS: one row)."""

    factors: list[torch.Tensor]
    rel_error: float
    q: list[torch.Tensor] | None = None
    scales: torch.Tensor | None = None
    history: pd.DataFrame = field(default_factory=pd.DataFrame)


def _quantized_result(x: torch.Tensor, factors: list[torch.Tensor], bits: int, history: pd.DataFrame) -> CPResult:
    qs, ss = zip(*(quantize_factors(f, bits) for f in factors))
    lam = torch.stack(ss).prod(0)
    deq = [qs[0].double() * lam] + [q.double() for q in qs[1:]]
    return CPResult(deq, _rel(x, deq), list(qs), lam, history)


def cp_decompose(weight: torch.Tensor, rank: int, bits: int | None = None, algorithm: str = "admm", iters: int = 50,
                 inner: int = 5, als_iters: int = 200, seed: int = 0, rho_growth: float = 1.05) -> CPResult:
    """CP decomposition of a 4-D conv kernel (O, I, kh, kw) or a 2-D linear weight (O, I) with `rank` terms.

    algorithm="als": tensorly's CP-ALS; with bits, its factors quantized afterwards (PTQ).  algorithm="admm" (needs
    bits, 2..8): AO-ADMM from the ALS solution keeping every factor on its b-bit grid (module docstring),
    `iters` outer sweeps of `inner` ADMM steps per mode; rho grows by `rho_growth` per sweep (>= 1; > 1 makes the
    residuals vanish, as the grid constraint is not convex).  returns a CPResult."""
    if isinstance(rho_growth, bool) or not isinstance(rho_growth, (int, float)) or not rho_growth >= 1.0:
        raise ValueError(f"rho_growth must be a float >= 1, got {rho_growth!r}")
    check_choice("algorithm", algorithm, ("admm", "als"))
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D or 4-D float tensor, got {getattr(weight, 'shape', type(weight))}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {list(weight.shape)}")
    if weight.is_meta or not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must hold finite values (no NaN, Inf or meta-device data)")
    check_int("rank", rank, 1, max_rank(weight.shape))
    check_int("iters", iters, 1)
    check_int("inner", inner, 1)
    if bits is not None:
        check_int("bits", bits, 2, 8)
    elif algorithm == "admm":
        raise ValueError("algorithm='admm' needs bits (the grid its factors are kept on); use algorithm='als' "
                         "without")
    x = weight.detach().double().cpu()
    factors = _als(x, rank, als_iters, seed)
    if algorithm == "als":
        hist = pd.DataFrame([{"iter": 0, "primal": float("nan"), "dual": float("nan"), "rel_error": _rel(x, factors)}])
        if bits is None:
            return CPResult(factors, _rel(x, factors), history=hist)
        return _quantized_result(x, factors, bits, hist)

    n_modes = x.dim()
    z = [_dequant(f, bits) for f in factors]
    u = [torch.zeros_like(f) for f in factors]
    unfolded = [_unfold(x, n) for n in range(n_modes)]
    best, best_err = [t.clone() for t in z], _rel(x, z)
    rows = [{"iter": 0, "primal": float("nan"), "dual": float("nan"), "rel_error": best_err}]
    eye = torch.eye(rank, dtype=torch.float64)
    for it in range(1, iters + 1):
        p_num = p_den = d_num = 0.0
        for n in range(n_modes):
            others = [z[m] for m in range(n_modes) if m != n]
            g = torch.ones(rank, rank, dtype=torch.float64)
            for o in others:
                g = g * (o.T @ o)
            f = unfolded[n] @ _kr(others)                               # (I_n, R)
            rho = max(float(g.trace()) / rank, 1e-12) * rho_growth ** (it - 1)
            chol = torch.linalg.cholesky(g + rho * eye)
            for _ in range(inner):
                a = torch.cholesky_solve((f + rho * (z[n] + u[n])).T, chol).T
                z_old = z[n]
                z[n] = _dequant(a - u[n], bits)
                u[n] = u[n] + z[n] - a
            p_num += float((z[n] - a).pow(2).sum())
            p_den += float(z[n].pow(2).sum())
            d_num += float((z[n] - z_old).pow(2).sum())
        err = _rel(x, z)
        rows.append({"iter": it, "primal": math.sqrt(p_num / max(p_den, 1e-300)),
                     "dual": math.sqrt(d_num / max(p_den, 1e-300)), "rel_error": err})
        if err < best_err:
            best, best_err = [t.clone() for t in z], err
    return _quantized_result(x, best, bits, pd.DataFrame(rows))


# ---------------------------------------------------------------- the code and the layers

class _RoundSTE(torch.autograd.Function):
    """round(x) clamped to [-qmax, qmax] forward, the identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qmax: int) -> torch.Tensor:
        return torch.round(x).clamp(-qmax, qmax)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


@register_code
class QAFCode(WeightCode):
    """Quantized CP factors of one layer: buffers q0..q{N-1} (dims[n], R) uint8 holding q + 2^(b-1) - 1 (packed at
    b bits) and `scale` (R,) float32, lambda.  dims: (O, I, kh, kw) for a conv, (O, I) for a linear.
    rows() = the reconstructed weight as rows (O, I * kh * kw).

    finetune=True: fine-tuning of the quantized factors on their grid — `scale` becomes a trainable parameter and
    every factor gets a training-only float copy `latent<n>` (initialised to its integers); a training forward uses
    round(latent) clamped to the grid (straight-through gradient to the latent) and writes those integers into
    q<n>, so the stored factors are always grid points (`latent*` are neither saved nor counted; `vqlab.load`
    rebuilds them from the integers)."""

    kind = "qaf"

    def __init__(self, dims: list[int], rank: int, bits: int, algorithm: str = "admm", rel_error: float = float("nan"),
                 finetune: bool = False):
        super().__init__()
        dims = [int(v) for v in dims]
        if len(dims) not in (2, 4) or min(dims) < 1:
            raise ValueError(f"dims must be 2 or 4 positive sizes, got {dims}")
        check_int("rank", rank, 1)
        check_int("bits", bits, 2, 8)
        check_choice("algorithm", algorithm, ("admm", "ptq"))
        self.dims, self.rank, self.bits, self.algorithm = dims, rank, bits, algorithm
        self.rel_error = float(rel_error)
        for i, d in enumerate(dims):
            self.register_buffer(f"q{i}", torch.zeros(d, rank, dtype=torch.uint8))
        self.finetune = check_bool("finetune", finetune)
        if finetune:
            self.scale = nn.Parameter(torch.zeros(rank))
            for i in range(len(dims)):
                self.register_parameter(f"latent{i}", None)
        else:
            self.register_buffer("scale", torch.zeros(rank))

    @property
    def training_only(self) -> tuple[str, ...]:
        return tuple(f"latent{i}" for i in range(len(self.dims))) if self.finetune else ()

    @classmethod
    @torch.no_grad()
    def from_result(cls, dims: list[int], res: CPResult, bits: int, algorithm: str,
                    finetune: bool = False) -> "QAFCode":
        code = cls(dims, res.scales.numel(), bits, algorithm, res.rel_error, finetune)
        for i, q in enumerate(res.q):
            getattr(code, f"q{i}").copy_(q + _qmax(bits))
        code.scale.copy_(res.scales)
        code.after_load()
        return code

    @torch.no_grad()
    def after_load(self) -> None:
        """With finetune, (re)create the training-only float factors from the stored integers."""
        if self.finetune:
            for i, q in enumerate(self.ints()):
                setattr(self, f"latent{i}", nn.Parameter(q.clone()))

    def train_rows(self) -> torch.Tensor:
        """With finetune and a training forward: the rows from round(latent) on the grid (straight-through), the
        integers written into q<n>; otherwise rows()."""
        if not (self.finetune and self.training and torch.is_grad_enabled()) or self.latent0 is None:
            return self.rows()
        qm = _qmax(self.bits)
        ints = [_RoundSTE.apply(getattr(self, f"latent{i}"), qm) for i in range(len(self.dims))]
        with torch.no_grad():
            for i, q in enumerate(ints):
                getattr(self, f"q{i}").copy_((q.detach() + qm).to(torch.uint8))
        f = [ints[0] * self.scale] + ints[1:]
        return (f[0] @ _kr(f[1:]).T).reshape(self.shape)

    def ints(self) -> list[torch.Tensor]:
        """The integer factors (dims[n], R) as float32 (exact small integers)."""
        return [getattr(self, f"q{i}").float() - _qmax(self.bits) for i in range(len(self.dims))]

    def factors(self) -> list[torch.Tensor]:
        """Float32 factors with lambda folded into the output factor."""
        q = self.ints()
        return [q[0] * self.scale] + q[1:]

    @property
    def shape(self) -> tuple[int, int]:
        return self.dims[0], math.prod(self.dims[1:])

    def rows(self) -> torch.Tensor:
        f = self.factors()
        return (f[0] @ _kr(f[1:]).T).reshape(self.shape)

    def size(self, seen: set[int]) -> CodeSize:
        seen.update(id(t) for t in list(self.buffers()) + list(self.parameters()))
        index = sum(packed_bytes(getattr(self, f"q{i}").numel(), self.bits) for i in range(len(self.dims)))
        return CodeSize(index_bytes=index, other_bytes=stored_bytes(self.scale), ans_index_bytes=packed_ans_bytes(self),
                        index_bits=self.bits)

    def config(self) -> dict:
        out = {"dims": list(self.dims), "rank": self.rank, "bits": self.bits, "algorithm": self.algorithm,
               "rel_error": self.rel_error}
        if self.finetune:
            out["finetune"] = True
        return out

    @classmethod
    def from_config(cls, dims: list[int], rank: int, bits: int, algorithm: str = "admm",
                    rel_error: float = float("nan"), finetune: bool = False) -> "QAFCode":
        return cls(dims, rank, bits, algorithm, rel_error, finetune)

    def packing(self) -> dict[str, int]:
        return {f"q{i}": self.bits for i in range(len(self.dims))}

    def validate(self) -> None:
        hi = 2 * _qmax(self.bits)
        for i, d in enumerate(self.dims):
            q = getattr(self, f"q{i}")
            if tuple(q.shape) != (d, self.rank) or q.is_floating_point():
                raise ValueError(f"q{i} must be an integer tensor of shape {[d, self.rank]}, got {list(q.shape)} {q.dtype}")
            if q.numel() and (int(q.min()) < 0 or int(q.max()) > hi):
                raise ValueError(f"q{i} must lie in [0, {hi}] for {self.bits} bits, got max {int(q.max())}")
        if tuple(self.scale.shape) != (self.rank,) or not bool(torch.isfinite(self.scale).all()):
            raise ValueError(f"scale must be a finite ({self.rank},) tensor")

    def describe(self) -> dict:
        """bits_per_weight: stored factor bits per weight of the dense layer."""
        stored = self.bits * sum(d * self.rank for d in self.dims)
        return {"method": self.kind, "setting": f"{self.algorithm} rank={self.rank} bits={self.bits}", "K": None,
                "d": None, "bits_per_weight": stored / (self.shape[0] * self.shape[1])}

    # -- the CP sequence
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A linear layer as two thin products: x (..., I) -> (..., R) -> (..., O) + bias."""
        out_f, in_f = self.factors()
        return F.linear(F.linear(x, in_f.T.to(x.dtype)), out_f.to(x.dtype), bias)

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """Linear: the two thin products, 2 * rows * R * (I + O)."""
        return 0, 2 * rows * self.rank * (self.dims[1] + self.dims[0])

    def conv2d(self, x: torch.Tensor, layer: QuantizedConv2d) -> torch.Tensor:
        """A convolution (groups 1) as the sequence 1x1 (I -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> O);
        x: (B, I, H, W) already padded by the layer (`pad_input`) -> (B, O, Ho, Wo), plus the layer's bias."""
        out_f, in_f, h_f, w_f = (f.to(x.dtype) for f in self.factors())
        r = self.rank
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, layer.conv_padding
        y = F.conv2d(x, in_f.T[:, :, None, None])
        y = F.conv2d(y, h_f.T[:, None, :, None], stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r)
        y = F.conv2d(y, w_f.T[:, None, None, :], stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r)
        return F.conv2d(y, out_f[:, :, None, None], layer.bias)

    def conv_flops(self, layer: QuantizedConv2d, x_shape: tuple[int, ...] | None, rows: int) -> tuple[int, int]:
        """The sequence's FLOPs on an input x_shape (B, I, H, W): 2 * (B H W I R + B Ho W R kh + B Ho Wo R kw +
        B Ho Wo R O), H, W after the layer's `pre_pad`; without x_shape H, W are taken as Ho, Wo."""
        o, i, kh, kw = self.dims
        r = self.rank
        if x_shape is None:
            return 0, 2 * rows * r * (i + kh + kw + o)
        b, h, w = x_shape[0], x_shape[-2], x_shape[-1]
        if layer.pre_pad is not None:
            left, right, top, bottom = layer.pre_pad
            h, w = h + top + bottom, w + left + right
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, layer.conv_padding
        ho, wo = conv_out_hw((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
        return 0, 2 * b * r * (h * w * i + ho * w * kh + ho * wo * kw + ho * wo * o)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, rank={self.rank}, bits={self.bits}, algorithm={self.algorithm!r}"


# ---------------------------------------------------------------- config and handler

def max_rank(dims) -> int:
    """The largest CP rank a tensor of these sizes can need: the product of its sizes over the largest (a matrix:
    its smaller side); a higher rank only adds numbers (and tensorly cannot fit it)."""
    dims = [int(v) for v in dims]
    return max(1, math.prod(dims) // max(dims)) if dims and min(dims) > 0 else 1


def layer_rank(module: nn.Module, rank: int | None = None, rank_ratio: float | None = None,
               name: str = "layer") -> int:
    """The CP rank of a layer: `rank`, or rank_ratio * (dense weights) / (sum of the factor lengths), rounded,
    at least 1 (so the factors hold about rank_ratio of the dense layer's numbers).  raises ValueError naming the
    layer when it exceeds `max_rank` of the weight (checked before anything is allocated)."""
    dims = list(module.weight.shape)
    r = rank if rank is not None else max(1, round(min(rank_ratio * math.prod(dims) / sum(dims), 2.0 ** 62)))
    top = max_rank(dims)
    if r > top:
        what = f"rank={rank}" if rank is not None else f"rank_ratio={rank_ratio!r} gives rank {r}, which"
        raise ValueError(f"{name}: {what} exceeds the largest CP rank {top} of its {dims} weight (the product of "
                         f"its sizes over the largest); use a rank <= {top}")
    return r


@dataclass(frozen=True)
class QAFConfig(QuantConfig):
    """Quantization-aware CP factorization of every chosen layer (see the module docstring).

    Args:
        rank: CP rank R of every layer; or rank_ratio: R per layer from the fraction of the dense weight count the
            factors hold (`layer_rank`).  Give exactly one.
        bits: factor bits b, 2..8 (symmetric grid, 2^b - 1 levels).
        algorithm: "admm" (QAF) or "ptq" (the baseline: CP-ALS, then the factors quantized).
        iters, inner: ADMM outer sweeps and inner steps per mode.  als_iters: CP-ALS iterations.  seed: ALS seed.
        finetune: make the factors trainable on their grid and the scales trainable (`QAFCode`), for `vqlab.fit`.
    Example:
        >>> quantize_(model, QAFConfig(rank_ratio=0.25, bits=4, algorithm="admm"))
    """

    name: ClassVar[str] = "qaf"
    rank: int | None = None
    rank_ratio: float | None = None
    bits: int = 4
    algorithm: str = "admm"
    iters: int = 30
    inner: int = 5
    als_iters: int = 200
    seed: int = 0
    finetune: bool = False

    def validate(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError(f"give exactly one of rank and rank_ratio, got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}")
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        else:
            check_number("rank_ratio", self.rank_ratio, 0, low_open=True)
        check_int("bits", self.bits, 2, 8)
        check_choice("algorithm", self.algorithm, ("admm", "ptq"))
        check_int("iters", self.iters, 1)
        check_int("inner", self.inner, 1)
        check_int("als_iters", self.als_iters, 1)
        check_int("seed", self.seed, 0)
        check_bool("finetune", self.finetune)

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"layer {name!r}: QAF factorizes convolutions with groups=1, got groups={module.groups}")
        if module.weight.is_meta:
            raise ValueError(f"layer {name!r}: the weight is on the meta device (no values to factorize)")
        if not bool(torch.isfinite(module.weight).all()):
            raise ValueError(f"layer {name!r}: weight has non-finite values")
        layer_rank(module, self.rank, self.rank_ratio, f"layer {name!r}")


@register_handler(QAFConfig)
def _qaf_handler(modules: list[tuple[str, nn.Module]], config: QAFConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        rank = layer_rank(m, config.rank, config.rank_ratio, f"layer {name!r}")
        try:
            res = cp_decompose(m.weight, rank, config.bits, "admm" if config.algorithm == "admm" else "als",
                               iters=config.iters, inner=config.inner, als_iters=config.als_iters, seed=config.seed)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        code = QAFCode.from_result(list(m.weight.shape), res, config.bits, config.algorithm, config.finetune)
        yield name, quantized_layer(m, code)
