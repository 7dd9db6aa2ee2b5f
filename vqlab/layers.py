"""VQ layers: `VQLinear` and `VQConv2d`, drop-in replacements for nn.Linear / nn.Conv2d.

A VQ layer stores its weight as a codebook and one index per weight segment of length d
(contracts: W_flat[i, s*d:(s+1)*d] = codebook[g(i)][indices[i, s]], y = x @ W_flat.T):

    codebook  a `vqlab.codebook.Codebook` module, .weight (G, K, d); G codebooks serve G equal
              consecutive blocks of output channels.  One Codebook object may be held by several
              layers (it is then one parameter, counted once by `vqlab.compressed_size`).
    indices   buffer (out, n_pad / d), dtype `index_dtype(K)` (uint8 for K <= 256).

Row layout (n = segmented length of one output channel's weights):
    VQLinear                     W_flat = weight                                  n = in_features
    VQConv2d segment="input"     W_flat = weight.permute(0, 2, 3, 1).reshape(out, -1)   (kh, kw, cin/groups)
                                 segments are runs of d input channels at one kernel position
    VQConv2d segment="kernel"    W_flat = weight.reshape(out, -1)                      (cin/groups, kh, kw)

Padding (pad=True, for d that does not divide the segmented dimension):
    VQLinear and segment="kernel": each row is zero-padded at its end to n_pad = ceil(n / d) * d;
        the layer pads x with zeros to n_pad before the kernel (zeros times any codeword add nothing).
    segment="input": the input channels of every conv group are zero-padded to ceil(cin_g / d) * d at
        every kernel position (so segments never straddle kernel positions); the layer zero-pads x's
        channels per conv group to match.
    `dequantize()` always returns the unpadded weight in nn.Linear / nn.Conv2d shape.

Training (VQ-DNN style weight sharing): in train mode the layer rebuilds W = dequantize(codebook,
indices) and calls F.linear / F.conv2d, so the gradient of every weight of a cluster sums into its
codeword.  In eval mode it computes through `vqlab.kernels.vq_matmul` / `vq_conv2d` (backend="auto").

Reassignment (`reassign_every=N > 0`): the layer keeps a float `latent` parameter (out, n_pad), the
weights before quantization, trained by a straight-through estimator (forward value = codebook weight,
its gradient = the dense weight gradient).  Every training forward with autograd enabled increments
`steps` (one per optimizer step under `vqlab.train.fit`); before forward number N+1, 2N+1, ... every
segment of `latent` is re-assigned to its nearest codeword (`reassign()`).  `latent` is training-only
state: `compressed_size` and `vqlab.save` leave it out and `vqlab.load` rebuilds it from the codebook.

Magnitude pruning (`from_float(..., prune=p)`, `VQConfig(prune=p)`, p in [0, 1)): in every codebook group
the floor(p * N_g + 1/2) segments of smallest L2 norm (N_g segments per group, ties to the lower index) are
assigned to codeword 0, which is pinned to the zero vector; k-means fits codewords 1..K-1 on the other
segments only (so K >= 3).  The rule is "index 0 == pruned": no mask is stored, the code carries the flag
`pinned_zero` (saved and loaded by `vqlab.save` / `vqlab.load`).  Training keeps codeword 0 exactly zero:
the rows are rebuilt from the codebook with row 0 replaced by zeros, so its gradient is exactly zero and
no optimizer step (nor `fit`'s float32 masters of a float16 codebook) moves it.  `reassign()` keeps every
pruned segment on codeword 0 and assigns the others among codewords 1..K-1 only: the sparsity pattern
is fixed, as in magnitude pruning with a mask (Han et al. 2016, Deep Compression, prune then share).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import FLOAT_DTYPE_NAMES, bits_for, index_bits_per_weight, index_dtype, pair
from .bits import huffman_bytes, pack_indices, packed_bytes
from .codebook import Codebook, assign, kmeans
from .kernels import vq_conv2d as _vq_conv2d, vq_matmul as _vq_matmul
from .kernels.ops import lut_flops, table_count
from .kernels.reference import check_codebook_groups, check_indices, dequantize as _dequantize
from .quantized import CodeSize, QuantizedLayer, WeightCode, packed_ans_bytes, register_code, stored_bytes

__all__ = ["VQLinear", "VQConv2d", "VQLayer", "VQCode", "vq_layer_class", "check_quantizable", "fit_codebook",
           "weight_segments", "segment_geometry", "FLOAT_DTYPES", "check_prune", "prune_count",
           "fit_pruned_codebook"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- helpers

def _label(name: str | None, module: nn.Module) -> str:
    """How errors name a layer: "layer 'features.3' (Conv2d)"."""
    kind = type(module).__name__
    return f"layer {name!r} ({kind})" if name else f"{kind} layer"


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _ceil_to(n: int, d: int) -> int:
    return -(-n // d) * d


def segment_geometry(in_dim: int, d: int, *, kernel: tuple[int, int] | None = None, segment: str = "input",
                     pad: bool = False, label: str = "layer") -> int:
    """The padded row length n_pad of one output channel cut into segments of length d (the one segment check).

    in_dim: in_features (Linear) or in_channels/groups (conv, with kernel=(kh, kw)).  Linear and
    segment="kernel" rows are padded at their end to a multiple of d; segment="input" pads the channels of
    every kernel position.  raises ValueError naming `label` when d does not divide the segmented dimension
    and pad is False, or segment is not 'input'/'kernel'.
    """
    if kernel is None:
        dim, what, where, n_pad = in_dim, "in_features", "", _ceil_to(in_dim, d)
    else:
        if segment not in ("input", "kernel"):
            raise ValueError(f"{label}: segment must be 'input' or 'kernel', got {segment!r}")
        kh, kw = kernel
        dim, what = (in_dim, "in_channels/groups") if segment == "input" else (in_dim * kh * kw, "in_channels/groups*kh*kw")
        n_pad = kh * kw * _ceil_to(in_dim, d) if segment == "input" else _ceil_to(dim, d)
        where = f" (segment={segment!r})"
    if dim % d and not pad:
        raise ValueError(f"{label}: d={d} does not divide {what}={dim}{where}; choose d in {_divisors(dim)} "
                         f"or pass pad=True")
    return n_pad


def _resolve_conv_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """nn.Conv2d padding (ints or 'same'/'valid') -> F.pad order (left, right, top, bottom)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        total = [dil * (k - 1) for k, dil in zip(kernel_size, dilation)]  # (h, w)
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = padding
    return (pw, pw, ph, ph)


