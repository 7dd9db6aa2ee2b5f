"""Backend "simd": a register-resident lookup-table kernel in C (AVX2 `vpshufb`) for codebooks of K <= 16.

    y[b, o] = sum_s T[b, s, I[o, s]],   T[b, s, k] = x[b, s*d:(s+1)*d] . codebook[k]

The tables are quantized to uint8 (per segment s a minimum lo_s, per group g of G segments one step_g) and
summed exactly in uint16 per group (G * 255 <= 65535), then flushed to float32:
    y ~= sum_s lo_s + sum_g step_g * sum_{s in g} q[s, I[o, s]]
so the result approximates x @ W.T: each table entry is off by at most step_g / 2, and the error of one
output has standard deviation sigma = sqrt(sum_g G_g * step_g**2 / 12) (`error_sigma`); measured errors stay
below 4.2 sigma.  Being approximate, "auto" never picks this backend: opt in with `layer.backend = "simd"`,
`vq_matmul(..., backend="simd")` or `set_backend("simd")`.

The C source (simd_lut.c, beside this file) is compiled with the system compiler ($CC, else cc/gcc/clang) at
first use (about a second) into $VQLAB_CACHE_DIR, else $XDG_CACHE_HOME/vqlab, else ~/.cache/vqlab, keyed on
the source, the compiler's version and the flags, and loaded through ctypes (calls release the GIL).  ISA:
AVX2 where the CPU has it; $VQLAB_SIMD_ISA=scalar (or isa="scalar") forces the portable C path, which gives
bit-identical results.  Without a compiler or without AVX2 the backend runs the numba kernel (exact) after one
warnings.warn notice.  AVX-512 and NEON paths are not written (no such machine to test them on).

Native code reads only the checked private copy of the indices (`CheckedIndices`, every value < K) through
the layout built here; all shapes are checked in Python before a call and again in C.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .checked import CheckedIndices
from .registry import KernelBackend, register_backend

__all__ = ["GROUP", "BLOCK", "ISAS", "simd_layout", "simd_tables", "simd_matmul", "error_sigma", "native_isa",
           "native_status", "group_size"]

GROUP = 64          # segments per quantization group (even, <= 256 so that G * 255 fits uint16)
BLOCK = 32          # outputs per block of the index layout
ROW = 16            # table entries per segment
CHUNK = 64          # input rows per table build (tables of 64 rows x S x 16 bytes)
ISAS = {"scalar": 0, "avx2": 1}
FLAGS = ["-O3", "-fno-tree-pre", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing"]
_SOURCE = Path(__file__).with_name("simd_lut.c")
_LOCK = threading.Lock()
_WARNED: list[bool] = [False]
_TLS = threading.local()
_POOL: dict[int, ThreadPoolExecutor] = {}
_ISA_MEMO: dict = {}     # (requested isa, id(loaded library)) -> native_isa's answer


class _Unavailable(RuntimeError):
    """No compiled kernel here (reason in the message)."""


# ---------------------------------------------------------------- compiling and loading

def _compiler() -> str | None:
    """Path of the C compiler: $CC, else cc, gcc or clang on PATH; None when there is none."""
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("VQLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vqlab")
    return Path(root)


def _build() -> ctypes.CDLL:
    """Compile simd_lut.c (once per source / compiler / flags; cached on disk) and load it.
    raises _Unavailable with the reason."""
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler found (set $CC or install gcc)")
    try:
        source = _SOURCE.read_bytes()
    except OSError as e:
        raise _Unavailable(f"kernel source missing ({e})") from None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"C compiler {cc} does not run ({e})") from None
    key = hashlib.sha256(b"\0".join([source, cc.encode(), version, " ".join(FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:20]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"vqlab-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        lib = folder / f"simd_lut-{key}.so"
        if not lib.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
            except OSError:
                continue                                    # cache folder not writable: try the next
            try:
                run = subprocess.run([cc, *FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, timeout=120)
                if run.returncode != 0:
                    raise _Unavailable(f"{cc} failed: {run.stderr.decode(errors='replace').strip()[:300]}")
                os.replace(tmp, lib)                        # atomic: concurrent builders never see half a file
            except (OSError, subprocess.SubprocessError) as e:
                raise _Unavailable(f"compiling with {cc} failed ({e})") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError as e:
            raise _Unavailable(f"loading the compiled kernel failed ({e})") from None
        if dll.vq_abi_version() != 1:
            raise _Unavailable("compiled kernel has another ABI version")
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        dll.vq_isa_supported.argtypes, dll.vq_isa_supported.restype = [i32], i32
        dll.vq_tables.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i32]
        dll.vq_tables.restype = i32
        dll.vq_lut.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i32]
        dll.vq_lut.restype = i32
        return dll
    raise _Unavailable("no writable cache folder for the compiled kernel")


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not): compiled and loaded once per process."""
    _ISA_MEMO.clear()                                   # answers were for the previously loaded library
    with _LOCK:
        try:
            return _build(), ""
        except _Unavailable as e:
            return None, str(e)


