"""VQ-DNN: vector quantization of weights with k-means codebooks, a method like the others.

    vqlab.quantize_(model, VQConfig(k=256, d=4))     # every eligible layer -> a quantized layer holding a VQCode
    vqlab.pack_simd_(model)                           # K <= 16 linears: the same code in the simd kernel's layout

A VQ code stores a layer's weight rows as a codebook and one index per segment of length d
(W_rows[i, s*d:(s+1)*d] = codebook[g(i)][indices[i, s]], y = x @ W_rows.T):

    codebook  a `vqlab.Codebook`, .weight (G, K, d); G = codebook_groups codebooks serve G equal consecutive
              blocks of output rows.  One Codebook object may be held by several layers, also of other models
              (one parameter, counted and stored once).
    indices   buffer (out, n_pad / d), dtype `index_dtype(K)` (uint8 for K <= 256).

The layer (`vqlab.layers.QuantizedLinear` / `QuantizedConv2d`) owns the row layout; VQ uses two:
    Linear, and Conv2d segment="kernel": rows = the flattened weight, padded at the end of each row to
        n_pad = ceil(n / d) * d when pad=True
    Conv2d segment="input" (the default): runs of d input channels at one kernel position; with pad=True the
        input channels of every conv group are padded to ceil(cin_g / d) * d at every kernel position
`VQLinear` / `VQConv2d` are names for users: `VQLinear.from_float(linear, k, d)` builds a QuantizedLinear with a
VQ code, and `isinstance(m, VQLinear)` asks exactly that (a QuantizedLinear whose code is a VQ code).

Training (VQ-DNN weight sharing): in train mode the layer rebuilds W = dequantize(codebook, indices) and runs
F.linear / F.conv2d, so the gradient of every weight of a cluster sums into its codeword.  In eval mode it runs
`vqlab.kernels.vq_matmul` / `vq_conv2d` with the code's `backend` ("auto").

Reassignment (`reassign_every=N > 0`): the code keeps a float `latent` parameter (out, n_pad), the weights
before quantization, trained by a straight-through estimator (forward value = codebook weight, its gradient =
the dense weight gradient).  Every training forward with autograd enabled increments `steps` (one per optimizer
step under `vqlab.fit`); before forward number N+1, 2N+1, ... every segment of `latent` is re-assigned to its
nearest codeword (`reassign()`).  `latent` is training-only state: `compressed_size` and `vqlab.save` leave it
out and `vqlab.load` rebuilds it from the codebook.

Magnitude pruning (`VQConfig(prune=p)`, p in [0, 1)): in every codebook group the floor(p * N_g + 1/2) segments
of smallest L2 norm are assigned to codeword 0, pinned to the zero vector; k-means fits codewords 1..K-1 on the
other segments (so K >= 3).  The rule is "index 0 == pruned": no mask is stored, the code carries the flag
`pinned_zero`.  Training keeps codeword 0 exactly zero (rows are rebuilt with row 0 replaced by zeros, so its
gradient is zero) and `reassign()` keeps every pruned segment on codeword 0 and the others off it: the sparsity
pattern is fixed, as in magnitude pruning with a mask (Han et al. 2016, Deep Compression).

The same weight in the "simd" kernel's own 4-bit layout, for fast CPU inference with K <= 16, is a second VQ code
(`vqlab.methods.vq_simd.SimdCode`, made by `pack_simd_`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bits import bits_for, huffman_bytes, index_bits_per_weight, pack_indices, packed_bytes
from ..checks import check_bool, check_choice, check_instance, check_int
from ..codebook import (Codebook, HoldsCodebook, assign, check_prune, fit_codebook, fit_pruned_codebook,
                        prune_count)
from ..codes import CodeSize, WeightCode, packed_ans_bytes, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..dtypes import FLOAT_DTYPES, dtype_name, float_dtype, index_dtype
from ..kernels.flops import lut_flops, table_count
from ..kernels import plan
from ..kernels.reference import check_codebook_groups, check_indices, dequantize
from ..kernels.registry import backend_names
from ..layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear, quantized_layer

__all__ = ["VQConfig", "VQCode", "VQCodeBase", "VQLinear", "VQConv2d", "check_quantizable", "weight_segments",
           "segment_geometry"]


# ---------------------------------------------------------------- geometry and checks

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


def _n_pad(module: nn.Module, d: int, segment: str, pad: bool, label: str) -> int:
    w = module.weight
    kernel = tuple(w.shape[2:]) if isinstance(module, nn.Conv2d) else None
    return segment_geometry(w.shape[1], d, kernel=kernel, segment=segment, pad=pad, label=label)


def check_quantizable(module: nn.Module, k: int, d: int, *, codebook_groups: int = 1, segment: str = "input",
                      pad: bool = False, name: str | None = None, check_k: bool = True, prune: float = 0.0) -> int:
    """Check that `module` (nn.Linear / nn.Conv2d) can take a (K, d) codebook; return its segment count.

    codebook_groups: G.  Raises ValueError/TypeError naming the layer and the bad value: unsupported
    layer type or weight dtype, non-finite weights, K < 2, d not dividing the segmented dimension (unless pad),
    G not dividing the output channels, K larger than the segments one codebook serves (when check_k); with
    prune > 0: prune outside [0, 1), K < 3, or fewer unpruned segments per group than the K - 1 learned
    codewords.  returns: number of segments of the whole layer, out * n_pad / d.
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
    out, groups = w.shape[0], codebook_groups
    n_pad = _n_pad(module, d, segment, pad, label)
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


