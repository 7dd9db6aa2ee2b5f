"""Universal randomized (dithered) lattice quantization with universal source coding (Choi, El-Khamy, Lee:
"Universal deep neural network compression").

Each weight row (out, n) is cut into segments of `dim` weights (dim = 1, 4, 8 for the lattices Z, D4, E8),
scaled by the step Delta and dithered by a vector u drawn uniformly over the lattice's Voronoi cell from a seed:

    p     = Q(w / Delta + u)            Q: the nearest lattice point (Conway & Sloane)
    w_hat = Delta * (p - u)             the decoder draws the same u from the stored seed

The lattice points are written as integer symbols, a bijection onto Z^dim that drops the lattice's
redundancy (`_to_symbols`): Z as is; D4 (even sum) with the last coordinate's parity left out; E8 = D8 u (D8 + 1/2)
as p = k + c/2, k in D8, with the coset bit c in place of k8's parity bit.  (Writing 2p for E8 instead costs about
0.8 bit per weight more with lzma.)  The symbols are mapped to bytes (zigzag + LEB128 varint) and coded with a
universal lossless coder from the standard library (`coder`: "lzma" raw LZMA2, "bz2"; "huffman", a static canonical
Huffman code of the bytes from their own histogram (`vqlab.bits.huffman_encode`, a 132-byte table); or "none" for the varint
bytes themselves).  The code holds exactly that coded stream as a uint8 buffer (`stream`): `vqlab.save` writes
the coded bytes and `compressed_size` counts them; the points are decoded from it (and the dither redrawn from
the seed) on first use, checked by `validate` after a load, and cached.
Side information per layer: step (float32) and seed (int64), 12 bytes counted as other_bytes.

Magnitude pruning (`prune=p`, Choi et al.'s first stage): in every layer the floor(p * N + 1/2) segments of smallest
L2 norm (N segments; for Z a segment is one weight) are pruned: they decode to exactly zero (no dither) and are
coded in the same stream, as the symbol 0 in the segment's first coordinate, whose other symbols shift by one
(s -> s + 1 for s >= 0; all of a pruned segment's symbols are 0).  The universal coder then spends almost nothing
on long runs of pruned segments; no mask is stored.

Fine-tuning (`finetune="values"`, Choi et al.'s fine-tuning of the shared quantized values): every distinct integer
coordinate a layer's kept segments use (a few dozen values) gets one trainable float32 value in weight units
(`values`, initialised to step * coordinate), and rows() = values[coordinate] - step * u, pruned segments 0.  The
stream, and so every segment's coordinates, stay fixed; training (`vqlab.fit`) moves the shared values, whose
gradient is the sum over the weights that use them (the paper averages it, which only rescales it per value).  The
table exists from quantization on, so the coded size is the same before and after fine-tuning.  (`finetune=True`,
or "points", the mode of earlier versions, kept for their files: every distinct lattice point a trainable codeword
(dim floats each) — nearly every 8-D point is distinct, so the codebook outgrows the stream.)

Example:
    >>> import vqlab.methods.lattice as lat
    >>> vqlab.quantize_(model, lat.LatticeConfig(lattice="E8", step=0.02))
    >>> vqlab.compressed_size(model).compressed_bytes
"""
from __future__ import annotations

import bz2
import lzma
import math
import weakref
import zlib
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import torch
import torch.nn as nn

from ..bits import LZMA_FILTERS, ans_bytes, huffman_bytes, huffman_decode, huffman_encode
from ..checks import check_bool, check_choice, check_fraction, check_int, check_number
from ..codebook import prune_count
from ..codes import CodeSize, WeightCode, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..layers import quantized_layer

__all__ = ["LATTICES", "CODERS", "COORD_LIMIT", "exact_limit", "nearest_point", "generator_matrix", "voronoi_dither", "encode_ints",
           "decode_ints", "layer_seed", "LatticeCode", "LatticeConfig"]

LATTICES = {"Z": 1, "D4": 4, "E8": 8}          # lattice -> dimension
CODERS = ("lzma", "bz2", "huffman", "none")
_SIDE_BYTES = 4 + 8                           # step (float32) + seed (int64) per layer
COORD_LIMIT = 1 << 22   # |w| / step must stay below it: every point (and E8's 2p) is then exact in float32
_SYMBOL_MAX = 1 << 24   # symbols of points within COORD_LIMIT + 1 stay below it (D4: half, E8: 2p's range)
_VARINT_BYTES = 4       # bytes a symbol below _SYMBOL_MAX takes as zigzag + LEB128 (28 bits)
_F32_MAX = float(torch.finfo(torch.float32).max)


def _check_lattice(lattice) -> int:
    check_choice("lattice", lattice, sorted(LATTICES))
    return LATTICES[lattice]