def native_isa(isa: str | None = None) -> str | None:
    """The instruction set the native kernel runs with: `isa`, else $VQLAB_SIMD_ISA, else the best one this
    CPU supports ("avx2"); None when no compiled kernel or no supported ISA is here (the backend then runs
    numba).  raises ValueError for an unknown name, RuntimeError for a forced ISA this machine cannot run."""
    want = isa or os.environ.get("VQLAB_SIMD_ISA", "") or "auto"
    lib, why = _loaded()
    key = (want, id(lib))
    if key in _ISA_MEMO:
        return _ISA_MEMO[key]
    if want != "auto" and want not in ISAS:
        raise ValueError(f"simd isa must be one of {['auto', *ISAS]}, got {want!r}")
    if want != "auto":
        if lib is None or not lib.vq_isa_supported(ISAS[want]):
            raise RuntimeError(f"simd isa {want!r} is not usable here: {why or 'the CPU lacks it'}")
        found = want
    else:
        found = "avx2" if lib is not None and lib.vq_isa_supported(ISAS["avx2"]) else None
    _ISA_MEMO[key] = found
    return found


def native_status() -> str:
    """One line: which path the backend runs here and why."""
    lib, why = _loaded()
    isa = native_isa()
    if isa is not None:
        return f"native kernel, isa={isa}"
    return f"numba fallback: {why or 'no AVX2 on this CPU (VQLAB_SIMD_ISA=scalar runs the portable C path)'}"


# ---------------------------------------------------------------- layout, tables, kernel

def group_size(segments: int, group: int = GROUP) -> int:
    """The group size used for `segments` segments: `group` (even, 2..256), lowered to fit small layers."""
    if group < 2 or group > 256 or group % 2:
        raise ValueError(f"group must be even and in [2, 256] (G * 255 must fit uint16), got {group}")
    return min(group, segments + segments % 2)