def _segment_of(module: nn.Module, segment: str) -> str:
    """The row layout a VQ layer built from `module` uses: `segment` for a conv, "kernel" (the plain flattened
    row) for a linear."""
    return segment if isinstance(module, nn.Conv2d) else "kernel"


def _shell(module: nn.Module, d: int, segment: str, pad: bool) -> QuantizedLayer:
    """An empty VQ layer with `module`'s geometry (tiny codebook): its row layout, without fitting anything."""
    n_pad = _n_pad(module, d, segment, pad, _label(None, module))
    code = VQCode(module.weight.shape[0], n_pad, 2, d)
    return quantized_layer(module, code, _segment_of(module, segment))


def weight_segments(module: nn.Module, d: int, *, segment: str = "input", pad: bool = False) -> torch.Tensor:
    """The (out * n_pad / d, d) weight segments a VQ layer built from `module` would quantize, in index order."""
    return _shell(module, d, segment, pad).weight_to_rows(module.weight.detach()).reshape(-1, d)


# ---------------------------------------------------------------- the codes

class VQCodeBase(HoldsCodebook, WeightCode):
    """What both VQ index layouts share: the Codebook (G, K, d), the pruning flag, reports, size of the codebook,
    FLOPs.  Subclasses hold the indices (`index_values()`, `set_indices()`)."""

    method = "vq"
    pinned_zero: bool

    def _init_base(self, codebook: Codebook | None, k: int, d: int, codebook_groups: int, pinned_zero: bool,
                   device, dtype) -> None:
        check_bool("pinned_zero", pinned_zero)
        if pinned_zero and codebook is not None:
            raise ValueError(f"{type(self).__name__}: pinned_zero=True (pruning) needs the layer's own codebook, "
                             f"not a shared one")
        if codebook is None:
            codebook = Codebook(k, d, codebook_groups, device=device, dtype=dtype)
        check_instance(f"{type(self).__name__} codebook", codebook, Codebook, "vqlab.Codebook")
        if pinned_zero and codebook.k < 3:
            raise ValueError(f"{type(self).__name__}: pinned_zero=True needs K >= 3 (the zero codeword and at least "
                             f"2 learned ones), got K={codebook.k}")
        self.codebook = codebook
        self.pinned_zero = pinned_zero

    def index_values(self) -> torch.Tensor:
        """The indices (rows, n_pad / d) (a copy for layouts that store them otherwise)."""
        raise NotImplementedError

    def set_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError

    def book(self) -> torch.Tensor:
        """The codebook (G, K, d) the rows are rebuilt from: `codebook.weight`, or with pinned_zero that weight
        with row 0 replaced by zeros (the same values, but no gradient flows into row 0)."""
        w = self.codebook.weight
        if not self.pinned_zero:
            return w
        return torch.cat([torch.zeros_like(w[:, :1]), w[:, 1:]], dim=1)

    def rows(self) -> torch.Tensor:
        return dequantize(self.book(), self.index_values())

    def sparsity(self) -> float:
        """Fraction of segments pruned (on the pinned zero codeword); 0.0 without pinned_zero."""
        if not self.pinned_zero:
            return 0.0
        idx = self.index_values()
        return float((idx == 0).sum()) / max(idx.numel(), 1)

    def _codebook_size(self, seen: set[int]) -> int:
        book = self.codebook.weight
        shared = id(book) in seen
        seen.add(id(book))
        return 0 if shared else stored_bytes(book)

    def _validate_codebook(self, rows: int, k_max: int | None = None) -> None:
        book = self.codebook.weight
        if book.dim() != 3 or not book.is_floating_point() or (k_max is not None and book.shape[1] > k_max):
            limit = "" if k_max is None else f" with K <= {k_max}"
            raise ValueError(f"codebook must be a (G, K, d) float tensor{limit}, got {list(book.shape)} {book.dtype}")
        check_codebook_groups(book, rows)
        if self.pinned_zero:
            if book.shape[1] < 3:
                raise ValueError(f"pinned_zero needs K >= 3, got K={book.shape[1]}")
            if bool((book[:, 0] != 0).any()):
                raise ValueError("pinned_zero: codeword 0 must be exactly zero in every codebook group")

    def describe(self) -> dict:
        """method, setting, K, d, bits_per_weight; with pinned_zero also `sparsity` (fraction of pruned segments)."""
        out = {"method": self.method, "setting": f"K={self.k} d={self.d}", "K": self.k, "d": self.d,
               "bits_per_weight": index_bits_per_weight(self.k, self.d)}
        if self.pinned_zero:
            out["sparsity"] = self.sparsity()
        return out

    def flops(self, rows: int, groups: int = 1) -> tuple[int, int]:
        """The LUT product's count (the kernels' own formula): tables for every (conv group, codebook group)
        piece of the output rows, then one add per output and segment."""
        m, n_pad = self.shape
        return lut_flops(rows, m, n_pad // self.d, self.d, self.k, table_count(groups, self.codebook_groups))

    def _base_config(self) -> dict:
        out = {"rows": self.shape[0], "n_pad": self.shape[1], "k": self.k, "d": self.d,
               "codebook_groups": self.codebook_groups, "dtype": dtype_name(self.codebook.weight.dtype)}
        if self.pinned_zero:
            out["pinned_zero"] = True
        return out


@register_code
class VQCode(VQCodeBase):
    """The VQ weight code: a Codebook (G, K, d) — possibly shared with other layers and models — and one index
    per segment, `indices` (rows, n_pad / d) of dtype `index_dtype(K)` (module docstring).

    rows() = dequantize(codebook, indices): (rows, n_pad), differentiable w.r.t. the codebook.
    Stored: indices packed at ceil(log2 K) bits each (Huffman and ANS figures from their histogram); the
    codebook at its storage dtype, once per object across everything counted with one `seen` set.
    Training state: reassign_every, steps, latent (module docstring); eval: `backend` of the kernels.
    """

    kind = "vq"
    layer_attrs = ("codebook", "indices", "k", "d", "codebook_groups", "pinned_zero", "backend", "reassign_every",
                   "steps", "latent", "reassign", "init_latent", "sparsity")
    training_only = ("latent",)

    def __init__(self, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1,
                 codebook: Codebook | None = None, *, pinned_zero: bool = False, reassign_every: int = 0,
                 steps: int = 0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self._init_base(codebook, k, d, codebook_groups, pinned_zero, device, dtype)
        self.register_buffer("indices", torch.zeros(rows, n_pad // self.codebook.d, dtype=index_dtype(self.codebook.k),
                                                    device=device))
        self.reassign_every = check_int("reassign_every", reassign_every, 0)
        self.steps = check_int("steps", steps, 0)              # training forwards seen (drives reassignment)
        self.backend = check_choice("backend", backend, backend_names())   # kernel backend used in eval mode
        self.register_parameter("latent", None)                # training-only float rows (reassign_every > 0)

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

    def index_values(self) -> torch.Tensor:
        return self.indices

    def set_indices(self, indices: torch.Tensor) -> None:
        """Store new (rows, n_pad / d) integer indices in [0, K) (checked; ValueError otherwise)."""
        self.indices = indices.to(self.indices.dtype).to(self.indices.device)

    # -- training
    def train_rows(self) -> torch.Tensor:
        """Rows used in training: codebook values; with `latent`, a straight-through path to it.  Counts the
        step and re-assigns every `reassign_every` steps."""
        self._tick()
        flat = self.rows()
        if self.latent is not None:
            flat = flat + (self.latent - self.latent.detach()).to(flat.dtype)   # value unchanged, grad -> latent
        return flat

    def _tick(self) -> None:
        """Count a training step; re-fit assignments every `reassign_every` steps."""
        if not (self.training and torch.is_grad_enabled()):
            return
        if self.reassign_every and self.steps and self.steps % self.reassign_every == 0:
            self.reassign()
        self.steps += 1

    def init_latent(self, rows: torch.Tensor | None = None) -> None:
        """Create the training-only `latent` parameter from `rows` (out, n_pad) in the layer's row layout (a
        Linear's weight itself); default: the dequantized rows, in at least float32."""
        src = self.rows() if rows is None else rows
        dtype = src.dtype if rows is not None else torch.promote_types(src.dtype, torch.float32)
        self.latent = nn.Parameter(src.detach().to(dtype).clone())

    @torch.no_grad()
    def reassign(self, rows: torch.Tensor | None = None) -> int:
        """Re-assign every segment to its nearest codeword; return how many indices changed.

        rows: (out, n_pad) weights in the layer's row layout to assign (for an unpadded Linear, its weight;
        `layer.weight_to_rows(w)` converts any layer's weight); default: the `latent` parameter (needs
        reassign_every > 0 or `init_latent()`).  With pinned_zero (pruning) the pruned segments (index 0) stay
        on codeword 0 and every other segment goes to its nearest of codewords 1..K-1, so the set of pruned
        segments never changes.
        """
        if rows is not None:
            flat = rows.to(self.codebook.weight.device)
        elif self.latent is not None:
            flat = self.latent
        else:
            raise RuntimeError("reassign() needs weight rows: pass them, or build the layer with reassign_every > 0 "
                               "(which keeps a latent float weight)")
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

    def after_load(self) -> None:
        """Recreate the training-only `latent` weights (reassign_every > 0) from the codebook."""
        if self.reassign_every:
            self.init_latent()

    # -- eval products
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., n_pad) -> (..., rows) through `vq_matmul` with this code's backend, plus bias."""
        return plan.linear(self, x, self.codebook.weight, self.indices, self.backend, bias)

    def _runs_lut(self, layer: QuantizedConv2d) -> bool:
        """Whether the convolution runs through `vq_conv2d` (not for "kernel" rows padded at their end: no conv
        weight shape expresses them, so the layer convolves with the rebuilt weight)."""
        return not (layer.segment == "kernel" and layer.n_pad != layer.n)

    def conv2d(self, x: torch.Tensor, layer: QuantizedConv2d) -> torch.Tensor | None:
        """`vq_conv2d` in the layer's layout (input channels zero-padded per conv group for segment="input")."""
        if not self._runs_lut(layer):
            return None
        book, indices = self.codebook.weight, self.indices
        kh, kw = layer.kernel_size
        cin_g = layer.in_channels // layer.groups
        cin_pad = indices.shape[1] * book.shape[-1] // (kh * kw) if layer.segment == "input" else cin_g  # layer.cin_pad
        if cin_pad != cin_g:                                       # zero channels per conv group
            b, _, h, w_ = x.shape
            x = F.pad(x.reshape(b, layer.groups, cin_g, h, w_), (0, 0, 0, 0, 0, cin_pad - cin_g))
            x = x.reshape(b, layer.groups * cin_pad, h, w_)
        return plan.conv2d(self, x, book, indices, (layer.out_channels, cin_pad, kh, kw),
                           layer.stride, layer.conv_padding, layer.dilation, layer.groups, segment=layer.segment,
                           bias=layer.bias, backend=self.backend)

    def conv_flops(self, layer: QuantizedConv2d, x_shape: tuple[int, ...], rows: int) -> tuple[int, int] | None:
        return self.flops(rows, layer.groups) if self._runs_lut(layer) else None

    # -- storage
    def size(self, seen: set[int]) -> CodeSize:
        bits = bits_for(self.k)
        book_bytes = self._codebook_size(seen)
        seen.add(id(self.indices))
        return CodeSize(index_bytes=packed_bytes(self.indices.numel(), bits), codebook_bytes=book_bytes,
                        entropy_index_bytes=huffman_bytes(self.indices, self.k), ans_index_bytes=packed_ans_bytes(self),
                        streams=[pack_indices(self.indices, bits)], k=self.k, d=self.d, index_bits=bits)

    def config(self) -> dict:
        out = self._base_config()
        for key, default in (("reassign_every", 0), ("steps", 0), ("backend", "auto")):
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_config(cls, rows: int, n_pad: int, k: int, d: int, codebook_groups: int = 1, dtype: str = "float32",
                    pinned_zero: bool = False, reassign_every: int = 0, steps: int = 0,
                    backend: str = "auto") -> "VQCode":
        for name, v, low in (("rows", rows, 1), ("n_pad", n_pad, 1), ("k", k, 2), ("d", d, 1),
                             ("codebook_groups", codebook_groups, 1)):
            check_int(f"VQCode {name}", v, low)
        if n_pad % d:
            raise ValueError(f"VQCode: d={d} does not divide n_pad={n_pad}")
        return cls(rows, n_pad, k, d, codebook_groups, pinned_zero=pinned_zero, reassign_every=reassign_every,
                   steps=steps, backend=backend, dtype=float_dtype(dtype, "VQCode dtype"))

    def packing(self) -> dict[str, int]:
        return {"indices": bits_for(self.k)}

    def validate(self) -> None:
        """A (G, K, d) float codebook, integer indices in [0, K), G dividing the rows; with pinned_zero K >= 3
        and codeword 0 exactly zero in every group."""
        self._validate_codebook(self.indices.shape[0])
        check_indices(self.indices, self.codebook.k)

    def extra_repr(self) -> str:
        extra = "" if self.codebook_groups == 1 else f", codebook_groups={self.codebook_groups}"
        extra += f", reassign_every={self.reassign_every}" if self.reassign_every else ""
        extra += f", pinned_zero=True (sparsity={self.sparsity():.3f})" if self.pinned_zero else ""
        return f"K={self.k}, d={self.d}, rows={self.shape[0]}, n_pad={self.shape[1]}{extra}"


# ---------------------------------------------------------------- building VQ layers

def _check_codebook_arg(codebook: Codebook, k: int | None, d: int | None, label: str) -> tuple[int, int, int]:
    if not isinstance(codebook, Codebook):
        raise TypeError(f"{label}: codebook must be a vqlab.codebook.Codebook, got {type(codebook).__name__}")
    if k is not None and k != codebook.k or d is not None and d != codebook.d:
        raise ValueError(f"{label}: given K={k}, d={d} but the shared codebook has K={codebook.k}, d={codebook.d}")
    return codebook.k, codebook.d, codebook.codebook_groups


def _from_float(module: nn.Module, k: int | None = None, d: int | None = None, *, codebook: Codebook | None = None,
                codebook_groups: int = 1, segment: str = "input", pad: bool = False, iters: int = 25, init: str = "kmeans++",
                batch_size: int | None = None, seed: int = 0, reassign_every: int = 0,
                codebook_dtype: torch.dtype | None = None, name: str | None = None, distributed: bool = False,
                prune: float = 0.0) -> QuantizedLayer:
    """Quantize one nn.Linear / nn.Conv2d: k-means (K codewords of length d, `codebook_groups` codebooks) on its
    weight segments, or assignment to a given shared `codebook`; the layer keeps module's bias and mode."""
    label = _label(name, module)
    groups = codebook_groups
    prune = check_prune(prune, label)
    if codebook is not None:
        k, d, groups = _check_codebook_arg(codebook, k, d, label)
        if prune:
            raise ValueError(f"{label}: prune={prune} pins codeword 0 of the layer's own codebook to zero; it "
                             f"cannot be combined with a shared codebook (pass prune=0 or codebook=None)")
    if k is None or d is None:
        raise ValueError(f"{label}: give k and d (or a shared codebook)")
    segment = _segment_of(module, segment)
    check_quantizable(module, k, d, codebook_groups=groups, pad=pad, name=name, check_k=codebook is None, prune=prune,
                      segment=segment)
    w = module.weight
    code = VQCode(w.shape[0], _n_pad(module, d, segment, pad, label), k, d, groups, codebook,
                  pinned_zero=bool(prune), reassign_every=reassign_every, device=w.device,
                  dtype=codebook_dtype or w.dtype)
    layer = quantized_layer(module, code, segment)
    flat = layer.weight_to_rows(w.detach())                            # (out, n_pad)
    if codebook is None:
        kw = dict(iters=iters, init=init, batch_size=batch_size, seed=seed, dtype=codebook_dtype or w.dtype,
                  distributed=distributed)
        fit = fit_pruned_codebook(flat.reshape(groups, -1, d), k, prune, **kw) if prune else \
            fit_codebook(flat.reshape(groups, -1, d), k, **kw)
        with torch.no_grad():
            code.codebook.weight.copy_(fit[0])
            code.indices.copy_(fit[1].reshape(code.indices.shape).to(code.indices.dtype))
    else:                                                              # a shared codebook: assign only
        code.reassign(flat)
    if reassign_every:
        code.init_latent(flat)
    return layer


class _VQLayerName(type):
    """The metaclass of the names `VQLinear` / `VQConv2d`: calling one builds an empty quantized layer with a VQ
    code, and isinstance(m, VQLinear) asks whether m is a QuantizedLinear holding a VQ code (either layout)."""

    layer: type

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls.layer) and isinstance(obj.__dict__.get("_modules", {}).get("code"), VQCodeBase)