# ---------------------------------------------------------------- nearest lattice point (Conway & Sloane)

def _nearest_dn(x: torch.Tensor) -> torch.Tensor:
    """D_n = {integer vectors with even sum}: f(x) = round(x); where sum f(x) is odd, g(x): the coordinate
    with the largest rounding error rounded the other way.  x: float64 with |x| < 2**51 (the parity is summed in
    int64, exactly)."""
    f = torch.round(x)
    err = x - f
    odd = f.to(torch.int64).sum(dim=-1).remainder(2) != 0
    k = err.abs().argmax(dim=-1, keepdim=True)                          # (N, 1)
    ek = err.gather(-1, k)
    away = torch.where(ek >= 0, torch.ones_like(ek), -torch.ones_like(ek))   # the other way (err 0: +1)
    g = f.scatter_add(-1, k, away)
    return torch.where(odd[..., None], g, f)


def exact_limit(dtype: torch.dtype) -> float:
    """The magnitude inputs of `nearest_point` must stay below for every nearest lattice point (integers, E8's
    half-integers, a parity fix one step away) to be exact in `dtype`: 2**(significand bits - 2), e.g. 2**22 for
    float32, 2**51 for float64."""
    digits = round(-math.log2(torch.finfo(dtype).eps)) + 1
    return float(2 ** (digits - 2))


def nearest_point(x: torch.Tensor, lattice: str) -> torch.Tensor:
    """The nearest point of `lattice` ("Z", "D4", "E8") to every row of x (n, dim) -> (n, dim), in x's float dtype
    (float32 for an integer x).  Computed in float64 with the parity summed in int64, so the result is a lattice
    point whatever x's dtype.

    Z: round.  D4: see `_nearest_dn`.  E8 = D8 u (D8 + 1/2): the closer of the two candidates.
    raises: ValueError for a non-finite x, or |x| >= `exact_limit(dtype)` (2**22 in float32, 2**51 in float64),
    where the points would not be exact in the result's dtype (pass float64 for larger inputs).
    """
    dim = _check_lattice(lattice)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"nearest_point({lattice}) needs x of shape (n, {dim}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x = x.detach().to(torch.float64)
    limit = exact_limit(dtype)
    big = float(x.abs().max()) if x.numel() else 0.0
    if not big < limit:                                            # NaN fails too
        raise ValueError(f"nearest_point({lattice}): x must be finite with |x| < {limit:.0f} (2**{int(math.log2(limit))})"
                         f" so that the lattice points are exact in {dtype}, got max |x| = {big!r}"
                         + ("; pass a float64 x" if dtype != torch.float64 and math.isfinite(big) else ""))
    if lattice == "Z":
        return torch.round(x).to(dtype)
    if lattice == "D4":
        return _nearest_dn(x).to(dtype)
    y0 = _nearest_dn(x)
    y1 = _nearest_dn(x - 0.5) + 0.5
    d0 = (x - y0).pow(2).sum(-1, keepdim=True)
    d1 = (x - y1).pow(2).sum(-1, keepdim=True)
    return torch.where(d0 <= d1, y0, y1).to(dtype)


# ---------------------------------------------------------------- dither: uniform over the Voronoi cell

def generator_matrix(lattice: str) -> torch.Tensor:
    """A generator matrix (rows = basis vectors, float64) of the lattice (Conway & Sloane, SPLAG ch. 4)."""
    dim = _check_lattice(lattice)
    if lattice == "Z":
        return torch.eye(1, dtype=torch.float64)
    if lattice == "D4":
        # D_n basis: -e1-e2, e1-e2, e2-e3, e3-e4 (determinant 2: the Voronoi cell has volume 2)
        return torch.tensor([[-1, -1, 0, 0], [1, -1, 0, 0], [0, 1, -1, 0], [0, 0, 1, -1]], dtype=torch.float64)
    # E8: 2e1, e_{i+1} - e_i (i = 1..6), (1/2, ..., 1/2) (determinant 1)
    g = torch.zeros(dim, dim, dtype=torch.float64)
    g[0, 0] = 2
    for i in range(1, 7):
        g[i, i - 1], g[i, i] = -1, 1
    g[7] = 0.5
    return g


def voronoi_dither(count: int, lattice: str, seed: int) -> torch.Tensor:
    """`count` vectors (count, dim), float64 on the CPU, uniform over the Voronoi cell of `lattice` around 0,
    drawn deterministically from `seed`: t uniform in [0, 1)^dim gives v = t G uniform over the fundamental
    parallelepiped; v - Q(v) is then uniform over the Voronoi cell (the parallelepiped tiles space like the cell)."""
    dim = _check_lattice(lattice)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    t = torch.rand(count, dim, generator=gen, dtype=torch.float64)
    if lattice == "Z":
        return t - 0.5
    v = t @ generator_matrix(lattice)
    return v - nearest_point(v, lattice)


