"""The "simd" lookup-table convolution: VQ weights cut along the input channels (segment="input", K <= 16) run as
one 16-entry uint8 table per (input pixel, segment), shared by every output channel and every kernel tap that
reads the pixel, so the table cost no longer scales with kh * kw (the im2col route builds one per tap).

    y[b, :, oy, ox] ~= sum_{i, j, s} T[b, py, px, s, I[:, i, j, s]]     py = oy*sh + i*dh - ph,  px likewise
    T[b, y, x, s, k] = x[b, s*d:(s+1)*d, y, x] . codebook[k]

Tables are quantized to uint8 per table (its own lower bound lo, see simd_lut.c) with one step per image,
summed exactly in integers and flushed to float32; each lookup is off by at most step / 2, so an output's error has
standard deviation sigma = step * sqrt(kh * kw * S / 12) (`conv_sigma`).
AVX2 and the portable scalar path give bit-identical outputs (compiled with -ffp-contract=off, same float
operations in the same order), equal to the integer emulation `conv_emulate`.

Indices live in their own layout (`conv_pack`): (groups, ceil(cout/16), kh*kw, ceil(S/2), 16) uint8, byte c of a
vector = I[c, tap, 2p] | I[c, tap, 2p+1] << 4 for 16 output channels, 4 bits per index; the one 16-byte load feeds a
shuffle whose two lanes hold the tables of segments 2p and 2p+1 of a pixel.  Inputs and outputs are contiguous NCHW.
Memory safety: shapes are checked here and again in C; a nibble selects an entry inside a 16-byte register (& 15
in the scalar path), so no index can address memory; for K < 16 every call checks the largest nibble first and
raises ValueError for one >= K.
"""
from __future__ import annotations

import ctypes
import math

import torch

from . import simd

__all__ = ["conv_pack", "conv_unpack", "conv_packed_shape", "simd_conv2d", "conv_call", "ConvCall", "conv_emulate",
           "conv_sigma", "out_hw"]

_BOUND = False