class VQLinear(metaclass=_VQLayerName):
    """nn.Linear with a vector-quantized weight: a `QuantizedLinear` whose code is a `VQCode`.
    x: (..., in_features) -> (..., out_features).

    `VQLinear.from_float(nn.Linear(...), k=256, d=4)` quantizes a float layer;
    `VQLinear(in_features, out_features, bias, k=, d=, ...)` builds an empty one (zero codebook and indices).
    """

    layer = QuantizedLinear

    def __new__(cls, in_features: int, out_features: int, bias: bool = True, *, k: int, d: int,
                codebook_groups: int = 1, pad: bool = False, codebook: Codebook | None = None,
                reassign_every: int = 0, pinned_zero: bool = False, device=None, dtype=None) -> QuantizedLinear:
        if codebook is not None:
            k, d, codebook_groups = codebook.k, codebook.d, codebook.codebook_groups
        n_pad = segment_geometry(in_features, d, pad=pad, label="VQLinear")
        code = VQCode(out_features, n_pad, k, d, codebook_groups, codebook, pinned_zero=pinned_zero,
                      reassign_every=reassign_every, device=device, dtype=dtype)
        return QuantizedLinear(in_features, out_features, bias, code=code, device=device, dtype=dtype)

    @staticmethod
    def from_float(module: nn.Linear, k: int | None = None, d: int | None = None, *,
                   codebook: Codebook | None = None, codebook_groups: int = 1, pad: bool = False, iters: int = 25,
                   init: str = "kmeans++", batch_size: int | None = None, seed: int = 0, reassign_every: int = 0,
                   codebook_dtype: torch.dtype | None = None, name: str | None = None, distributed: bool = False,
                   prune: float = 0.0) -> QuantizedLinear:
        """Quantize an nn.Linear: k-means (K codewords of length d, `codebook_groups` codebooks) on its weight rows.

        codebook: an existing Codebook to share (then K, d, G come from it and the weights are only assigned to
            it).  name: the layer's name, used in error messages.
        distributed: under torchrun, k-means over the ranks (`vqlab.codebook.fit_codebook`).
        prune: fraction in [0, 1) of each codebook group's segments, smallest L2 norm first, pinned to the zero
            codeword 0 for good (module docstring); needs K >= 3 and no shared codebook.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"VQLinear.from_float takes an nn.Linear, got {type(module).__name__}")
        return _from_float(module, k, d, codebook=codebook, codebook_groups=codebook_groups, pad=pad, iters=iters,
                           init=init, batch_size=batch_size, seed=seed, reassign_every=reassign_every,
                           codebook_dtype=codebook_dtype, name=name, distributed=distributed, prune=prune)


class VQConv2d(metaclass=_VQLayerName):
    """nn.Conv2d with a vector-quantized weight: a `QuantizedConv2d` whose code is a `VQCode`.
    x: (B, in_channels, H, W) -> (B, out_channels, Ho, Wo).  segment="input" (default) or "kernel" picks the
    row layout (module docstring).  `VQConv2d.from_float(nn.Conv2d(...), k=256, d=4)` quantizes a float layer.
    """

    layer = QuantizedConv2d

    def __new__(cls, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, k: int, d: int,
                segment: str = "input", codebook_groups: int = 1, pad: bool = False, codebook: Codebook | None = None,
                reassign_every: int = 0, pinned_zero: bool = False, device=None, dtype=None) -> QuantizedConv2d:
        if codebook is not None:
            k, d, codebook_groups = codebook.k, codebook.d, codebook.codebook_groups
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels % groups:
            raise ValueError(f"VQConv2d: groups={groups} must divide in_channels={in_channels}")
        n_pad = segment_geometry(in_channels // groups, d, kernel=(kh, kw), segment=segment, pad=pad, label="VQConv2d")
        code = VQCode(out_channels, n_pad, k, d, codebook_groups, codebook, pinned_zero=pinned_zero,
                      reassign_every=reassign_every, device=device, dtype=dtype)
        return QuantizedConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                               padding_mode, code=code, segment=segment, device=device, dtype=dtype)

    @staticmethod
    def from_float(module: nn.Conv2d, k: int | None = None, d: int | None = None, *,
                   codebook: Codebook | None = None, codebook_groups: int = 1, segment: str = "input",
                   pad: bool = False, iters: int = 25, init: str = "kmeans++", batch_size: int | None = None, seed: int = 0,
                   reassign_every: int = 0, codebook_dtype: torch.dtype | None = None, name: str | None = None,
                   distributed: bool = False, prune: float = 0.0) -> QuantizedConv2d:
        """Quantize an nn.Conv2d: k-means on its weight segments (layout per `segment`).

        codebook_groups: number of codebooks G (blocks of output channels), not the conv's groups.  Other
        arguments as `VQLinear.from_float`.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"VQConv2d.from_float takes an nn.Conv2d, got {type(module).__name__}")
        return _from_float(module, k, d, codebook=codebook, codebook_groups=codebook_groups, segment=segment, pad=pad,
                           iters=iters,
                           init=init, batch_size=batch_size, seed=seed, reassign_every=reassign_every,
                           codebook_dtype=codebook_dtype, name=name, distributed=distributed, prune=prune)