# ---------------------------------------------------------------- integers <-> bytes <-> coded stream

def encode_ints(values: np.ndarray) -> bytes:
    """Signed integers -> zigzag -> LEB128 varint bytes (7 bits per byte, high bit = more bytes follow)."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    z = ((v << 1) ^ (v >> 63)).astype(np.uint64)
    if z.size == 0:
        return b""
    if int(z.max()) < 128:
        return z.astype(np.uint8).tobytes()
    nbytes = np.ones(z.size, dtype=np.int64)
    rest = z >> np.uint64(7)
    while rest.any():
        nbytes += (rest > 0)
        rest = rest >> np.uint64(7)
    width = int(nbytes.max())
    shifts = (7 * np.arange(width)).astype(np.uint64)
    groups = ((z[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
    pos = np.arange(width)[None, :]
    groups[pos < (nbytes[:, None] - 1)] |= 0x80
    return groups[pos < nbytes[:, None]].tobytes()


def decode_ints(data: bytes) -> np.ndarray:
    """Inverse of `encode_ints` -> int64 array; ValueError on a truncated or overlong varint."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    if b[-1] & 0x80:
        raise ValueError("truncated varint stream (the last byte has its continuation bit set)")
    if not (b & 0x80).any():
        z = b.astype(np.uint64)
    else:
        ends = np.flatnonzero((b & 0x80) == 0)
        starts = np.concatenate([[0], ends[:-1] + 1])
        if int((ends - starts).max()) >= 10:
            raise ValueError("varint longer than 10 bytes")
        group = np.repeat(np.arange(ends.size), ends - starts + 1)
        shift = (7 * (np.arange(b.size) - starts[group])).astype(np.uint64)
        z = np.add.reduceat((b & 0x7F).astype(np.uint64) << shift, starts)
    return (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)


def _to_symbols(ints: torch.Tensor, lattice: str) -> torch.Tensor:
    """Stored integers (N, dim) (E8: 2p) -> the symbols written to the stream, a bijection onto Z^dim that drops
    the lattice's redundancy (see the module docstring):

    D4 (even sum): the last coordinate's parity follows from the others, k4 = 2 m + parity(k1 + k2 + k3):
        symbols [k1, k2, k3, m] (1 bit per segment saved: the cell has volume 2).
    E8 = D8 u (D8 + 1/2): p = k + c/2 with k in D8 and the coset bit c; k8 = 2 m + parity(k1 + ... + k7):
        symbols [k1, ..., k7, 2 m + c] (the coset bit takes the parity bit's place).
    """
    if lattice == "Z":
        return ints
    sym = ints.clone()
    if lattice == "D4":
        par = ints[:, :3].sum(1).remainder(2)
        sym[:, 3] = torch.div(ints[:, 3] - par, 2, rounding_mode="floor")
        return sym
    c = ints[:, 0].remainder(2)
    k = torch.div(ints - c[:, None], 2, rounding_mode="floor")
    par = k[:, :7].sum(1).remainder(2)
    sym[:, :7] = k[:, :7]
    sym[:, 7] = 2 * torch.div(k[:, 7] - par, 2, rounding_mode="floor") + c
    return sym


def _from_symbols(sym: torch.Tensor, lattice: str) -> torch.Tensor:
    """Inverse of `_to_symbols`: any integer symbols give a lattice point (E8: returned as 2p)."""
    if lattice == "Z":
        return sym
    ints = sym.clone()
    if lattice == "D4":
        ints[:, 3] = 2 * sym[:, 3] + sym[:, :3].sum(1).remainder(2)
        return ints
    c = sym[:, 7].remainder(2)
    k = sym.clone()
    k[:, 7] = torch.div(sym[:, 7] - c, 2, rounding_mode="floor") * 2 + sym[:, :7].sum(1).remainder(2)
    return 2 * k + c[:, None]