def check_prune(prune, label: str = "layer") -> float:
    """`prune` as a float; ValueError naming `label`, `prune` and the value unless it is a number in [0, 1)."""
    if isinstance(prune, bool) or not isinstance(prune, numbers.Real) or not 0.0 <= float(prune) < 1.0:
        raise ValueError(f"{label}: prune must be a number in [0, 1) (the fraction of segments pinned to the zero "
                         f"codeword; 0 = no pruning), got prune={prune!r}")
    return float(prune)


def prune_count(segments: int, prune: float) -> int:
    """How many of a codebook group's `segments` are pruned: floor(prune * segments + 1/2) (round half up)."""
    return math.floor(prune * segments + 0.5)


def check_quantizable(module: nn.Module, k: int, d: int, *, groups: int = 1, segment: str = "input",
                      pad: bool = False, name: str | None = None, check_k: bool = True, prune: float = 0.0) -> int:
    """Check that `module` (nn.Linear / nn.Conv2d) can take a (K, d) codebook; return its segment count.

    Raises ValueError/TypeError naming the layer and the bad value: unsupported layer type or weight
    dtype, non-finite weights, K < 2, d not dividing the segmented dimension (unless pad), G not
    dividing the output channels, K larger than the segments one codebook serves (when check_k);
    with prune > 0: prune outside [0, 1), K < 3, or fewer unpruned segments per group than the K - 1
    learned codewords.
    returns: number of segments of the whole layer, out * n_pad / d.
    """
    label = _label(name, module)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"{label}: vector quantization supports nn.Linear and nn.Conv2d, not "
                        f"{type(module).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"{label}: codebook size K must be an integer >= 2, got K={k!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"{label}: segment length d must be an integer >= 1, got d={d!r}")
    w = module.weight
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{label}: weight dtype {w.dtype} is not supported; VQ needs one of "
                        f"{[str(t) for t in FLOAT_DTYPES]}")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"{label}: weight has {bad} non-finite value(s) (nan/inf); VQ needs finite weights")
    out = w.shape[0]
    kernel = tuple(w.shape[2:]) if isinstance(module, nn.Conv2d) else None
    n_pad = segment_geometry(w.shape[1], d, kernel=kernel, segment=segment, pad=pad, label=label)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or out % groups:
        raise ValueError(f"{label}: codebook groups G={groups!r} must be a positive divisor of the "
                         f"{out} output channels; valid: {_divisors(out)}")
    segments = out * n_pad // d
    if check_k and k > segments // groups:
        raise ValueError(f"{label}: K={k} is larger than the {segments // groups} segments each of the "
                         f"{groups} codebook(s) would serve (d={d}); use K <= {segments // groups}")
    prune = check_prune(prune, label)
    if prune:
        if k < 3:
            raise ValueError(f"{label}: prune={prune} pins codeword 0 to zero and needs K >= 3 (the zero codeword "
                             f"and at least 2 learned ones), got K={k}")
        per = segments // groups
        kept = per - prune_count(per, prune)
        if check_k and kept < k - 1:
            raise ValueError(f"{label}: prune={prune} leaves {kept} of the {per} segments each codebook serves, "
                             f"fewer than the K-1={k - 1} learned codewords; use a smaller prune or K <= {kept + 1}")
    return segments