def conv_packed_shape(out_channels: int, taps: int, segments: int, groups: int = 1) -> tuple[int, int, int, int, int]:
    """(groups, nblk, taps, S2, 16): the packed layout's shape for `out_channels` rows of `taps` * `segments`."""
    per = out_channels // groups
    return groups, -(-per // 16), taps, -(-segments // 2), 16


def conv_pack(indices: torch.Tensor, taps: int, groups: int = 1) -> torch.Tensor:
    """(out, taps * S) integer indices in [0, 16) (row order (kh, kw, S) of segment="input") -> the packed layout."""
    out, n = indices.shape
    s = n // taps
    g, nblk, _, s2, _ = conv_packed_shape(out, taps, s, groups)
    full = torch.zeros(g, nblk * 16, taps, 2 * s2, dtype=torch.uint8, device=indices.device)
    full[:, : out // g, :, :s] = indices.to(torch.uint8).reshape(g, out // g, taps, s)
    pairs = full.reshape(g, nblk, 16, taps, s2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 1, 3, 4, 2).contiguous()


def conv_unpack(packed: torch.Tensor, out: int, taps: int, segments: int) -> torch.Tensor:
    """The packed layout -> (out, taps * S) uint8 indices (a copy)."""
    g, nblk, _, s2, _ = packed.shape
    v = packed.permute(0, 1, 4, 2, 3)                                       # (g, nblk, 16, taps, S2)
    both = torch.stack((v & 15, v >> 4), dim=-1).reshape(g, nblk * 16, taps, 2 * s2)
    return both[:, : out // g, :, :segments].reshape(out, taps * segments).contiguous()


def _bind(lib) -> None:
    global _BOUND
    if not _BOUND:
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.vq_conv_scratch.argtypes, lib.vq_conv_scratch.restype = [i64] * 8, i64
        lib.vq_conv_call.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(ctypes.c_int)]
        lib.vq_conv_call.restype = i32
        _BOUND = True


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def out_hw(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of the convolution of an (h, w) input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


class ConvCall:
    """One convolution's native call for a fixed input shape, decided once (geometry array, output shape, how
    the batch is split over threads): `run` then costs one ctypes call per thread.  Made by `conv_call`."""

    __slots__ = ("key", "shape", "parts", "lib", "k", "need", "top", "owner")

    def run(self, x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor | None:
        """y (B, out, Ho, Wo) float32, or None for a codebook with a NaN / Inf (run the exact product).
        x, codebook, packed, bias: as `conv_call` checked them (contiguous float32 / uint8 CPU, same shapes)."""
        y = torch.empty(self.shape, dtype=torch.float32)
        xp, cp, pp, yp = x.data_ptr(), codebook.data_ptr(), packed.data_ptr(), y.data_ptr()
        bp = bias.data_ptr() if bias is not None else None
        if len(self.parts) == 1:
            rc = self.lib.vq_conv_call(self.parts[0][0], xp, cp, pp, bp, yp, _scratch(self.need).data_ptr(), self.top)
            rcs = ((rc, self.top.value),)
        else:
            def one(part):
                geo, xo, yo, _ = part
                top = ctypes.c_int(0)
                rc = self.lib.vq_conv_call(geo, xp + xo, cp, pp, bp, yp + yo, _scratch(self.need).data_ptr(),
                                           ctypes.byref(top))
                return rc, top.value
            rcs = list(simd._pool(len(self.parts)).map(one, self.parts))
        for rc, top in rcs:
            if rc:
                if rc == -4:
                    return None
                if rc == -5:
                    raise simd._out_of_range(top, self.k)
                raise RuntimeError(f"simd_conv2d: the kernel refused its arguments ({rc})")
        return y


def conv_call(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, out_channels: int, kernel_size,
              stride=1, padding=0, dilation=1, groups: int = 1, isa: str | None = None,
              threads: int | None = None) -> ConvCall:
    """Check the arguments of a lookup-table convolution (as `simd_conv2d` takes them) and plan its native call.
    raises ValueError naming a bad shape or dtype, RuntimeError where no native kernel exists."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
    if x.dim() != 4 or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"simd_conv2d: x must be a float32 CPU (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    if (codebook.dim() != 2 or codebook.dtype != torch.float32 or not codebook.is_cpu
            or not 1 <= codebook.shape[0] <= 16):
        raise ValueError(f"simd_conv2d: codebook must be a float32 CPU (K <= 16, d) tensor, got "
                         f"{tuple(codebook.shape)} {codebook.dtype}")
    b, c, h, w = x.shape
    k, d = codebook.shape
    if groups < 1 or c % groups or out_channels % groups or (c // groups) % d or d > 64:
        raise ValueError(f"simd_conv2d: {c} input channels in {groups} groups are not whole segments of d={d}")
    s = c // groups // d
    shape = conv_packed_shape(out_channels, kh * kw, s, groups)
    if (packed.dtype != torch.uint8 or tuple(packed.shape) != shape or not packed.is_cpu
            or not packed.is_contiguous()):
        raise ValueError(f"simd_conv2d: packed must be a contiguous uint8 CPU {shape} tensor, got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    ho, wo = out_hw(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if h < 1 or w < 1 or ho < 1 or wo < 1:
        raise ValueError(f"simd_conv2d: a {h}x{w} input padded by {(ph, pw)} is smaller than the kernel")
    name = simd.native_isa(isa)
    if name is None:
        raise RuntimeError(f"simd_conv2d: no native kernel here ({simd.native_status()})")
    lib = simd._loaded()[0]
    _bind(lib)
    call = ConvCall()
    call.lib, call.k, call.shape, call.top, call.key, call.owner = lib, k, (b, out_channels, ho, wo), ctypes.c_int(0), None, None
    call.need = lib.vq_conv_scratch(h, w, s, ph, pw, wo, kh, kw)
    threads = torch.get_num_threads() if threads is None else threads
    n = max(1, min(threads, b))
    cuts = [b * i // n for i in range(n + 1)]
    call.parts = []
    for a, e in zip(cuts, cuts[1:]):
        geo = (ctypes.c_int64 * 19)(e - a, h, w, c, s, d, k, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, groups,
                                    call.need, simd.ISAS[name])
        call.parts.append((ctypes.cast(geo, ctypes.c_void_p), a * c * h * w * 4, a * out_channels * ho * wo * 4, geo))
    return call


def simd_conv2d(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, out_channels: int, kernel_size,
                stride=1, padding=0, dilation=1, groups: int = 1, bias: torch.Tensor | None = None,
                isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """The lookup-table convolution: x (B, C, H, W) float32 CPU, codebook (K <= 16, d) float32 with d dividing
    C / groups, packed: `conv_pack`'s layout, bias (out,) or None -> (B, out_channels, Ho, Wo) float32.
    raises ValueError for a bad shape, an index >= K or a codebook with a NaN / Inf, RuntimeError where no native
    kernel exists.  threads: split the batch (default torch.get_num_threads())."""
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out_channels,) or not bias.is_cpu):
        raise ValueError(f"simd_conv2d: bias must be a float32 CPU ({out_channels},) tensor")
    x, codebook = x.contiguous(), codebook.contiguous()
    call = conv_call(x, codebook, packed, out_channels, kernel_size, stride, padding, dilation, groups, isa, threads)
    y = call.run(x, codebook, packed, None if bias is None else bias.contiguous())
    if y is None:
        raise ValueError("simd_conv2d: the codebook holds a NaN or Inf value")
    return y


def _scratch(need: int) -> torch.Tensor:
    """This thread's reused scratch (fresh memory would page-fault on every call)."""
    buf = getattr(simd._TLS, "conv", None)
    if buf is None or buf.numel() < need:
        buf = simd._TLS.conv = torch.empty(need, dtype=torch.uint8)
    return buf


def _fma(a: torch.Tensor, b, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c) through float64 (the product of two float32 values is exact there)."""
    return (a.double() * (b.double() if isinstance(b, torch.Tensor) else float(b)) + c.double()).float()


def _tables(x: torch.Tensor, codebook: torch.Tensor, padding, groups: int) -> tuple[torch.Tensor, ...]:
    """The kernel's tables: q (B, G, Hp, Wp, S, K) int64, LO (B, G, Hp, Wp) float32, step (B, G) float32 --
    the same float32 operations in the same order as simd_lut.c (fma through float64)."""
    b, c, h, w = x.shape
    k, d = codebook.shape
    s = c // groups // d
    ph, pw = _pair(padding)
    xs = x.reshape(b, groups, s, d, h, w).permute(0, 1, 4, 5, 2, 3)                      # (B, G, H, W, S, d)
    cmin, cmax = codebook.min(0).values, codebook.max(0).values
    wid = cmax - cmin
    r = xs[..., 0].abs() * wid[0]
    lo = xs[..., 0] * torch.where(xs[..., 0] >= 0, cmin[0], cmax[0])
    for j in range(1, d):
        v = xs[..., j]
        r = r + v.abs() * wid[j]
        lo = lo + v * torch.where(v >= 0, cmin[j], cmax[j])
    step = r.amax(dim=(2, 3, 4)) / 255.0 if r.numel() else torch.zeros(b, groups)             # (B, G)
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(step))
    cs = codebook.t()[None, None] * inv[..., None, None]                                      # (B, G, d, K)
    bias = 0.5 - lo * inv[:, :, None, None, None]
    v = bias.unsqueeze(-1).expand(*bias.shape, k)
    for j in range(d):
        v = _fma(xs[..., j].unsqueeze(-1), cs[:, :, None, None, None, j, :], v)
    v = torch.where(v > 255.0, torch.full_like(v, 255.0), v)
    q = torch.where(v > -1.0, v, torch.zeros_like(v)).to(torch.int64)
    LO = lo[..., 0]
    for i in range(1, s):
        LO = LO + lo[..., i]
    q = torch.nn.functional.pad(q, (0, 0, 0, 0, pw, pw, ph, ph))
    LO = torch.nn.functional.pad(LO, (pw, pw, ph, ph))
    return q, LO, step


def conv_emulate(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, out_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `simd_conv2d` computes, in plain torch (slow; for tests): the same quantized tables, exact integer
    sums per chunk of 128 segment pairs, the same float32 flushes in the same order.
    indices: (out, kh*kw*S) in the segment="input" row order.  -> (B, out, Ho, Wo) float32."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(dilation)
    b, c, h, w = x.shape
    k, d = codebook.shape
    s, per = c // groups // d, out_channels // groups
    s2 = -(-s // 2)
    q, LO, steps = _tables(x, codebook, padding, groups)
    ho, wo = out_hw(h, w, (kh, kw), (sh, sw), padding, (dh, dw))
    idx = indices.to(torch.int64).reshape(groups, per, kh, kw, s)
    y = torch.empty(b, out_channels, ho, wo, dtype=torch.float32)
    oy, ox = torch.arange(ho) * sh, torch.arange(wo) * sw
    for g in range(groups):
        acc = torch.zeros(b, per, ho, wo, dtype=torch.float32)
        off = torch.zeros(b, ho, wo, dtype=torch.float32)
        for i in range(kh):
            for j in range(kw):
                off = off + LO[:, g][:, (oy + i * dh)[:, None], (ox + j * dw)[None, :]]
        st = steps[:, g][:, None, None, None]
        total = torch.zeros(b, per, ho, wo, dtype=torch.int64)
        n = 0
        for i in range(kh):
            for j in range(kw):
                qq = q[:, g][:, (oy + i * dh)[:, None], (ox + j * dw)[None, :]]              # (B, Ho, Wo, S, K)
                for sp in range(s2):
                    for seg in (2 * sp, 2 * sp + 1):
                        if seg < s:
                            total += qq[..., seg, :][..., idx[g, :, i, j, seg]].permute(0, 3, 1, 2)
                    n += 1
                    if n == 128 or (i == kh - 1 and j == kw - 1 and sp == s2 - 1):
                        acc = torch.where(st > 0, acc + st * total.to(torch.float32), acc)
                        total.zero_()
                        n = 0
        y[:, g * per:(g + 1) * per] = acc + off[:, None]
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_sigma(x: torch.Tensor, codebook: torch.Tensor, kernel_size, padding=0, groups: int = 1) -> torch.Tensor:
    """The error's standard deviation per image and conv group, (B, groups): step * sqrt(kh * kw * S / 12)."""
    kh, kw = _pair(kernel_size)
    s = x.shape[1] // groups // codebook.shape[1]
    return _tables(x, codebook, padding, groups)[2] * math.sqrt(kh * kw * s / 12.0)