# ---------------------------------------------------------------- the config and its handler

@dataclass(frozen=True)
class VQConfig(QuantConfig):
    """Vector quantization of weights with k-means codebooks (VQ-DNN).

    Args:
        k: codewords per codebook K (>= 2); indices take ceil(log2 K) bits.
        d: segment length (weights per index); bits per weight = ceil(log2 K) / d.
        iters: k-means iterations.
        init: k-means initialisation, "kmeans++" or "random".
        batch_size: None for Lloyd k-means on all segments, an int for mini-batch k-means.
        segment: conv row layout, "input" (runs of d input channels) or "kernel" (flattened kernel).
        codebook: "layer" (one per layer), "group" (`codebook_groups` per layer, over blocks of output
            channels), "shared" (one Codebook object fit on every layer this config quantizes), or a
            `vqlab.Codebook` object: every layer is assigned to it (no k-means) and holds that very object,
            shared with whatever else holds it (other layers, other models); k and d are taken from it.
        codebook_groups: codebooks per layer when codebook="group" (>= 2; must divide the output channels).
        reassign_every: re-fit assignments to the nearest codeword every N training steps (0 = never;
            keeps a float `latent` weight per layer during training, module docstring).
        pad: allow d not dividing the segmented dimension by zero-padding rows.
        seed: k-means seed.
        codebook_dtype: stored codebook dtype (torch dtype or name); None = the weight's dtype.
        distributed: under torchrun, every rank runs quantize_ on the same float model and each layer's
            k-means is spread over the ranks (each fits its rows [rank::world] of the segments,
            `kmeans(..., distributed=True)`); every rank ends with the same codebooks and indices.  Lloyd
            only (batch_size must be None).  In one process the same as False.
        prune: magnitude pruning, a fraction p in [0, 1) (0.0 = none, the default).  Before k-means, in every
            codebook group the floor(p * N_g + 1/2) segments of smallest L2 norm (N_g segments per group) are
            assigned to codeword 0, pinned to the zero vector; k-means fits codewords 1..K-1 on the other
            segments.  Codeword 0 stays exactly zero through `vqlab.fit` (float16 codebooks included) and
            re-assignment keeps the pruned segments on it and every other segment off it, so the sparsity
            pattern is fixed (module docstring).  Needs K >= 3 and codebook "layer" or "group"; indices stay
            K-ary, so only their entropy (Huffman / ANS sizes) drops.

    Which layers: `quantize_`'s filter_fn / overrides (by default every Linear/Conv2d but the first conv and
    the last linear).

    Example:
        >>> report = quantize_(model, VQConfig(k=256, d=4), overrides={"classifier.1": VQConfig(k=16, d=2)})
        >>> quantize_(model, VQConfig(k=16, d=2, prune=0.5, reassign_every=20))   # half the segments zero
    """

    name: ClassVar[str] = "vq"

    k: int = 256
    d: int = 4
    iters: int = 25
    init: str = "kmeans++"
    batch_size: int | None = None
    segment: str = "input"
    codebook: str | Codebook = "layer"
    codebook_groups: int = 1
    reassign_every: int = 0
    pad: bool = False
    seed: int = 0
    codebook_dtype: torch.dtype | str | None = None
    distributed: bool = False
    prune: float = 0.0

    def validate(self) -> None:
        f = self.field_name
        check_int(f("k"), self.k, 2)
        check_int(f("d"), self.d, 1)
        check_int(f("iters"), self.iters, 1)
        check_int(f("reassign_every"), self.reassign_every, 0)
        check_int(f("seed"), self.seed, 0)
        if self.batch_size is not None:
            check_int(f("batch_size"), self.batch_size, 1)
        check_choice(f("init"), self.init, ("kmeans++", "random"))
        check_choice(f("segment"), self.segment, ("input", "kernel"))
        check_int(f("codebook_groups"), self.codebook_groups, 1)
        if isinstance(self.codebook, Codebook):
            if self.codebook_groups != 1:
                raise ValueError(f"VQConfig.codebook_groups={self.codebook_groups} cannot be combined with a given "
                                 f"Codebook object (it has {self.codebook.codebook_groups} group(s) of its own)")
            object.__setattr__(self, "k", self.codebook.k)
            object.__setattr__(self, "d", self.codebook.d)
        elif self.codebook not in ("layer", "group", "shared"):
            raise ValueError(f"VQConfig.codebook must be 'layer', 'group', 'shared' or a vqlab.Codebook, got "
                             f"{self.codebook!r}")
        if self.codebook == "group" and self.codebook_groups < 2:
            raise ValueError(f"VQConfig.codebook_groups must be >= 2 with codebook='group', got "
                             f"codebook_groups={self.codebook_groups}")
        if self.codebook != "group" and self.codebook_groups != 1:
            raise ValueError(f"VQConfig.codebook_groups={self.codebook_groups} needs codebook='group' (got "
                             f"codebook={self.codebook!r})")
        for flag in ("pad", "distributed"):
            check_bool(f(flag), getattr(self, flag))
        if self.distributed and self.batch_size is not None:
            raise ValueError(f"VQConfig.distributed=True runs Lloyd k-means over the ranks; mini-batch k-means is "
                             f"single-process: set batch_size=None (got batch_size={self.batch_size})")
        if self.codebook_dtype is not None:
            object.__setattr__(self, "codebook_dtype", float_dtype(self.codebook_dtype, f("codebook_dtype")))
        object.__setattr__(self, "prune", check_prune(self.prune, "VQConfig"))
        if self.prune:
            if self.k < 3:
                raise ValueError(f"VQConfig: prune={self.prune} pins codeword 0 to zero and needs K >= 3 (the zero "
                                 f"codeword and at least 2 learned ones), got k={self.k}")
            if not (self.codebook == "layer" or self.codebook == "group"):
                what = "a given Codebook object" if isinstance(self.codebook, Codebook) else "codebook='shared'"
                raise ValueError(f"VQConfig: prune={self.prune} pins codeword 0 of each layer's own codebook to zero "
                                 f"and cannot be combined with {what}; use codebook='layer' or 'group'")

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, ceil(log2 K) / d (codebooks not included)."""
        return index_bits_per_weight(self.k, self.d)

    def check(self, module: nn.Module, name: str) -> None:
        """Raise a clear error if this config cannot quantize `module` (named `name`)."""
        given = isinstance(self.codebook, Codebook)
        check_quantizable(module, self.k, self.d,
                          codebook_groups=self.codebook.codebook_groups if given else self.codebook_groups,
                          segment=_segment_of(module, self.segment), pad=self.pad, name=name,
                          check_k=self.codebook == "layer" or self.codebook == "group", prune=self.prune)


@register_handler(VQConfig)
def _vq_handler(modules: list[tuple[str, nn.Module]], config: VQConfig) -> Iterator[tuple[str, nn.Module]]:
    shared = config.codebook if isinstance(config.codebook, Codebook) else None
    if config.codebook == "shared":
        segs = [weight_segments(m, config.d, segment=config.segment, pad=config.pad) for _, m in modules]
        total = sum(len(s) for s in segs)
        if config.k > total:
            names = [n for n, _ in modules]
            raise ValueError(f"shared codebook for layers {names}: K={config.k} is larger than their "
                             f"{total} segments (d={config.d}); use K <= {total}")
        dtype = config.codebook_dtype or modules[0][1].weight.dtype
        book, _ = fit_codebook(torch.cat([s.to(segs[0].device) for s in segs])[None], config.k,
                               iters=config.iters, init=config.init, batch_size=config.batch_size,
                               seed=config.seed, dtype=dtype, distributed=config.distributed)
        shared = Codebook.from_tensor(book)
    for name, m in modules:
        common = dict(segment=config.segment, pad=config.pad, reassign_every=config.reassign_every, name=name)
        if shared is not None:
            yield name, _from_float(m, codebook=shared, **common)
        else:
            yield name, _from_float(m, config.k, config.d, codebook_groups=config.codebook_groups, iters=config.iters,
                                    init=config.init, batch_size=config.batch_size, seed=config.seed,
                                    codebook_dtype=config.codebook_dtype, distributed=config.distributed,
                                    prune=config.prune, **common)