def _mark_pruned(sym: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Symbols (N, dim) of every segment -> the coded symbols: a pruned segment all 0; a kept one with its first
    symbol s mapped to s + 1 for s >= 0 (negative s unchanged), so 0 never starts a kept segment."""
    out = sym.clone()
    first = out[:, 0]
    out[:, 0] = torch.where(first >= 0, first + 1, first)
    out[pruned] = 0
    return out


def _unmark_pruned(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_mark_pruned`: (plain symbols with pruned segments 0, pruned (N,) bool)."""
    first = sym[:, 0]
    pruned = first == 0
    plain = sym.clone()
    plain[:, 0] = torch.where(first > 0, first - 1, first)
    plain[pruned] = 0
    return plain, pruned


def _finetune_mode(finetune) -> str:
    """None, "points" or "values" from a config's or code's finetune (False / True = "points" / "points" /
    "values"); ValueError otherwise."""
    if finetune is False:
        return "none"
    if finetune is True:
        return "points"
    check_choice("finetune", finetune, (False, True, "points", "values"))
    return finetune


def _compress(raw: bytes, coder: str) -> bytes:
    if coder == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    if coder == "bz2":
        return bz2.compress(raw, 9)
    if coder == "huffman":
        return huffman_encode(raw)
    return raw


def _decompress(data: bytes, coder: str, limit: int) -> bytes:
    """Decompress at most `limit` bytes (a bigger output is refused before it is produced: a corrupted or hostile
    stream).  The caller's limit comes from the layer's coordinate count, which `vqlab.load` bounds by the file's
    own size (`vqlab.io.DECODE_CAP`)."""
    if coder == "none":
        out = data
    elif coder == "huffman":
        out = huffman_decode(data, limit)
    else:
        try:
            d = (lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS) if coder == "lzma"
                 else bz2.BZ2Decompressor())
            out = d.decompress(data, max_length=limit + 1)
        except (lzma.LZMAError, OSError, EOFError) as e:
            raise ValueError(f"the {coder} stream cannot be decoded: {e}") from None
        if len(out) <= limit and not d.eof:
            raise ValueError(f"the {coder} stream is truncated (no end of stream)")
        if d.unused_data:
            raise ValueError(f"the {coder} stream has {len(d.unused_data)} bytes after its end")
    if len(out) > limit:
        raise ValueError(f"the {coder} stream decodes to more than {limit} bytes")
    return out


# ---------------------------------------------------------------- the weight code

_CACHE: "weakref.WeakKeyDictionary[LatticeCode, tuple]" = weakref.WeakKeyDictionary()


def _check_step(step) -> None:
    check_number("step", step, 0, low_open=True)


def _check_coder(coder) -> None:
    check_choice("coder", coder, CODERS)


def check_step_fits(weight: torch.Tensor, step: float, label: str) -> None:
    """Raise ValueError naming `label` unless the weights are finite and |w| / step < COORD_LIMIT (2**22), so that
    every lattice coordinate (E8: twice it) is an exact float32 integer and no symbol overflows; a tiny step
    (1e-25) had turned every weight into a garbage point."""
    big = float(weight.detach().abs().max()) if weight.numel() else 0.0
    if not math.isfinite(big):
        raise ValueError(f"{label}: the weight holds NaN or Inf; lattice quantization needs finite weights")
    if big / step >= COORD_LIMIT:
        raise ValueError(f"{label}: step={step!r} is too small for weights up to |w| = {big:.4g}: |w| / step = "
                         f"{big / step:.4g} must stay below 2**22 = {COORD_LIMIT} (lattice coordinates exact in "
                         f"float32); use step >= {big / COORD_LIMIT:.3g}")
    _check_finite_rows(step, big / step, label)


def _check_finite_rows(step: float, top: float, label: str) -> None:
    """Rebuilt weights step * (point - dither), |point| <= top, must be finite in float32."""
    if step * (top + 2) >= _F32_MAX:
        raise ValueError(f"{label}: step={step!r} with coordinates up to {top:.4g} rebuilds weights beyond float32's "
                         f"range ({_F32_MAX:.4g})")