def simd_layout(indices: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """(m, S) checked indices (values < 16) -> uint8 tensor (ngroups, nblk, G/2, 32): per group, block of 32 outputs
    and pair of segments, 32 bytes = (segment 2p: outputs j | outputs 16+j << 4, then segment 2p+1).
    Outputs are padded to a multiple of 32 and segments to ngroups * G with index 0 (never used: padded
    outputs are dropped and padded segments have all-zero tables)."""
    idx = indices.detach().cpu()
    m, s = idx.shape
    g = group_size(s, group)
    ngroups, nblk = -(-s // g), -(-m // BLOCK)
    padded = np.zeros((nblk * BLOCK, ngroups * g), dtype=np.uint8)
    padded[:m, :s] = idx.to(torch.uint8).numpy()
    p = padded.reshape(nblk, 2, 16, ngroups, g // 2, 2)                     # blk, half, j, group, pair, seg
    nib = p[:, 0] | (p[:, 1] << 4)                                          # blk, j, group, pair, seg
    return torch.from_numpy(np.ascontiguousarray(nib.transpose(2, 0, 3, 4, 1)).reshape(ngroups, nblk, g // 2, BLOCK))


def _scratch(name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused flat buffer `name` of at least `size` elements (a temporary: fresh memory costs
    page faults on every call)."""
    buf = getattr(_TLS, name, None)
    if buf is None or buf.numel() < size:
        buf = torch.empty(max(size, 1), dtype=dtype)
        setattr(_TLS, name, buf)
    return buf


def _codebook_t(codebook: torch.Tensor) -> np.ndarray:
    """(K, d) -> contiguous float32 (d, 16), columns >= K zero."""
    k, d = codebook.shape
    cbt = np.zeros((d, ROW), dtype=np.float32)
    cbt[:, :k] = codebook.detach().to(device="cpu", dtype=torch.float32).numpy().T
    return cbt


def _check_x_book(x: torch.Tensor, codebook: torch.Tensor, segments: int) -> None:
    if codebook.dim() != 2 or not 1 <= codebook.shape[0] <= ROW:
        raise ValueError(f"simd: codebook must be (K, d) with K <= {ROW}, got {tuple(codebook.shape)}")
    if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
            or x.shape[1] != segments * codebook.shape[1]):
        raise ValueError(f"simd: x must be a contiguous float32 CPU (B, {segments * codebook.shape[1]}) tensor, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")


def simd_tables(x: torch.Tensor, codebook: torch.Tensor, group: int = GROUP, isa: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's quantized tables (for tests and the error model): x (B, S*d) float32, codebook (K, d)
    -> (q (B, ngroups*G, 16) uint8, step (B, ngroups) float32, offset (B,) float32 = sum_s lo_s)."""
    k, d = codebook.shape
    s = x.shape[1] // d
    _check_x_book(x, codebook, s)
    isa = native_isa(isa)
    if isa is None:
        raise RuntimeError(f"simd: no native kernel here ({native_status()})")
    g = group_size(s, group)
    ngroups = -(-s // g)
    b = x.shape[0]
    tab = np.empty((ngroups, b, g, ROW), dtype=np.uint8)                    # the kernel's group-major order
    steps = np.empty((b, ngroups), dtype=np.float32)
    off = np.empty(b, dtype=np.float32)
    cbt = _codebook_t(codebook)
    rc = _loaded()[0].vq_tables(x.data_ptr(), b, s, d, cbt.ctypes.data, k, g, ngroups, tab.ctypes.data,
                                steps.ctypes.data, off.ctypes.data, ISAS[isa])
    if rc != 0:
        raise RuntimeError("simd: vq_tables refused its arguments")
    return np.ascontiguousarray(tab.transpose(1, 0, 2, 3)).reshape(b, ngroups * g, ROW), steps, off


def error_sigma(steps: np.ndarray, segments: int, group: int = GROUP) -> np.ndarray:
    """Standard deviation of one output's error from the table rounding, per input row:
    steps (B, ngroups) from `simd_tables` -> (B,) sqrt(sum_g G_g * step_g**2 / 12), G_g = real segments of g."""
    g = group_size(segments, group)
    counts = np.minimum(g, segments - g * np.arange(steps.shape[1]))
    return np.sqrt((counts * steps.astype(np.float64) ** 2).sum(axis=1) / 12.0)


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vqlab-simd")
    return _POOL[threads]


def simd_matmul(x: torch.Tensor, codebook: torch.Tensor, layout: torch.Tensor, m: int, group: int = GROUP,
                isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """y ~= x @ W.T by the quantized-table kernel.  x: (B, n) contiguous float32 CPU, codebook (K <= 16, d),
    layout from `simd_layout` for the (m, S) indices with the same `group` -> (B, m) float32.
    threads: worker threads splitting the output blocks (default torch.get_num_threads())."""
    k, d = codebook.shape
    s = x.shape[1] // d
    _check_x_book(x, codebook, s)
    g = group_size(s, group)
    ngroups, nblk = -(-s // g), -(-m // BLOCK)
    if (not isinstance(layout, torch.Tensor) or layout.dtype != torch.uint8 or not layout.is_contiguous()
            or tuple(layout.shape) != (ngroups, nblk, g // 2, BLOCK)):
        raise ValueError(f"simd: layout {tuple(getattr(layout, 'shape', ()))} does not fit m={m}, S={s}, G={g}")
    isa = native_isa(isa)
    if isa is None:
        raise RuntimeError(f"simd: no native kernel here ({native_status()})")
    lib, code = _loaded()[0], ISAS[isa]
    b = x.shape[0]
    out = torch.empty((b, nblk * BLOCK), dtype=torch.float32)
    cbt = _codebook_t(codebook)
    threads = max(1, min(threads or torch.get_num_threads(), nblk // 4))
    chunk = max(1, min(CHUNK, b))
    tab = _scratch("tab", chunk * ngroups * g * ROW, torch.uint8).data_ptr()
    steps = _scratch("steps", chunk * ngroups, torch.float32).data_ptr()
    off = _scratch("off", chunk, torch.float32).data_ptr()
    xp, yp, lp, cp = x.data_ptr(), out.data_ptr(), layout.data_ptr(), cbt.ctypes.data
    for lo in range(0, b, chunk):
        nb = min(chunk, b - lo)
        rc = lib.vq_tables(xp + lo * x.shape[1] * 4, nb, s, d, cp, k, g, ngroups, tab, steps, off, code)
        args = (lp, tab, steps, off, yp + lo * nblk * BLOCK * 4, nb, nblk)
        if threads == 1:
            rc |= lib.vq_lut(*args, 0, nblk, ngroups, g, code)
        else:
            cuts = [nblk * i // threads for i in range(threads + 1)]
            futures = [_pool(threads).submit(lib.vq_lut, *args, a, e, ngroups, g, code) for a, e in zip(cuts, cuts[1:])]
            for f in futures:
                rc |= f.result()
        if rc != 0:
            raise RuntimeError("simd: the kernel refused its arguments")
    return out[:, :m].contiguous() if m != nblk * BLOCK else out


# ---------------------------------------------------------------- the registered backend

def _notice(reason: str) -> None:
    if not _WARNED[0]:
        _WARNED[0] = True
        warnings.warn(f"vqlab: backend 'simd' runs the numba kernel instead ({reason})", RuntimeWarning,
                      stacklevel=2)


def _matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """Backend entry: xf (B, n) float32 contiguous, book (K <= 16, d), checked (m, S) -> (B, m) float32."""
    if native_isa() is None:
        _notice(native_status().split(": ", 1)[-1])
        from .ops import _numba_available, _numba_matmul
        if _numba_available():
            return _numba_matmul(xf, book, checked)
        w = book.to(torch.float32)[checked.copy.long()].reshape(checked.copy.shape[0], -1)
        return xf @ w.T
    layout = checked.layout(f"simd/{GROUP}", lambda c: simd_layout(c, GROUP))
    return simd_matmul(xf, book, layout, checked.copy.shape[0], GROUP)


@functools.cache
def _available() -> bool:
    """A compiler to try, or numba to fall back to (checked without compiling anything)."""
    if _compiler() is not None:
        return True
    try:
        import numba  # noqa: F401
        return True
    except ImportError:
        return False


register_backend(KernelBackend(
    "simd", matmul=_matmul, available=_available, supports=lambda k, d: k <= ROW, auto=False, exact=False,
    description="C lookup-table kernel, uint8 tables in registers (AVX2 vpshufb), K <= 16; approximate "
                "(table quantization, see vqlab.kernels.simd), opt-in only"))