@torch.no_grad()
def fit_codebook(segments: torch.Tensor, k: int, *, iters: int = 25, init: str = "kmeans++",
                 batch_size: int | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                 distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means codebooks for G groups of segments.

    segments: (G, N, d) float.  returns codebook (G, k, d) in `dtype` (default: segments' dtype) and
    assignments (G, N) int64, each segment's nearest codeword in the returned codebook.
    When a group has at most k distinct segments the codebook holds them exactly (the rest of the
    rows repeat them), so K >= #distinct segments reproduces the weights bit for bit.
    distributed: under torchrun, call on every rank with the same segments; each rank runs k-means on
        its rows [rank::world] (`kmeans(..., distributed=True)`: Lloyd, batch_size must be None), every
        rank gets rank 0's codebook bit for bit and assigns all N segments to it.  In one process the
        same as False.
    """
    g, n, d = segments.shape
    dtype = dtype or segments.dtype
    work = segments.float() if segments.dtype != torch.float64 else segments
    rank, world = _shards(work, batch_size) if distributed else (0, 1)
    books, codes = [], []
    for j in range(g):
        x = work[j]                                                    # (N, d)
        uniq, inv = torch.unique(x, dim=0, return_inverse=True)
        if len(uniq) <= k:
            fill = torch.arange(k - len(uniq), device=x.device) % len(uniq)
            books.append(torch.cat([uniq, uniq[fill]]))
            codes.append(inv)
            continue
        if world > 1:
            res = kmeans(x[rank::world], k, iters=iters, init=init, seed=seed + j, distributed=True)
        else:
            res = kmeans(x, k, iters=iters, init=init, batch_size=batch_size, seed=seed + j)
        book = res.codebook.to(dtype).to(x.dtype)                      # assign against the stored values
        books.append(book)
        codes.append(assign(x, book))
    return torch.stack(books).to(dtype), torch.stack(codes)


@torch.no_grad()
def fit_pruned_codebook(segments: torch.Tensor, k: int, prune: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_codebook` with magnitude pruning: codeword 0 is the zero vector and holds the pruned segments.

    segments: (G, N, d) float.  In each group the prune_count(N, prune) segments of smallest L2 norm (ties:
    the lower index) are assigned to codeword 0 = 0; codewords 1..k-1 are k-means (`fit_codebook(..., k - 1,
    **kw)`) on the other segments, taken in their original order, each assigned to its nearest of them.
    returns codebook (G, k, d) with codebook[:, 0] == 0 and assignments (G, N) int64 (0 exactly where pruned).
    """
    g, n, d = segments.shape
    cut = prune_count(n, prune)
    norms = segments.double().pow(2).sum(-1)                           # (G, N) squared L2 norms
    order = norms.argsort(dim=1, stable=True)                          # (G, N) smallest first
    keep = order[:, cut:].sort(dim=1).values                           # (G, N - cut) unpruned positions
    kept = torch.gather(segments, 1, keep[..., None].expand(-1, -1, d))  # (G, N - cut, d)
    book, codes = fit_codebook(kept, k - 1, **kw)                      # (G, k-1, d), (G, N - cut)
    book = torch.cat([book.new_zeros(g, 1, d), book], dim=1)           # (G, k, d), row 0 pinned to zero
    full = torch.zeros(g, n, dtype=torch.int64, device=segments.device)
    full.scatter_(1, keep, codes + 1)
    return book, full


def _shards(work: torch.Tensor, batch_size: int | None) -> tuple[int, int]:
    """(rank, world size) for `fit_codebook(distributed=True)`; (0, 1) in one process or with fewer segments
    than ranks.  Checks that every rank holds the same segments, else the ranks would part ways."""
    from . import distributed as _dist

    if batch_size is not None:
        raise ValueError(f"distributed k-means runs Lloyd iterations on all segments: batch_size must be None, "
                         f"got batch_size={batch_size}")
    if not _dist.init():
        return 0, 1
    bits = work.detach().contiguous().view(torch.int64 if work.dtype == torch.float64 else torch.int32)
    seen = _dist.all_gather_objects((tuple(work.shape), int(bits.sum(dtype=torch.int64))))  # exact, any order
    if any(s != seen[0] for s in seen):
        raise ValueError(f"distributed k-means needs the same weights on every rank; (shape, checksum) per rank: "
                         f"{seen}.  Load or seed the float model identically on every rank first")
    rank, world = _dist.rank(), _dist.world_size()
    return (rank, world) if work.shape[1] >= world else (0, 1)


# ---------------------------------------------------------------- the shared core

@register_code
class VQCode(WeightCode):
    """The VQ weight code: a Codebook (G, K, d) — possibly shared with other layers and models — and one
    index per segment, indices (rows, n_pad / d) of dtype `index_dtype(K)`.

    rows() = dequantize(codebook, indices): (rows, n_pad), differentiable w.r.t. the codebook.
    Stored: indices packed at ceil(log2 K) bits each (Huffman and ANS figures from their histogram); the
    codebook at its storage dtype (`stored_bytes`), once per object across everything counted with one `seen` set.

    pinned_zero=True (magnitude pruning, module docstring): codeword 0 of every group is the zero vector and
    index 0 means "pruned"; rows() rebuilds with row 0 replaced by zeros, so no gradient reaches it.  The flag is
    stored as the plain attribute `_pinned_zero`, set only on pinned codes (so `vqlab.save` writes it and files of
    unpruned models are unchanged).  It needs its own codebook (not a shared one) with K >= 3.
    """

    kind = "vq"
    method = "vq"

    def __init__(self, rows: int, n_pad: int, k: int, d: int, groups: int = 1, codebook: Codebook | None = None,
                 *, pinned_zero: bool = False, device=None, dtype=None):
        super().__init__()
        if pinned_zero and codebook is not None:
            raise ValueError("VQCode: pinned_zero=True (pruning) needs the layer's own codebook, not a shared one")
        if codebook is None:
            codebook = Codebook(k, d, groups, device=device, dtype=dtype)
        self.codebook = codebook
        self.register_buffer("indices", torch.zeros(rows, n_pad // codebook.d, dtype=index_dtype(codebook.k),
                                                    device=device))
        if pinned_zero:
            if codebook.k < 3:
                raise ValueError(f"VQCode: pinned_zero=True needs K >= 3 (the zero codeword and at least 2 learned "
                                 f"ones), got K={codebook.k}")
            self._pinned_zero = True           # a plain attribute: vqlab.save stores it in the module's state

    @property
    def pinned_zero(self) -> bool:
        """Whether codeword 0 is pinned to zero and index 0 marks a pruned segment."""
        return self.__dict__.get("_pinned_zero", False) is True

    def book(self) -> torch.Tensor:
        """The codebook (G, K, d) the rows are rebuilt from: `codebook.weight`, or with pinned_zero that weight
        with row 0 replaced by zeros (the same values, but no gradient flows into row 0)."""
        w = self.codebook.weight
        if not self.pinned_zero:
            return w
        return torch.cat([torch.zeros_like(w[:, :1]), w[:, 1:]], dim=1)

    def sparsity(self) -> float:
        """Fraction of segments pruned (on the pinned zero codeword); 0.0 without pinned_zero."""
        if not self.pinned_zero:
            return 0.0
        return float((self.indices == 0).sum()) / max(self.indices.numel(), 1)

    def __setattr__(self, name: str, value) -> None:
        # `code.indices = t` is checked like the kernels check indices: same shape, integer, values in [0, K)
        if name == "indices" and isinstance(value, torch.Tensor) and "codebook" in self._modules:
            old = self._buffers.get("indices")
            if old is not None and value.shape != old.shape:
                raise ValueError(f"indices must keep shape {tuple(old.shape)}, got {tuple(value.shape)}")
            check_indices(value, self.codebook.k, what="indices")
        super().__setattr__(name, value)

    @property
    def shape(self) -> tuple[int, int]:
        return self.indices.shape[0], self.indices.shape[1] * self.codebook.d

    def rows(self) -> torch.Tensor:
        return _dequantize(self.book(), self.indices)

    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.codebook.k)
        book = self.codebook.weight
        shared = id(book) in seen
        seen.update((id(book), id(self.indices)))
        return CodeSize(index_bytes=packed_bytes(self.indices.numel(), bits),
                        codebook_bytes=0 if shared else stored_bytes(book),
                        entropy_index_bytes=huffman_bytes(self.indices, self.codebook.k),
                        ans_index_bytes=packed_ans_bytes(self),
                        streams=[pack_indices(self.indices, bits)], k=self.codebook.k, d=self.codebook.d,
                        index_bits=bits)

    def config(self) -> dict:
        book = self.codebook
        out = {"rows": self.shape[0], "n_pad": self.shape[1], "k": book.k, "d": book.d, "groups": book.groups,
               "dtype": str(book.weight.dtype).removeprefix("torch.")}
        if self.pinned_zero:
            out["pinned_zero"] = True
        return out

    @classmethod
    def from_config(cls, rows: int, n_pad: int, k: int, d: int, groups: int = 1, dtype: str = "float32",
                    pinned_zero: bool = False) -> "VQCode":
        if dtype not in FLOAT_DTYPE_NAMES:
            raise ValueError(f"VQCode: dtype must be one of {sorted(FLOAT_DTYPE_NAMES)}, got {dtype!r}")
        if not isinstance(pinned_zero, bool):
            raise ValueError(f"VQCode: pinned_zero must be True or False, got {pinned_zero!r}")
        return cls(rows, n_pad, k, d, groups, pinned_zero=pinned_zero, dtype=FLOAT_DTYPE_NAMES[dtype])

    def packing(self) -> dict[str, int]:
        return {"indices": bits_for(self.codebook.k)}

    def validate(self) -> None:
        """A (G, K, d) float codebook, integer indices in [0, K), G dividing the rows; with pinned_zero a
        flag that is True, K >= 3 and codeword 0 exactly zero in every group."""
        book = self.codebook.weight
        if book.dim() != 3 or not book.is_floating_point():
            raise ValueError(f"codebook must be a (G, K, d) float tensor, got {list(book.shape)} {book.dtype}")
        check_indices(self.indices, self.codebook.k)
        check_codebook_groups(book, self.indices.shape[0])
        if "_pinned_zero" in self.__dict__:
            if self.__dict__["_pinned_zero"] is not True:
                raise ValueError(f"_pinned_zero must be True when present, got {self.__dict__['_pinned_zero']!r}")
            if book.shape[1] < 3:
                raise ValueError(f"pinned_zero needs K >= 3, got K={book.shape[1]}")
            if bool((book[:, 0] != 0).any()):
                raise ValueError("pinned_zero: codeword 0 must be exactly zero in every codebook group")

    def describe(self) -> dict:
        """method, K, d, bits_per_weight; with pinned_zero also `sparsity` (fraction of pruned segments)."""
        out = {"method": self.method, "K": self.codebook.k, "d": self.codebook.d,
               "bits_per_weight": index_bits_per_weight(self.codebook.k, self.codebook.d)}
        if self.pinned_zero:
            out["sparsity"] = self.sparsity()
        return out

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """The LUT product's count (the kernels' own formula): tables for every (conv group, codebook group)
        piece of the output rows, then one add per output and segment."""
        m, s = self.indices.shape
        book = self.codebook
        return lut_flops(rows, m, s, book.d, book.k, table_count(groups, book.groups))

    def extra_repr(self) -> str:
        pinned = ", pinned_zero=True" if self.pinned_zero else ""
        return f"rows={self.shape[0]}, n_pad={self.shape[1]}{pinned}"


class VQLayer(QuantizedLayer):
    """Common storage and training logic of VQLinear and VQConv2d (not used directly).

    The weight lives in `self.code`, a `VQCode`; `codebook` and `indices` are shortcuts to it.
    Subclasses define `out_dim`, `n` (unpadded row length) and `n_pad`, `_flat_to_weight(flat)` and
    `_weight_to_flat(weight)` for their row layout.
    """

    code: VQCode
    training_only = ("latent",)     # not counted by compressed_size, not saved

    def _init_vq(self, out_dim: int, n_pad: int, k: int, d: int, codebook_groups: int,
                 codebook: Codebook | None, reassign_every: int, device, dtype, pinned_zero: bool = False) -> None:
        self.code = VQCode(out_dim, n_pad, k, d, codebook_groups, codebook, pinned_zero=pinned_zero, device=device,
                           dtype=dtype)
        self.n_pad = n_pad
        if isinstance(reassign_every, bool) or not isinstance(reassign_every, int) or reassign_every < 0:
            raise ValueError(f"reassign_every must be an integer >= 0 (0 = never), got {reassign_every!r}")
        self.reassign_every = reassign_every
        self.steps = 0          # training forwards seen (drives reassignment)
        self.backend = "auto"   # kernel backend used in eval mode
        self.register_parameter("latent", None)  # training-only float weights (reassign_every > 0)

    @property
    def codebook(self) -> Codebook:
        return self.code.codebook

    def validate(self) -> None:
        if self.n_pad % self.d:
            raise ValueError(f"{type(self).__name__}: d={self.d} does not divide n_pad={self.n_pad}")
        if isinstance(self.reassign_every, bool) or not isinstance(self.reassign_every, int) or self.reassign_every < 0:
            raise ValueError(f"{type(self).__name__}: reassign_every must be an integer >= 0, got {self.reassign_every!r}")
        super().validate()

    def after_load(self) -> None:
        """Recreate the training-only `latent` weights (reassign_every > 0) from the codebook."""
        if self.reassign_every:
            self.init_latent()

    @property
    def indices(self) -> torch.Tensor:
        return self.code.indices

    @indices.setter
    def indices(self, value: torch.Tensor) -> None:
        self.code.indices = value

    # -- sizes
    @property
    def k(self) -> int:
        return self.codebook.k

    @property
    def d(self) -> int:
        return self.codebook.d

    @property
    def codebook_groups(self) -> int:
        return self.codebook.groups

    @property
    def pinned_zero(self) -> bool:
        """Codeword 0 is pinned to zero and index 0 marks a pruned segment (built with prune > 0)."""
        return self.code.pinned_zero

    @property
    def bits_per_weight(self) -> float:
        """Index bits per (unpadded) weight: ceil(log2 K) * segments / weights."""
        return bits_for(self.k) * self.indices.numel() / (self.out_dim * self.n)

    # -- weights
    def flat_weight(self) -> torch.Tensor:
        """(out, n_pad) dequantized rows in the codebook's dtype, differentiable w.r.t. the codebook
        (with pinned_zero, not w.r.t. its codeword 0: `VQCode.book`)."""
        return self.code.rows()

    def _train_flat(self, dtype: torch.dtype) -> torch.Tensor:
        """Rows used in training: codebook values; with `latent`, a straight-through path to it."""
        flat = self.flat_weight().to(dtype)
        if self.latent is not None:
            flat = flat + (self.latent - self.latent.detach()).to(dtype)  # value unchanged, grad -> latent
        return flat

    def _tick(self) -> None:
        """Count a training step; re-fit assignments every `reassign_every` steps."""
        if not (self.training and torch.is_grad_enabled()):
            return
        if self.reassign_every and self.steps and self.steps % self.reassign_every == 0:
            self.reassign()
        self.steps += 1

    def init_latent(self, weight: torch.Tensor | None = None) -> None:
        """Create the training-only `latent` parameter from `weight` (dense shape; default: dequantized)."""
        src = self.dequantize() if weight is None else weight
        dtype = src.dtype if weight is not None else torch.promote_types(src.dtype, torch.float32)
        self.latent = nn.Parameter(self._weight_to_flat(src.detach()).to(dtype).clone())

    @torch.no_grad()
    def reassign(self, weight: torch.Tensor | None = None) -> int:
        """Re-assign every segment to its nearest codeword; return how many indices changed.

        weight: dense weight (nn shape) to assign; default: the `latent` parameter (needs
        reassign_every > 0 or `init_latent()`).
        With pinned_zero (pruning) the pruned segments (index 0) stay on codeword 0 and every other segment
        goes to its nearest of codewords 1..K-1, so the set of pruned segments never changes.
        """
        if weight is not None:
            flat = self._weight_to_flat(weight.to(self.codebook.weight.device))
        elif self.latent is not None:
            flat = self.latent
        else:
            raise RuntimeError(f"{type(self).__name__}.reassign() needs a weight: pass one, or build the "
                               f"layer with reassign_every > 0 (which keeps a latent float weight)")
        g, d = self.codebook_groups, self.d
        segs = flat.reshape(g, -1, d)                                  # (G, N_g, d)
        book = self.codebook.weight
        work = torch.float64 if book.dtype == torch.float64 else torch.float32
        if self.pinned_zero:
            pruned = self.indices.reshape(g, -1) == 0                  # (G, N_g) the fixed mask
            new = torch.stack([assign(segs[j].to(work), book[j, 1:].to(work)) + 1 for j in range(g)])
            new = new.masked_fill(pruned, 0)
        else:
            new = torch.stack([assign(segs[j].to(work), book[j].to(work)) for j in range(g)])
        new = new.reshape(self.indices.shape).to(self.indices.dtype)
        changed = int((new != self.indices).sum())
        self.indices.copy_(new)
        return changed

    # -- construction from a float layer
    def _fill_from(self, weight: torch.Tensor, *, k: int, d: int, groups: int, iters: int, init: str,
                   batch_size: int | None, seed: int, codebook: Codebook | None,
                   codebook_dtype: torch.dtype | None, distributed: bool = False, prune: float = 0.0) -> None:
        if codebook is None:
            flat = self._weight_to_flat(weight.detach())               # (out, n_pad)
            kw = dict(iters=iters, init=init, batch_size=batch_size, seed=seed,
                      dtype=codebook_dtype or weight.dtype, distributed=distributed)
            if prune:
                book, codes = fit_pruned_codebook(flat.reshape(groups, -1, d), k, prune, **kw)
            else:
                book, codes = fit_codebook(flat.reshape(groups, -1, d), k, **kw)
            with torch.no_grad():
                self.codebook.weight.copy_(book)
                self.indices.copy_(codes.reshape(self.indices.shape).to(self.indices.dtype))
        else:                                                          # a shared codebook: assign only
            self.reassign(weight.detach())
        if self.reassign_every:
            self.init_latent(weight)

    @classmethod
    def _from_float(cls, module: nn.Module, k, d, *, codebook, groups, pad, iters, init, batch_size, seed,
                    reassign_every, codebook_dtype, name, distributed=False, prune=0.0, **layout):
        """The body of VQLinear/VQConv2d.from_float; `layout` holds the conv's `segment`."""
        label = _label(name, module)
        prune = check_prune(prune, label)
        if codebook is not None:
            k, d, groups = _check_codebook_arg(codebook, k, d, label)
            if prune:
                raise ValueError(f"{label}: prune={prune} pins codeword 0 of the layer's own codebook to zero; it "
                                 f"cannot be combined with a shared codebook (pass prune=0 or codebook=None)")
        if k is None or d is None:
            raise ValueError(f"{label}: give k and d (or a shared codebook)")
        check_quantizable(module, k, d, groups=groups, pad=pad, name=name, check_k=codebook is None, prune=prune,
                          **layout)
        w = module.weight
        extra = {"pinned_zero": True} if prune else {}
        layer = cls.from_shape_of(module, k=k, d=d, codebook_groups=groups, pad=pad, codebook=codebook,
                                  reassign_every=reassign_every, device=w.device, dtype=codebook_dtype or w.dtype,
                                  **extra, **layout)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        layer._fill_from(w, k=k, d=d, groups=groups, iters=iters, init=init, batch_size=batch_size, seed=seed,
                         codebook=codebook, codebook_dtype=codebook_dtype, distributed=distributed, prune=prune)
        return layer

    def extra_repr(self) -> str:
        shared = "" if self.codebook_groups == 1 else f", codebook_groups={self.codebook_groups}"
        pad = f", n_pad={self.n_pad}" if self.n_pad != self.n else ""
        every = f", reassign_every={self.reassign_every}" if self.reassign_every else ""
        pinned = f", pinned_zero=True (sparsity={self.code.sparsity():.3f})" if self.pinned_zero else ""
        return f"K={self.k}, d={self.d}{shared}{pad}{every}{pinned}"


def _check_codebook_arg(codebook: Codebook, k: int | None, d: int | None, label: str) -> tuple[int, int, int]:
    if not isinstance(codebook, Codebook):
        raise TypeError(f"{label}: codebook must be a vqlab.codebook.Codebook, got {type(codebook).__name__}")
    if k is not None and k != codebook.k or d is not None and d != codebook.d:
        raise ValueError(f"{label}: given K={k}, d={d} but the shared codebook has K={codebook.k}, d={codebook.d}")
    return codebook.k, codebook.d, codebook.groups


# ---------------------------------------------------------------- VQLinear

class VQLinear(VQLayer):
    """nn.Linear with a vector-quantized weight.  x: (..., in_features) -> (..., out_features).

    Build one with `VQLinear.from_float(nn.Linear(...), k=256, d=4)`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int, d: int,
                 codebook_groups: int = 1, pad: bool = False, codebook: Codebook | None = None,
                 reassign_every: int = 0, pinned_zero: bool = False, device=None, dtype=None):
        super().__init__()
        if codebook is not None:
            k, d, codebook_groups = codebook.k, codebook.d, codebook.groups
        n_pad = segment_geometry(in_features, d, pad=pad, label="VQLinear")
        self.in_features, self.out_features = in_features, out_features
        self.out_dim, self.n = out_features, in_features
        self._init_vq(out_features, n_pad, k, d, codebook_groups, codebook, reassign_every, device, dtype, pinned_zero)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def _weight_to_flat(self, weight: torch.Tensor) -> torch.Tensor:
        return F.pad(weight, (0, self.n_pad - self.n))                   # (out, n_pad)

    def _flat_to_weight(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[:, : self.n]                                         # (out, in)

    @classmethod
    def from_shape_of(cls, module: nn.Linear, **kw) -> "VQLinear":
        """An empty VQLinear with `module`'s shape (kw: k, d, pad, codebook, ...)."""
        return cls(module.in_features, module.out_features, module.bias is not None, **kw)

    @classmethod
    def from_float(cls, module: nn.Linear, k: int | None = None, d: int | None = None, *,
                   codebook: Codebook | None = None, groups: int = 1, pad: bool = False, iters: int = 25,
                   init: str = "kmeans++", batch_size: int | None = None, seed: int = 0,
                   reassign_every: int = 0, codebook_dtype: torch.dtype | None = None,
                   name: str | None = None, distributed: bool = False, prune: float = 0.0) -> "VQLinear":
        """Quantize an nn.Linear: k-means (K codewords of length d, G codebooks) on its weight rows.

        codebook: an existing Codebook to share (then K, d, G come from it and the weights are only
            assigned to it).  name: the layer's name, used in error messages.
        distributed: under torchrun, k-means over the ranks (see `fit_codebook`); the same layer on every rank.
        prune: fraction in [0, 1) of each codebook group's segments, smallest L2 norm first, pinned to the zero
            codeword 0 for good (`fit_pruned_codebook`, module docstring); needs K >= 3 and no shared codebook.
        """
        return cls._from_float(module, k, d, codebook=codebook, groups=groups, pad=pad, iters=iters, init=init,
                               batch_size=batch_size, seed=seed, reassign_every=reassign_every,
                               codebook_dtype=codebook_dtype, name=name, distributed=distributed, prune=prune)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._tick()
            return F.linear(x, self._flat_to_weight(self._train_flat(x.dtype)), self.bias)
        if self.n_pad != self.n:
            x = F.pad(x, (0, self.n_pad - self.n))
        y = _vq_matmul(x, self.codebook.weight, self.indices, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + super().extra_repr())


# ---------------------------------------------------------------- VQConv2d

class VQConv2d(VQLayer):
    """nn.Conv2d with a vector-quantized weight.  x: (B, in_channels, H, W) -> (B, out_channels, Ho, Wo).

    Supports stride, padding (ints, 'same', 'valid'), dilation, groups, bias and padding_mode like
    nn.Conv2d.  segment="input" (default) or "kernel" picks the row layout (module docstring).
    Build one with `VQConv2d.from_float(nn.Conv2d(...), k=256, d=4)`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, k: int, d: int,
                 segment: str = "input", codebook_groups: int = 1, pad: bool = False,
                 codebook: Codebook | None = None, reassign_every: int = 0, pinned_zero: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if codebook is not None:
            k, d, codebook_groups = codebook.k, codebook.d, codebook.groups
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"VQConv2d: padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"VQConv2d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode, self.segment = padding_mode, segment
        cin_g = in_channels // groups
        kh, kw = self.kernel_size
        n_pad = segment_geometry(cin_g, d, kernel=(kh, kw), segment=segment, pad=pad, label="VQConv2d")
        self.cin_pad = _ceil_to(cin_g, d) if segment == "input" else cin_g   # channels per conv group seen by the kernel
        self.out_dim, self.n = out_channels, cin_g * kh * kw
        self._init_vq(out_channels, n_pad, k, d, codebook_groups, codebook, reassign_every, device, dtype,
                      pinned_zero)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        # explicit padding: symmetric zero padding goes to the conv itself, anything else is done by F.pad
        lr_tb = _resolve_conv_padding(self.padding, self.kernel_size, self.dilation)
        if padding_mode == "zeros" and lr_tb[0] == lr_tb[1] and lr_tb[2] == lr_tb[3]:
            self._conv_padding, self._pre_pad = (lr_tb[2], lr_tb[0]), None
        else:
            self._conv_padding, self._pre_pad = (0, 0), lr_tb

    def _weight_to_flat(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight.shape[0]
        if self.segment == "input":
            w = weight.permute(0, 2, 3, 1)                               # (out, kh, kw, cin_g)
            return F.pad(w, (0, self.cin_pad - w.shape[-1])).reshape(out, -1)
        return F.pad(weight.reshape(out, -1), (0, self.n_pad - self.n))

    def _flat_to_weight(self, flat: torch.Tensor) -> torch.Tensor:
        out, (kh, kw), cin_g = flat.shape[0], self.kernel_size, self.in_channels // self.groups
        if self.segment == "input":
            return flat.reshape(out, kh, kw, self.cin_pad)[..., :cin_g].permute(0, 3, 1, 2)
        return flat[:, : self.n].reshape(out, cin_g, kh, kw)

    @classmethod
    def from_shape_of(cls, module: nn.Conv2d, **kw) -> "VQConv2d":
        """An empty VQConv2d with `module`'s geometry (kw: k, d, segment, pad, codebook, ...)."""
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, module.bias is not None, module.padding_mode, **kw)

    @classmethod
    def from_float(cls, module: nn.Conv2d, k: int | None = None, d: int | None = None, *,
                   codebook: Codebook | None = None, groups: int = 1, segment: str = "input", pad: bool = False,
                   iters: int = 25, init: str = "kmeans++", batch_size: int | None = None, seed: int = 0,
                   reassign_every: int = 0, codebook_dtype: torch.dtype | None = None,
                   name: str | None = None, distributed: bool = False, prune: float = 0.0) -> "VQConv2d":
        """Quantize an nn.Conv2d: k-means on its weight segments (layout per `segment`).

        groups: number of codebooks G (blocks of output channels), not the conv's groups.
        codebook: an existing Codebook to share.  name: the layer's name, used in error messages.
        distributed: under torchrun, k-means over the ranks (see `fit_codebook`); the same layer on every rank.
        prune: fraction in [0, 1) of each codebook group's segments, smallest L2 norm first, pinned to the zero
            codeword 0 for good (`fit_pruned_codebook`, module docstring); needs K >= 3 and no shared codebook.
        """
        return cls._from_float(module, k, d, codebook=codebook, groups=groups, pad=pad, iters=iters, init=init,
                               batch_size=batch_size, seed=seed, reassign_every=reassign_every,
                               codebook_dtype=codebook_dtype, name=name, distributed=distributed, segment=segment,
                               prune=prune)

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pre_pad, mode=mode)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad_input(x)
        if self.training or (self.segment == "kernel" and self.n_pad != self.n):
            # dense path: training (gradients into the codebook), or kernel-segment padding that no
            # conv weight shape can express
            if self.training:
                self._tick()
                w = self._flat_to_weight(self._train_flat(x.dtype))
            else:
                w = self.dequantize().to(x.dtype)
            return F.conv2d(x, w, self.bias, self.stride, self._conv_padding, self.dilation, self.groups)
        cin_g = self.in_channels // self.groups
        if self.cin_pad != cin_g:                                      # zero channels per conv group
            b, _, h, w_ = x.shape
            x = F.pad(x.reshape(b, self.groups, cin_g, h, w_), (0, 0, 0, 0, 0, self.cin_pad - cin_g))
            x = x.reshape(b, self.groups * self.cin_pad, h, w_)
        kh, kw = self.kernel_size
        return _vq_conv2d(x, self.codebook.weight, self.indices, (self.out_channels, self.cin_pad, kh, kw),
                                 self.stride, self._conv_padding, self.dilation, self.groups,
                                 segment=self.segment, bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, segment={self.segment!r}, " + super().extra_repr()


def weight_segments(module: nn.Module, d: int, *, segment: str = "input", pad: bool = False) -> torch.Tensor:
    """The (out * n_pad / d, d) weight segments a VQ layer built from `module` would quantize, in index order."""
    cls = vq_layer_class(module)
    kw = {"segment": segment} if cls is VQConv2d else {}
    shell = cls.from_shape_of(module, k=2, d=d, pad=pad, **kw)  # geometry only (tiny buffers)
    return shell._weight_to_flat(module.weight.detach()).reshape(-1, d)


def vq_layer_class(module: nn.Module) -> type[VQLayer]:
    """The VQ class replacing `module`: VQLinear for nn.Linear, VQConv2d for nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return VQLinear
    if isinstance(module, nn.Conv2d):
        return VQConv2d
    raise TypeError(f"vector quantization supports nn.Linear and nn.Conv2d, not {type(module).__name__}")