@register_code
class LatticeCode(WeightCode):
    """Dithered lattice points of a weight's rows (rows, n), n a multiple of the lattice dimension, held as
    one coded byte stream (`stream`, uint8).  rows() = step * (points - dither), the dither redrawn from `seed`."""

    kind = "lattice"

    def __init__(self, rows: int, n: int, lattice: str, step: float, seed: int, coder: str, nbytes: int,
                 finetune: bool = False, n_codewords: int = 0, pruned: bool = False, n_values: int = 0):
        super().__init__()
        dim = _check_lattice(lattice)
        _check_step(step)
        _check_coder(coder)
        self.lattice, self.step, self.seed, self.coder = lattice, float(step), int(seed), coder
        self.n_rows, self.n_cols = int(rows), int(n)
        self.finetune = bool(finetune)
        self.pruned = bool(pruned)
        self.register_buffer("stream", torch.zeros(int(nbytes), dtype=torch.uint8))
        if self.finetune:
            # the earlier fine-tuning: the distinct lattice points used become trainable codewords (in units of the
            # step); every segment keeps its point's index (the sorted order of the distinct points, recomputed
            # from the stream) and its dither
            self.codewords = nn.Parameter(torch.zeros(int(n_codewords), dim))
        if n_values:
            # Choi et al.'s shared values: one trainable value (weight units) per distinct coordinate, sorted
            self.values = nn.Parameter(torch.zeros(int(n_values)))

    @property
    def dim(self) -> int:
        return LATTICES[self.lattice]

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    @property
    def n_pad(self) -> int:
        """Row length quantized and stored: n rounded up to a multiple of the lattice dimension (zeros appended)."""
        return -(-self.n_cols // self.dim) * self.dim

    @property
    def _scale(self) -> int:
        """Stored integers = scale * coordinates (E8 has half-integer points)."""
        return 2 if self.lattice == "E8" else 1

    @classmethod
    def from_weight(cls, weight: torch.Tensor, lattice: str = "E8", step: float = 0.05, seed: int = 0,
                    coder: str = "lzma", pad: bool = False, finetune: bool | str = False,
                    prune: float = 0.0) -> "LatticeCode":
        """Quantize weight (out, ...) (rows = weight.reshape(out, -1)); pad=True appends zeros to rows whose
        length is no multiple of the lattice dimension (they are quantized and coded too), else ValueError;
        prune: fraction of segments, smallest L2 norm first, pruned to zero (module docstring);
        finetune: "values" makes the shared coordinate values trainable, True / "points" every distinct point a
        trainable codeword (both initialised to what the stream says)."""
        dim = _check_lattice(lattice)
        _check_step(step)
        _check_coder(coder)
        mode = _finetune_mode(finetune)
        prune = check_fraction("prune", prune)
        check_step_fits(weight, step, "LatticeCode.from_weight")
        flat = weight.detach().reshape(len(weight), -1)
        rows, n = flat.shape
        if n % dim and not pad:
            raise ValueError(f"lattice {lattice} needs rows of a multiple of {dim} weights, got a weight of "
                             f"{rows} rows of {n} (pass pad=True to append zeros)")
        n_pad = -(-n // dim) * dim
        flat = torch.nn.functional.pad(flat.cpu().to(torch.float64), (0, n_pad - n))
        u = voronoi_dither(rows * n_pad // dim, lattice, seed).to(torch.float32).to(torch.float64)
        segs = flat.reshape(-1, dim)                                          # (N, dim)
        x = segs / float(step) + u
        ints = torch.round(nearest_point(x, lattice) * (2 if lattice == "E8" else 1)).to(torch.int64)
        cut = prune_count(len(segs), prune) if prune else 0
        pruned = torch.zeros(len(segs), dtype=torch.bool)
        if cut:
            pruned[segs.pow(2).sum(1).argsort(stable=True)[:cut]] = True   # smallest L2 norm, ties: lower index
            ints[pruned] = 0
        sym = _to_symbols(ints, lattice)
        if prune:
            sym = _mark_pruned(sym, pruned)
        stream = _compress(encode_ints(sym.numpy()), coder)
        uniq = torch.unique(ints, dim=0) if mode == "points" else None
        coords = torch.unique(ints[~pruned]) if mode == "values" else None
        code = cls(rows, n, lattice, step, seed, coder, len(stream), mode == "points",
                   0 if uniq is None else len(uniq), pruned=bool(prune),
                   n_values=0 if coords is None else max(len(coords), 1))
        code.stream.copy_(torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else code.stream)
        with torch.no_grad():
            if uniq is not None:
                code.codewords.copy_(uniq.to(torch.float32) / code._scale)
            if coords is not None:
                code.values.copy_(code._initial_values(coords))
        return code.to(weight.device)

    def _initial_values(self, coords: torch.Tensor) -> torch.Tensor:
        """The shared values before fine-tuning: step * coordinate (coords: sorted stored integers, E8: 2p)."""
        if coords.numel() == 0:
            return torch.zeros(1)
        return (self.step * (coords.to(torch.float64) / self._scale)).to(torch.float32)

    # decoding, cached per code object and keyed on the stream tensor's identity/version and the side info
    def _key(self) -> tuple:
        s = self.stream
        try:
            version = s._version
        except RuntimeError:            # an inference-mode tensor has no version counter: key on its bytes
            version = zlib.crc32(s.detach().cpu().numpy().tobytes())
        return (id(s), version, s.data_ptr(), s.numel(), str(s.device), self.lattice, self.step, self.seed,
                self.coder, self.n_rows, self.n_cols)

    def _decoded(self) -> dict:
        """The stream decoded, cached per code object and stream: "ints" (rows, n_pad) int64 stored coordinates
        (E8: 2p; 0 in pruned segments), "dither" (rows, n_pad) float32, "pruned" (rows * n_pad / dim,) bool or
        None, "symbols" (rows * n_pad / dim, dim) int64 as coded; derived indices are added under other keys."""
        hit = _CACHE.get(self)
        key = self._key()
        if hit is not None and hit[0] == key:
            return hit[1]
        count = self.decoded_values()
        raw = _decompress(self.stream.detach().cpu().numpy().tobytes(), self.coder, _VARINT_BYTES * count)
        sym = decode_ints(raw)
        if sym.size != count:
            raise ValueError(f"the lattice stream holds {sym.size} coordinates, the layer needs "
                             f"{self.n_rows} x {self.n_pad} = {count}")
        top = max(int(sym.max()), -int(sym.min())) if sym.size else 0
        if top >= _SYMBOL_MAX:
            raise ValueError(f"the lattice stream holds a symbol of magnitude {top}, beyond the {_SYMBOL_MAX} that "
                             f"points with |w| / step < 2**22 reach")
        sym = torch.from_numpy(sym.copy()).reshape(-1, self.dim)
        pruned = None
        plain = sym
        if self.pruned:
            plain, pruned = _unmark_pruned(sym)
        ints = _from_symbols(plain, self.lattice).reshape(self.n_rows, self.n_pad)
        dither = voronoi_dither(count // self.dim, self.lattice, self.seed).to(torch.float32)
        out = {"ints": ints, "dither": dither.reshape(self.n_rows, self.n_pad), "pruned": pruned, "symbols": sym}
        _CACHE[self] = (key, out)
        return out

    def _decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer coordinates (rows, n_pad) int64, dither (rows, n_pad) float32) on the CPU."""
        d = self._decoded()
        return d["ints"], d["dither"]

    def _codeword_index(self) -> tuple[int, torch.Tensor]:
        """(number of distinct points, index (rows * n_pad / dim,) of every segment's point among them, sorted)."""
        d = self._decoded()
        if "points" not in d:
            uniq, inv = torch.unique(d["ints"].reshape(-1, self.dim), dim=0, return_inverse=True)
            d["points"] = (len(uniq), inv)
        return d["points"]

    def _value_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted distinct coordinates of the kept segments, index (rows, n_pad) of every coordinate among them)."""
        d = self._decoded()
        if "values" not in d:
            ints = d["ints"]
            kept = self._kept_mask()
            coords = torch.unique(ints[kept]) if bool(kept.any()) else torch.zeros(0, dtype=torch.int64)
            idx = torch.searchsorted(coords, ints.reshape(-1)).clamp_max(max(len(coords) - 1, 0))
            d["values"] = (coords, idx.reshape(ints.shape))
        return d["values"]

    def _kept_mask(self) -> torch.Tensor:
        """(rows, n_pad) bool: True where the weight's segment is not pruned."""
        d = self._decoded()
        if d["pruned"] is None:
            return torch.ones(self.n_rows, self.n_pad, dtype=torch.bool)
        return (~d["pruned"])[:, None].expand(-1, self.dim).reshape(self.n_rows, self.n_pad)

    def sparsity(self) -> float:
        """Fraction of segments pruned (0.0 without pruning)."""
        d = self._decoded()
        return 0.0 if d["pruned"] is None else float(d["pruned"].float().mean()) if d["pruned"].numel() else 0.0

    def decoded_values(self) -> int:
        """The coordinates the stream decodes to, rows * n_pad (what `vqlab.load` bounds by the file's size)."""
        return self.n_rows * self.n_pad

    def points(self) -> torch.Tensor:
        """The lattice points (rows, n_pad), float32 (E8: half-integers where the segment is in D8 + 1/2)."""
        ints, _ = self._decode()
        return ints.to(torch.float32) / self._scale

    def rows(self) -> torch.Tensor:
        """step * (points - dither), (rows, n), pruned segments 0; with shared values values[coordinate] - step *
        dither, with point codewords step * (codewords[point] - dither) (both trainable)."""
        ints, dither = self._decode()
        if "values" in self._parameters:
            _, idx = self._value_index()
            dev = self.values.device
            w = self.values[idx.to(dev)] - self.step * dither.to(dev)
        elif self.finetune:
            _, inv = self._codeword_index()
            dev = self.codewords.device
            pts = self.codewords[inv.to(dev)].reshape(self.n_rows, self.n_pad)
            w = self.step * (pts - dither.to(dev))
        else:
            pts = ints.to(torch.float32) / self._scale
            w = (self.step * (pts - dither)).to(self.stream.device)
        if self.pruned:
            w = w * self._kept_mask().to(w.device)
        return w[:, :self.n_cols]

    def validate(self) -> None:
        """Decode the stream: the right number of coordinates (a truncated, overlong or undecodable stream is
        refused), every segment a point of the lattice (the symbol mapping guarantees it; checked anyway)."""
        ints, _ = self._decode()
        seg = ints.reshape(-1, self.dim)
        top = int(seg.abs().max()) if seg.numel() else 0
        if top > self._scale * (COORD_LIMIT + 1):
            raise ValueError(f"a lattice coordinate of magnitude {top / self._scale:g} is beyond the {COORD_LIMIT} + 1 "
                             f"a step's coordinates may reach (|w| / step < 2**22)")
        _check_finite_rows(self.step, top / self._scale, "the lattice code")
        if self.lattice == "D4" and bool((seg.sum(1) % 2 != 0).any()):
            raise ValueError("lattice D4 points must have an even coordinate sum")
        if self.lattice == "E8":
            par = seg % 2
            if bool((par != par[:, :1]).any()) or bool((seg.sum(1) % 4 != 0).any()):
                raise ValueError("lattice E8 points must be all integers or all half-integers with an even sum")
        d = self._decoded()
        if d["pruned"] is not None and bool((d["symbols"][d["pruned"]] != 0).any()):
            raise ValueError("a pruned lattice segment (first symbol 0) must have all its symbols 0")
        if self.finetune:
            k, _ = self._codeword_index()
            if tuple(self.codewords.shape) != (k, self.dim):
                raise ValueError(f"the stream uses {k} distinct lattice points, but the code holds codewords "
                                 f"{tuple(self.codewords.shape)}, not ({k}, {self.dim})")
            if not bool(torch.isfinite(self.codewords).all()):
                raise ValueError("the fine-tuned codewords hold NaN or Inf")
        if "values" in self._parameters:
            coords, _ = self._value_index()
            if tuple(self.values.shape) != (max(len(coords), 1),):
                raise ValueError(f"the stream uses {len(coords)} distinct coordinates, but the code holds "
                                 f"{tuple(self.values.shape)} shared values")
            if not bool(torch.isfinite(self.values).all()):
                raise ValueError("the shared values hold NaN or Inf")

    def symbols(self) -> torch.Tensor:
        """The integer symbols the stream codes, (rows * n_pad / dim, dim) int64 (see `_to_symbols`; with pruning
        the first symbols marked, `_mark_pruned`)."""
        return self._decoded()["symbols"]

    def _coded_bytes(self, coder) -> int | None:
        """coder(symbols - min, range) over the symbols' own histogram, plus 8 bytes for min; None when the
        range [min, max] exceeds 2**20 symbols."""
        sym = self.symbols().reshape(-1)
        if sym.numel() == 0:
            return 0
        lo, hi = int(sym.min()), int(sym.max())
        if hi - lo >= 1 << 20:
            return None
        return coder(sym - lo, hi - lo + 1) + 8

    def huffman_bytes(self) -> int | None:
        """For comparison: the symbols Huffman-coded from their own histogram (one code-length byte per symbol
        of the range [min, max], plus 8 bytes for min), or None when the range exceeds 2**20 symbols."""
        return self._coded_bytes(huffman_bytes)

    def ans_bytes(self) -> int | None:
        """For comparison: the symbols ANS-coded from their own histogram (`vqlab.bits.ans_encode` over the range
        [min, max], header included, plus 8 bytes for min), or None when the range exceeds 2**20 symbols."""
        return self._coded_bytes(ans_bytes)

    def size(self, seen: set[int]) -> CodeSize:
        """index_bytes: the coded stream as stored; entropy_index_bytes / ans_index_bytes: `huffman_bytes` /
        `ans_bytes` (for comparison); other_bytes: step and seed (12 bytes); codebook_bytes: the fine-tuned
        codewords (float32, or the storage dtype under `compressed_size(store_dtype=...)`), if any."""
        data = self.stream.detach().cpu().numpy().tobytes()
        book = stored_bytes(self.codewords) if self.finetune else 0
        if "values" in self._parameters:
            book += stored_bytes(self.values)
        return CodeSize(index_bytes=len(data), other_bytes=_SIDE_BYTES, codebook_bytes=book,
                        entropy_index_bytes=self.huffman_bytes(), ans_index_bytes=self.ans_bytes(), streams=[data],
                        d=self.dim,
                        k=len(self.codewords) if self.finetune else None)

    def config(self) -> dict:
        out = {"rows": self.n_rows, "n": self.n_cols, "lattice": self.lattice, "step": self.step,
               "seed": self.seed, "coder": self.coder, "nbytes": int(self.stream.numel()),
               "finetune": self.finetune, "n_codewords": len(self.codewords) if self.finetune else 0}
        if self.pruned:
            out["pruned"] = True
        if "values" in self._parameters:
            out["n_values"] = len(self.values)
        return out

    @classmethod
    def from_config(cls, rows: int, n: int, lattice: str, step: float, seed: int, coder: str,
                    nbytes: int, finetune: bool = False, n_codewords: int = 0, pruned: bool = False,
                    n_values: int = 0) -> "LatticeCode":
        for name, v, low in (("rows", rows, 1), ("n", n, 1), ("seed", seed, 0), ("nbytes", nbytes, 0),
                             ("n_codewords", n_codewords, 0), ("n_values", n_values, 0)):
            check_int(f"LatticeCode {name}", v, low)
        check_bool("LatticeCode finetune", finetune)
        check_bool("LatticeCode pruned", pruned)
        return cls(rows, n, lattice, step, seed, coder, nbytes, finetune, n_codewords, pruned, n_values)

    def packing(self) -> dict[str, int]:
        return {}                   # the stream is already coded: stored as raw bytes

    def describe(self) -> dict:
        count = self.n_rows * self.n_cols
        setting = (f"{self.lattice} step={self.step:g} {self.coder}" + (" pruned" if self.pruned else "")
                   + (" point codewords" if self.finetune else "")
                   + (" shared values" if "values" in self._parameters else ""))
        out = {"method": self.kind, "setting": setting, "K": len(self.codewords) if self.finetune else None,
               "d": self.dim, "bits_per_weight": 8.0 * self.stream.numel() / count if count else None}
        if self.pruned:
            out["sparsity"] = self.sparsity()
        return out

    def extra_repr(self) -> str:
        return (f"rows={self.n_rows}, n={self.n_cols}, lattice={self.lattice}, step={self.step}, seed={self.seed}, "
                f"coder={self.coder}, bytes={self.stream.numel()}"
                + (f", codewords={len(self.codewords)}" if self.finetune else "")
                + (", pruned" if self.pruned else "")
                + (f", values={len(self.values)}" if "values" in self._parameters else ""))


# ---------------------------------------------------------------- config + handler

def layer_seed(seed: int, name: str) -> int:
    """The dither seed of layer `name`: seed + crc32(name), mod 2**63 (stable across runs and machines)."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % (1 << 63)


@dataclass(frozen=True)
class LatticeConfig(QuantConfig):
    """Universal randomized lattice quantization (Choi et al.) of nn.Linear / nn.Conv2d weights.

    Args:
        lattice: "Z" (scalar, dim 1), "D4" (dim 4) or "E8" (dim 8); a layer's rows (conv: cin/groups*kh*kw)
            must be a multiple of the dimension.
        step: the scale Delta (absolute, in weight units): w_hat = Delta * (Q(w / Delta + u) - u).
        seed: dither seed; layer `name` uses `layer_seed(seed, name)`.
        coder: "lzma", "bz2", "huffman" (static, from the stream's own byte histogram) or "none" (the
            zigzag-varint bytes uncompressed).
        pad: quantize rows whose length is no multiple of the dimension with zeros appended (coded too; the
            rows() drop them); else such a layer is refused by `check` before the model is touched.
        prune: fraction in [0, 1) of each layer's segments, smallest L2 norm first, pruned to exactly zero and coded
            in the stream (module docstring); 0 = none.
        finetune: "values" (Choi et al.): the shared coordinate values become trainable (a few dozen floats per
            layer, counted from quantization on, so fine-tuning, e.g. with `vqlab.fit`, leaves the size unchanged);
            True or "points" (earlier versions): every distinct lattice point a trainable codeword, stored and
            counted as float32 codebook bytes (about as many as the segments); False: nothing trainable.
    Example:
        >>> quantize_(model, LatticeConfig(lattice="E8", step=0.02))
        >>> quantize_(model, LatticeConfig(lattice="Z", step=0.01, prune=0.6, finetune="values"))   # Choi et al.
    """

    name: ClassVar[str] = "lattice"
    lattice: str = "E8"
    step: float = 0.05
    seed: int = 0
    coder: str = "lzma"
    pad: bool = False
    finetune: bool | str = False
    prune: float = 0.0

    def validate(self) -> None:
        _check_lattice(self.lattice)
        _check_step(self.step)
        _check_coder(self.coder)
        check_int("seed", self.seed, 0)
        check_bool("pad", self.pad)
        _finetune_mode(self.finetune)
        object.__setattr__(self, "prune", check_fraction("prune", self.prune))

    def check(self, module: nn.Module, name: str) -> None:
        super().check(module, name)
        check_step_fits(module.weight, self.step, f"layer {name!r}")
        dim = LATTICES[self.lattice]
        out, n = module.weight.shape[0], module.weight[0].numel()
        if n % dim and not self.pad:
            raise ValueError(f"layer {name!r}: lattice {self.lattice} cuts rows into segments of {dim} weights, but "
                             f"the weight has {out} rows of {n} (shape {tuple(module.weight.shape)}); pass pad=True, "
                             f"use lattice 'Z' or exclude the layer")


@register_handler(LatticeConfig)
def _lattice_handler(modules: list[tuple[str, nn.Module]], config: LatticeConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        code = LatticeCode.from_weight(m.weight, config.lattice, config.step, layer_seed(config.seed, name),
                                       config.coder, config.pad, config.finetune, config.prune)
        yield name, quantized_layer(m, code)
