"""Backend "simd": a register-resident lookup-table kernel in C (AVX2 `vpshufb`) for codebooks of K <= 16.

    y[b, o] = sum_s T[b, s, I[o, s]],   T[b, s, k] = x[b, s*d:(s+1)*d] . codebook[k]

The tables are quantized to uint8 (per segment s a minimum lo_s, per table group g of G segments one step_g) and
summed exactly in uint16 per table group (G * 255 <= 65535), then flushed to float32:
    y ~= sum_s lo_s + sum_g step_g * sum_{s in g} q[s, I[o, s]]
so the result approximates x @ W.T: each table entry is off by at most step_g / 2, and the error of one
output has standard deviation sigma = sqrt(sum_g G_g * step_g**2 / 12) (`error_sigma`); the largest error
measured so far is 5.2 sigma (over 16 x 4096 outputs in benchmarks/simd.py) and the tests hold every output
within 6 sigma.  Being approximate, "auto" never picks this backend: opt in with `layer.backend = "simd"`,
`vq_matmul(..., backend="simd")` or `set_backend("simd")`.

The C source (simd_lut.c, beside this file) is compiled with the system compiler ($CC, else cc/gcc/clang) at
first use (about a second) into $VQLAB_CACHE_DIR, else $XDG_CACHE_HOME/vqlab, else ~/.cache/vqlab, keyed on
the source, the compiler's version and the flags, and loaded through ctypes (calls release the GIL).  Native code is
loaded only from a folder and file that belong to this user and that no other user can write (`_unsafe`): a
folder that fails is skipped with a warning, for $TMPDIR/vqlab-<uid> next, else a fresh private folder per process.  ISA:
AVX2 where the CPU has it; $VQLAB_SIMD_ISA=scalar (or isa="scalar") forces the portable C path, which gives
bit-identical results.  Without a compiler or without AVX2 and FMA the backend runs the numba kernel (exact) after one
warnings.warn notice.  AVX-512 and NEON paths are not written (no such machine to test them on).

Two index forms.  (1) A packed code (`vqlab.methods.vq.SimdCode`, made by `vqlab.pack_simd_`): the indices are
stored only in the kernel's own layout (`simd_pack`: 4 bits per index, interleaved so one 32-byte load feeds
two shuffles) and `_matmul_packed` reads it with no transpose -- the fast form (about 2x the row-major
one at batch 1), with bit-identical outputs.  The layout does not record its row count m (rows are padded to
blocks of 32, so a buffer for 40 rows has the shape of one for 64), so reading it (`_matmul_packed`, `_unpack`)
is private to `SimdCode`, which owns m, checks the buffer's shape against it and every index on load.  (2) Any VQ layer or call with backend "simd", described next.

A codebook with a NaN or Inf value (used or not) would make every table, and so every output, NaN: for such a
codebook every entry here (`simd_matmul`, the packed code `SimdCode`, the backend) runs the exact reference
for that call instead, so it gives the reference's outputs, as every other backend does.

Row-major indices: the kernel reads the caller's contiguous uint8 (m, S) index tensor itself, on every call --
no private copy, no cache, no layout built in advance (it transposes 16 rows x 32 segments at a time in
registers).  It also returns the largest index byte it read, and `simd_matmul` raises the ValueError of
`check_indices` when that is >= K, so a value written behind torch's back (`indices.numpy()[...] = v`) is
seen at the next call and an out-of-range value is refused on every call.  This is memory-safe by
construction: Python checks the tensor's shape, dtype, device and contiguity, the kernel reads only those
m * S bytes, and a lookup is a shuffle inside a 16-byte register (`& 15` in the scalar path), so no index
value, even one rewritten by another thread during the call, can address memory; such a race can only make
that call's output wrong.  Other index tensors (int64, strided views) go through the checked private copy of
`vqlab.kernels.checked`, converted to uint8 once per content.  Shapes are checked in Python and again in C.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int
from .backends import numba_matmul, numba_usable
from .checked import CheckedIndices
from .reference import check_indices, dequantize
from .registry import KernelBackend, register_backend

__all__ = ["GROUP", "ISAS", "simd_tables", "simd_matmul", "error_sigma", "native_isa", "native_status",
           "group_size", "simd_pack", "packed_shape", "user_cache_dir", "unsafe_path"]

GROUP = 64          # segments per table group: one quantization step each (even, <= 256 so that G * 255 fits uint16)
TILE_ROWS = 16      # output rows the kernel transposes together
TILE_SEGMENTS = 32  # segments per transposed block (two 128-bit lanes of 16)
ROW = 16            # table entries per segment
CHUNK = 64          # input rows per table build (tables of 64 rows x S x 16 bytes)
SMALL_ROWS = 256    # rows a packed layer's single-threaded call plan (packed_small_call) takes in one C call
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


def _uid() -> int | None:
    """This process's user id (None where the OS has none: no ownership checks there)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _unsafe(path: Path, folder: bool) -> str | None:
    """Why native code must not be loaded from `path` (None: it may be).  A folder, or the library in it, must not be
    a symlink, must belong to this user and be writable by no one else (no group or world write bit): otherwise
    another local user could plant a library there whose constructor would run in this process."""
    uid = _uid()
    if uid is None:
        return None
    try:
        info = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be inspected ({e.strerror})"
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(info.st_mode):
        return f"{path} is not a {'folder' if folder else 'regular file'}"
    if info.st_uid != uid:
        return f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid})"
    if info.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def user_cache_dir() -> Path:
    """The user cache folder vqlab keeps machine-specific files in ($VQLAB_CACHE_DIR, else $XDG_CACHE_HOME/vqlab,
    else ~/.cache/vqlab); also `vqlab.kernels.cost`'s."""
    return _cache_dir()


def unsafe_path(path: Path, folder: bool) -> str | None:
    """Why a file or folder in the cache must not be trusted (`_unsafe`), or None."""
    return _unsafe(path, folder)


def _library_name(cc: str) -> str:
    """The cached library's file name, keyed on the source, the compiler and its version, the flags, the machine.
    raises _Unavailable when the source is missing or the compiler does not run."""
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
    return f"simd_lut-{key}.so"


def _compile(cc: str, lib: Path) -> None:
    """Compile simd_lut.c into `lib` (a temporary file in its folder, renamed: concurrent builders never see half a
    file).  raises OSError when the folder is not writable, _Unavailable when the compiler fails."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, timeout=120)
        if run.returncode != 0:
            raise _Unavailable(f"{cc} failed: {run.stderr.decode(errors='replace').strip()[:300]}")
        os.replace(tmp, lib)
    except subprocess.SubprocessError as e:
        raise _Unavailable(f"compiling with {cc} failed ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached(cc: str, folder: Path, name: str) -> tuple[Path | None, str]:
    """(path of the library in `folder`, compiled there if missing, "") or (None, why not): the folder is created
    private (0700) when missing, and neither it nor the library may be writable by another user (`_unsafe`)."""
    folder = Path(os.path.realpath(folder))
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        return None, f"{folder} cannot be created ({e.strerror})"
    why = _unsafe(folder, folder=True)
    if why:
        return None, why
    lib = folder / name
    if not os.path.lexists(lib):
        try:
            _compile(cc, lib)
        except OSError as e:
            return None, f"{folder} is not writable ({e.strerror})"
    why = _unsafe(lib, folder=False)
    return (None, why) if why else (lib, "")


def _bind(lib: Path) -> ctypes.CDLL:
    """Load the compiled kernel and declare its functions' signatures."""
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as e:
        raise _Unavailable(f"loading the compiled kernel failed ({e})") from None
    if dll.vq_abi_version() != 4:
        raise _Unavailable("compiled kernel has another ABI version")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    dll.vq_isa_supported.argtypes, dll.vq_isa_supported.restype = [i32], i32
    dll.vq_tables.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i32]
    dll.vq_tables.restype = i32
    dll.vq_lut_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, i32]
    dll.vq_lut_rows.restype = i32
    dll.vq_matmul_rows.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr,
                                   ptr, ptr, i32]
    dll.vq_matmul_rows.restype = i32
    dll.vq_lut_packed.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, ptr, i32]
    dll.vq_lut_packed.restype = i32
    dll.vq_matmul_packed.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr,
                                     i32, ptr, i32]
    dll.vq_matmul_packed.restype = i32
    return dll


def _build() -> ctypes.CDLL:
    """Compile simd_lut.c (once per source / compiler / flags; cached on disk) and load it.  Folders, in order: the
    user cache (`_cache_dir`), $TMPDIR/vqlab-<uid>, each used only when it and the library belong to this user and
    no one else can write them (`_cached`); else a fresh private temporary folder (mkdtemp, 0700), compiled into
    for this process and removed once loaded.  raises _Unavailable with the reason."""
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler found (set $CC or install gcc)")
    name = _library_name(cc)
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"vqlab-{_uid() or 0}"):
        lib, why = _cached(cc, folder, name)
        if lib is not None:
            return _bind(lib)
        warnings.warn(f"vqlab: not using {folder} for the simd kernel: {why}", RuntimeWarning, stacklevel=3)
    with tempfile.TemporaryDirectory(prefix="vqlab-simd-") as private:
        lib = Path(private) / name
        try:
            _compile(cc, lib)
        except OSError as e:
            raise _Unavailable(f"no writable folder for the compiled kernel ({e.strerror})") from None
        return _bind(lib)                                       # stays mapped after the file is removed


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


# ---------------------------------------------------------------- tables, kernel

def group_size(segments: int, table_group: int = GROUP) -> int:
    """The table group size used for `segments` segments: `table_group` (even, 2..256), lowered to fit small layers."""
    if table_group < 2 or table_group > 256 or table_group % 2:
        raise ValueError(f"table_group must be even and in [2, 256] (G * 255 must fit uint16), got {table_group}")
    return min(table_group, segments + segments % 2)


def _stored(table_group: int) -> int:
    """Table rows stored per table group: whole blocks of 32 segments."""
    return -(-table_group // TILE_SEGMENTS) * TILE_SEGMENTS


@functools.cache
def _segment_rows(table_group: int) -> np.ndarray:
    """Row of each of a table group's segments in the kernel's interleaved table: segment 16 L + t of a block of 32
    at 2 t + L (one table register = segments t and 16 + t, the two lanes of a transposed index vector)."""
    i = np.arange(_stored(table_group))
    return ((i & ~31) | ((i & 15) << 1) | ((i >> 4) & 1))[:table_group]


def _books(codebook: torch.Tensor) -> torch.Tensor:
    """The codebook(s) as a contiguous float32 CPU tensor ((K, d) or (G, K, d)): the tensor itself when it
    already is one (the kernel reads it on every call, so a codebook written behind torch's back is never stale)."""
    if codebook.dtype == torch.float32 and codebook.device.type == "cpu" and codebook.is_contiguous():
        return codebook.detach() if codebook.requires_grad else codebook
    return codebook.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _check_x_book(x: torch.Tensor, codebook: torch.Tensor, segments: int) -> None:
    if codebook.dim() not in (2, 3) or not 1 <= codebook.shape[-2] <= ROW or 0 in codebook.shape:
        raise ValueError(f"simd: codebook must be (K, d) or (G, K, d) with K <= {ROW}, got {tuple(codebook.shape)}")
    if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
            or x.shape[1] != segments * codebook.shape[-1]):
        raise ValueError(f"simd: x must be a contiguous float32 CPU (B, {segments * codebook.shape[-1]}) tensor, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")


def _check_threads(threads) -> None:
    """threads: None (torch's count) or an int >= 1; ValueError naming it otherwise."""
    if threads is not None:
        check_int("simd threads", threads, 1)


def simd_tables(x: torch.Tensor, codebook: torch.Tensor, table_group: int = GROUP, isa: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's quantized tables (for tests and the error model): x (B, S*d) float32, codebook (K, d)
    -> (q (B, ngroups*G, 16) uint8 in segment order, step (B, ngroups) float32, offset (B,) float32 = sum_s lo_s)."""
    if codebook.dim() != 2:
        raise ValueError(f"simd_tables: codebook must be (K, d), got {tuple(codebook.shape)}")
    k, d = codebook.shape
    s = x.shape[1] // d
    _check_x_book(x, codebook, s)
    isa = native_isa(isa)
    if isa is None:
        raise RuntimeError(f"simd: no native kernel here ({native_status()})")
    g = group_size(s, table_group)
    ngroups, gs = -(-s // g), _stored(g)
    b = x.shape[0]
    tab = np.empty((ngroups, b, gs, ROW), dtype=np.uint8)                   # the kernel's table-group-major order
    steps = np.empty((b, ngroups), dtype=np.float32)
    off = np.empty(b, dtype=np.float32)
    book = _books(codebook)
    rc = _loaded()[0].vq_tables(x.data_ptr(), b, s, d, book.data_ptr(), k, g, ngroups, tab.ctypes.data,
                                steps.ctypes.data, off.ctypes.data, ISAS[isa])
    if rc != 0:
        raise RuntimeError("simd: vq_tables refused its arguments")
    q = tab[:, :, _segment_rows(g)]                                          # back to segment order
    return np.ascontiguousarray(q.transpose(1, 0, 2, 3)).reshape(b, ngroups * g, ROW), steps, off


def error_sigma(steps: np.ndarray, segments: int, table_group: int = GROUP) -> np.ndarray:
    """Standard deviation of one output's error from the table rounding, per input row:
    steps (B, ngroups) from `simd_tables` -> (B,) sqrt(sum_g G_g * step_g**2 / 12), G_g = real segments of g."""
    g = group_size(segments, table_group)
    counts = np.minimum(g, segments - g * np.arange(steps.shape[1]))
    return np.sqrt((counts * steps.astype(np.float64) ** 2).sum(axis=1) / 12.0)


def _forget_threads_in_child() -> None:
    """A forked child has none of the parent's pool threads: a cached executor would queue work that no thread
    runs (the call would hang).  Forget the pools and the compile lock there (they are made again when needed)."""
    global _LOCK
    _POOL.clear()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_threads_in_child)


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOL:
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vqlab-simd")
    return _POOL[threads]


def _out_of_range(top: int, k: int) -> ValueError:
    """The error `reference.check_indices` raises for uint8 indices whose largest value is `top`."""
    return ValueError(f"indices hold values in [0, {top}] but the codebook has K={k} codewords: every index "
                      f"must lie in [0, {k - 1}]")


def simd_matmul(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, table_group: int = GROUP,
                isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """y ~= x @ W.T by the quantized-table kernel, reading the caller's index tensor in place.

    x: (B, n) contiguous float32 CPU; codebook: (K <= 16, d) or (G, K, d) (G equal blocks of output rows);
    indices: the (m, n/d) uint8 contiguous CPU tensor itself (no copy is made or kept).  -> (B, m) float32.
    Every call reads all m * n/d index bytes and raises ValueError (as `check_indices` does) when one is >= K,
    so a change made behind torch's back is always seen.  threads: worker threads splitting the output rows
    (default: torch.get_num_threads(), used only when the call is large enough to gain from it, see `_drive`)."""
    if (not isinstance(indices, torch.Tensor) or indices.dtype != torch.uint8 or indices.dim() != 2
            or indices.device.type != "cpu" or not indices.is_contiguous() or 0 in indices.shape):
        raise ValueError(f"simd: indices must be a non-empty contiguous uint8 CPU (m, S) tensor, got "
                         f"{tuple(getattr(indices, 'shape', ()))} {getattr(indices, 'dtype', type(indices).__name__)}")
    m, s = indices.shape
    _check_x_book(x, codebook, s)
    _check_threads(threads)
    codebook_groups = codebook.shape[0] if codebook.dim() == 3 else 1
    if m % codebook_groups:
        raise ValueError(f"simd: {m} output rows cannot be split into {codebook_groups} codebook groups")
    isa = native_isa(isa)
    if isa is None:
        raise RuntimeError(f"simd: no native kernel here ({native_status()})")
    return _run(x, codebook, indices, table_group, ISAS[isa], threads)


@functools.lru_cache(maxsize=256)
def _plan(s: int, b: int, table_group: int) -> tuple[int, int, int, int, int]:
    """(G, ngroups, rows per table chunk, table bytes (64-aligned), scratch bytes) for S segments, batch b."""
    g = group_size(s, table_group)
    ngroups = -(-s // g)
    chunk = CHUNK if b > CHUNK else max(b, 1)
    size = (chunk * ngroups * _stored(g) * ROW + 63) // 64 * 64                      # tables, then steps, offsets
    return g, ngroups, chunk, size, 64 + size + 4 * (chunk * ngroups + chunk)


def _scratch(need: int, threads: int) -> tuple[int, ctypes.Array]:
    """This thread's reused table scratch (64-aligned address; fresh memory would page-fault on every call)
    and its array of per-worker maximum index bytes."""
    buf, top = getattr(_TLS, "buf", None), getattr(_TLS, "top", None)
    if buf is None or buf.numel() < need:
        buf = _TLS.buf = torch.empty(need, dtype=torch.uint8)
    if top is None or len(top) < threads:
        top = _TLS.top = (ctypes.c_int * max(threads, 2))()
    return (buf.data_ptr() + 63) & ~63, top


def _drive(x: torch.Tensor, codebook: torch.Tensor, m: int, table_group: int, code: int, threads: int | None,
           units: int, fused, part, lookups_per_thread: int) -> torch.Tensor:
    """The loop both index forms share: per chunk of input rows and codebook group j, the tables and the lookups.
    Single-threaded one C call, fused(x_ptr, nb, book_ptr, j, y_ptr, tab, steps, off, top_ptr) -> rc; else the
    tables here and the codebook group's `units` work units (tiles or blocks of its output rows) split over the pool,
    this thread taking the first share: part(a, e, j, nb, y_ptr, tab, steps, off, top_ptr) -> rc for units
    [a, e).  y_ptr: row lo of the (B, m) output.  threads=None (torch's count) splits a call only when each
    thread gets at least `lookups_per_thread` of the B * m * S lookups: waking a pool thread costs tens of
    microseconds (more on a VM), which made batch 1 on 4096 x 4096 slower on two threads than on one (0.39 vs
    0.25 ms packed); an explicit `threads` is only capped by the work units.
    raises ValueError when an index read is >= K."""
    lib = _loaded()[0]
    k, d = codebook.shape[-2], codebook.shape[-1]
    codebook_groups = codebook.shape[0] if codebook.dim() == 3 else 1
    s, b = x.shape[1] // d, x.shape[0]
    g, ngroups, chunk, size, need = _plan(s, b, table_group)
    out = torch.empty((b, m), dtype=torch.float32)
    work_cap = b * m * s // lookups_per_thread if threads is None else threads
    threads = threads or torch.get_num_threads()
    if threads > 1:
        threads = max(1, min(threads, units // 4, work_cap))
    tab, top = _scratch(need, threads)
    steps = tab + size
    off = steps + 4 * chunk * ngroups
    top_p = ctypes.addressof(top)
    book = _books(codebook)
    xp, bp, yp, row_bytes = x.data_ptr(), book.data_ptr(), out.data_ptr(), x.shape[1] * 4
    big = 0
    for lo in range(0, max(b, 1), chunk):
        nb = min(chunk, b - lo)
        for j in range(codebook_groups):
            xj, bj, yl = xp + lo * row_bytes, bp + j * k * d * 4, yp + lo * m * 4
            if threads == 1:
                rc, used = fused(xj, nb, bj, j, yl, tab, steps, off, top_p), 1
            else:
                rc = lib.vq_tables(xj, nb, s, d, bj, k, g, ngroups, tab, steps, off, code) if nb else 0
                cuts = [units * i // threads for i in range(threads)] + [units]
                futures = [_pool(threads).submit(part, cuts[i], cuts[i + 1], j, nb, yl, tab, steps, off, top_p + 4 * i)
                           for i in range(1, threads)]
                rc |= part(cuts[0], cuts[1], j, nb, yl, tab, steps, off, top_p)
                for f in futures:
                    rc |= f.result()
                used = threads
            if rc != 0:
                raise RuntimeError(f"simd: the kernel refused its arguments ({rc})")
            big = max(big, *top[:used])
        if big >= k:
            raise _out_of_range(big, k)
    return out


def _finite(codebook: torch.Tensor) -> bool:
    """Whether every value of the codebook(s) is finite.  The tables are quantized over all K entries of a segment,
    so one NaN or Inf codeword, used or not, would make every output of the kernel NaN."""
    return bool(np.isfinite(_books(codebook).numpy()).all())


def _exact(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The reference product in float32, x (B, n) @ dequantize(codebook, indices).T -> (B, m): what the kernels run
    for a codebook with a non-finite value, so that such a codebook gives the reference's outputs on every
    backend (finite where the non-finite codewords are unused).  ValueError for an index >= K, as the kernel."""
    return x @ dequantize(codebook.detach().to(device="cpu", dtype=torch.float32), indices).T


def _run(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, table_group: int, code: int,
         threads: int | None) -> torch.Tensor:
    """simd_matmul after its checks: the row-major kernel over tiles of 16 output rows (`_drive`); the exact
    reference for a codebook with a non-finite value (`_exact`)."""
    if not _finite(codebook):
        return _exact(x, codebook, indices)
    lib = _loaded()[0]
    m, s = indices.shape
    k, d = codebook.shape[-2], codebook.shape[-1]
    per = m // (codebook.shape[0] if codebook.dim() == 3 else 1)
    g, ngroups = _plan(s, x.shape[0], table_group)[:2]
    ip, units = indices.data_ptr(), per // TILE_ROWS

    def fused(xj, nb, bj, j, yl, tab, steps, off, top):
        return lib.vq_matmul_rows(xj, nb, d, bj, k, ip, m, s, j * per, (j + 1) * per, yl, m, g, ngroups, tab, steps,
                                  off, top, code)

    def part(a, e, j, nb, yl, tab, steps, off, top):
        r1 = j * per + (TILE_ROWS * e if e < units else per)
        return lib.vq_lut_rows(ip, m, s, j * per + TILE_ROWS * a, r1, tab, steps, off, yl, m, nb, ngroups, g, top, code)

    return _drive(x, codebook, m, table_group, code, threads, units, fused, part, 1 << 22)


# ---------------------------------------------------------------- the packed layout (codes stored in it)

@functools.lru_cache(maxsize=256)
def packed_shape(m: int, s: int, codebook_groups: int = 1, table_group: int = GROUP) -> tuple[int, int, int, int, int]:
    """Shape of the packed layout of (m, S) indices in `codebook_groups` equal blocks of rows:
    (codebook_groups, ngroups, nblk, Gs/2, 32) uint8, nblk = ceil(m / codebook_groups / 32), Gs = G rounded up to 32."""
    if m < 1 or s < 1 or codebook_groups < 1 or m % codebook_groups:
        raise ValueError(f"simd: cannot pack {m} x {s} indices in {codebook_groups} codebook groups")
    g = group_size(s, table_group)
    return codebook_groups, -(-s // g), -(-(m // codebook_groups) // TILE_SEGMENTS), _stored(g) // 2, 32


def simd_pack(indices: torch.Tensor, k: int, codebook_groups: int = 1, table_group: int = GROUP) -> torch.Tensor:
    """(m, S) integer indices in [0, K <= 16) -> the kernel's packed layout (`packed_shape`), 4 bits per index,
    on the indices' device (torch ops only).  raises ValueError (as `check_indices`) for a value outside [0, K).

    Per codebook group, table group of G segments and block of 32 output rows: vector p = 16 b + t holds, in byte c,
    rows c (low nibble) and 16 + c (high nibble) at segment 32 b + t, and in byte 16 + c the same rows at segment
    32 b + 16 + t; padded rows and segments are 0 (their tables are 0)."""
    if not 1 <= k <= ROW:
        raise ValueError(f"simd: the packed layout holds K <= {ROW} codewords, got K={k}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"simd_pack: indices must be a 2-D (m, S) tensor, got {type(indices).__name__}")
    check_indices(indices, k)
    m, s = indices.shape
    nb, ng, nblk, half, _ = packed_shape(m, s, codebook_groups, table_group)
    g, gs = group_size(s, table_group), 2 * half
    per = m // codebook_groups
    full = torch.zeros(nb, nblk * 32, ng * g, dtype=torch.uint8, device=indices.device)
    full[:, :per, :s] = indices.to(torch.uint8).reshape(nb, per, s)
    full = full.reshape(nb, nblk * 32, ng, g)
    if gs != g:
        full = torch.nn.functional.pad(full, (0, gs - g))
    # (codebook_groups, blk, h, c, tgroup, b32, L, t): row 32 blk + 16 h + c, segment slot 32 b32 + 16 L + t
    full = full.reshape(nb, nblk, 2, 16, ng, gs // 32, 2, 16)
    nib = full[:, :, 0] | (full[:, :, 1] << 4)                         # (codebook_groups, blk, c, tgroup, b32, L, t)
    return nib.permute(0, 3, 1, 4, 6, 5, 2).contiguous().reshape(nb, ng, nblk, half, 32)


def _unpack(packed: torch.Tensor, m: int, s: int, table_group: int = GROUP) -> torch.Tensor:
    """The inverse of `simd_pack`: packed (codebook_groups, ngroups, nblk, Gs/2, 32) uint8 -> (m, S) uint8 indices.
    Private to `SimdCode`: the buffer does not record m (module docstring), the caller must own it."""
    codebook_groups = packed.shape[0] if packed.dim() == 5 else 0
    shape = packed_shape(m, s, max(codebook_groups, 1), table_group)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != shape:
        raise ValueError(f"simd: packed must be uint8 {shape} for {m} x {s} indices, got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    nb, ng, nblk, half, _ = shape
    g, gs = group_size(s, table_group), 2 * half
    v = packed.reshape(nb, ng, nblk, gs // 32, 16, 2, 16)             # (codebook_groups, tgroup, blk, b32, t, L, c)
    rows = torch.stack([v & 15, v >> 4], dim=3)                        # (codebook_groups, tgroup, blk, h, b32, t, L, c)
    full = rows.permute(0, 2, 3, 7, 1, 4, 6, 5).reshape(nb, nblk * 32, ng, gs)[..., :g]
    return full.reshape(nb, nblk * 32, ng * g)[:, : m // nb, :s].reshape(m, s).contiguous()


def _matmul_packed(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, m: int,
                   table_group: int = GROUP, isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """y ~= x @ W.T from a packed code: x (B, S*d) contiguous float32 CPU, codebook (K <= 16, d) or (G, K, d),
    packed: `simd_pack`'s (G, ngroups, nblk, Gs/2, 32) uint8 CPU tensor for m rows -> (B, m) float32.
    Private to `SimdCode` (`layer(x)` is the public way): the buffer does not record m, the caller must own it.
    Gives bit-identical outputs to `simd_matmul` on the unpacked indices.  For K < 16 every call reads every
    nibble and raises ValueError when one is >= K (with K = 16 every nibble is a codeword).  threads: as in
    `simd_matmul`."""
    codebook_groups = codebook.shape[0] if codebook.dim() == 3 else 1
    d = codebook.shape[-1]
    s = x.shape[1] // d if x.dim() == 2 else 0
    _check_x_book(x, codebook, s)
    _check_threads(threads)
    shape = packed_shape(m, s, codebook_groups, table_group)
    if (not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or tuple(packed.shape) != shape
            or packed.device.type != "cpu" or not packed.is_contiguous()):
        raise ValueError(f"simd: packed must be a contiguous uint8 CPU {shape} tensor for m={m}, S={s}, "
                         f"G={codebook_groups}, got {tuple(getattr(packed, 'shape', ()))} {getattr(packed, 'dtype', None)}")
    isa = native_isa(isa)
    if isa is None:
        raise RuntimeError(f"simd: no native kernel here ({native_status()})")
    return _run_packed(x, codebook, packed, m, table_group, ISAS[isa], threads)


def _run_packed(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, m: int, table_group: int, code: int,
                threads: int | None) -> torch.Tensor:
    """_matmul_packed after its checks: the packed kernel over blocks of 32 output rows (`_drive`); the exact
    reference for a codebook with a non-finite value (`_exact`)."""
    if not _finite(codebook):
        return _exact(x, codebook, _unpack(packed, m, x.shape[1] // codebook.shape[-1], table_group))
    lib = _loaded()[0]
    codebook_groups, _, nblk = packed.shape[:3]
    k, d = codebook.shape[-2], codebook.shape[-1]
    s, per = x.shape[1] // d, m // codebook_groups
    g, ngroups = _plan(s, x.shape[0], table_group)[:2]
    check, pstride, pp = int(k < ROW), packed[0].numel(), packed.data_ptr()

    def fused(xj, nb, bj, j, yl, tab, steps, off, top):
        return lib.vq_matmul_packed(xj, nb, s, d, bj, k, pp + j * pstride, per, yl + j * per * 4, m, g, ngroups, tab,
                                    steps, off, check, top, code)

    def part(a, e, j, nb, yl, tab, steps, off, top):
        return lib.vq_lut_packed(pp + j * pstride, per, a, e, tab, steps, off, yl + j * per * 4, m, nb, ngroups, g,
                                 check, top, code)

    return _drive(x, codebook, m, table_group, code, threads, nblk, fused, part, 1 << 23)


class PackedCall:
    """A packed layer's single-threaded call on a small batch, decided once (`packed_small_call`): the geometry
    array of `vq_packed_call`, the output shape, the scratch size.  `run` is one ctypes call."""

    __slots__ = ("geo", "shape", "need", "k", "lib", "top", "key", "owner")

    def run(self, x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor | None:
        """(B, m) float32 = the packed product + bias, or None for a codebook with a NaN / Inf (the caller runs the
        exact product).  raises ValueError for a nibble >= K.  Arguments as `packed_small_call` checked them."""
        y = torch.empty(self.shape, dtype=torch.float32)
        rc = self.lib.vq_packed_call(self.geo, x.data_ptr(), codebook.data_ptr(), packed.data_ptr(),
                                     None if bias is None else bias.data_ptr(), y.data_ptr(),
                                     _scratch(self.need, 1)[0], self.top)
        if rc:
            if rc == -4:
                return None
            if rc == -5:
                raise _out_of_range(self.top.value, self.k)
            raise RuntimeError(f"simd: the kernel refused its arguments ({rc})")
        return y


def packed_small_call(x: torch.Tensor, codebook: torch.Tensor, packed: torch.Tensor, m: int, table_group: int,
                      isa: str) -> PackedCall | None:
    """The plan of `_matmul_packed(x, codebook, packed, m, table_group, isa)` (+ bias) for the calls `_drive` runs
    on one thread (at most SMALL_ROWS rows, one codebook group, fewer lookups than the thread pool's threshold) as
    one C call over all rows (`_drive` builds tables CHUNK rows at a time, one call each), with
    every Python decision of that path (plan sizes, scratch, argument checks) made once: bit-identical outputs.
    The C call checks the codebook for NaN / Inf and every nibble against K itself, on every call.  None for any
    other call (the caller runs `_matmul_packed`).  x: (B, S*d) float32 contiguous CPU; codebook (K, d) or
    (1, K, d) float32 contiguous; packed: checked by the caller (`SimdCode`: dtype, device, contiguity, shape)."""
    b, n = x.shape if x.dim() == 2 else (0, 0)
    d, k = codebook.shape[-1], codebook.shape[-2]
    s = n // d
    if (not 0 < b <= SMALL_ROWS or (codebook.dim() == 3 and codebook.shape[0] != 1) or x.dtype != torch.float32
            or not x.is_cpu or not x.is_contiguous() or n != s * d or b * m * s >= 1 << 23
            or codebook.dtype != torch.float32 or not codebook.is_cpu or not codebook.is_contiguous()):
        return None
    _check_x_book(x, codebook, s)
    lib = _loaded()[0]
    if not getattr(lib, "_packed_call_bound", False):
        ptr = ctypes.c_void_p
        lib.vq_packed_call.argtypes = [ptr] * 7 + [ctypes.POINTER(ctypes.c_int)]
        lib.vq_packed_call.restype = ctypes.c_int
        lib._packed_call_bound = True
    g, ngroups = _plan(s, b, table_group)[:2]
    size = (b * ngroups * _stored(g) * ROW + 63) // 64 * 64                 # the tables of all b rows, one call
    need = 64 + size + 4 * (b * ngroups + b)
    c = PackedCall()
    c.geo = (ctypes.c_int64 * 10)(b, s, d, k, m, g, ngroups, int(k < ROW), ISAS[isa], size)
    c.shape, c.need, c.k, c.lib, c.top, c.key, c.owner = (b, m), need, k, lib, ctypes.c_int(0), None, None
    return c


# ---------------------------------------------------------------- the registered backend

def notice(reason: str) -> None:
    """Warn once per process that backend "simd" runs its exact fallback (`reason`: why no native kernel)."""
    if not _WARNED[0]:
        _WARNED[0] = True
        warnings.warn(f"vqlab: backend 'simd' runs the numba kernel instead ({reason})", RuntimeWarning,
                      stacklevel=2)


def _fallback(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """No native kernel here: the exact numba kernel (or dequantize + GEMM) after a one-line notice."""
    notice(native_status().split(": ", 1)[-1])
    if numba_usable():
        return numba_matmul(xf, book, checked)
    w = book.to(torch.float32)[checked.copy.long()].reshape(checked.copy.shape[0], -1)
    return xf @ w.T


def _matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """Backend entry for indices that are not a contiguous uint8 CPU tensor (int64, a strided view, ...): their
    checked private copy, converted to uint8 once per content.  xf (B, n) float32 contiguous, book (K <= 16, d),
    checked (m, S) -> (B, m) float32."""
    isa = native_isa()
    if isa is None:
        return _fallback(xf, book, checked)
    u8 = checked.layout("simd/uint8", lambda c: c.to(torch.uint8).contiguous())     # values < K <= 16: exact
    return _run(xf, book, u8, GROUP, ISAS[isa], None)


def _direct(xf: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Backend entry for the caller's own contiguous uint8 CPU indices (no copy, no cache): xf (B, n) float32
    contiguous, codebook (K <= 16, d) or (G, K, d) -> (B, m) float32; ValueError for an index >= K (the kernel
    reads every index byte on every call).  Runs only where `native_isa()` finds a kernel (`direct_ready`; else
    the route takes the checked path).  The checks that keep native code inside its buffers are repeated here
    (ops made them already)."""
    isa = native_isa()
    if isa is None:
        raise RuntimeError("vqlab: the simd direct entry was called without a native kernel (direct_ready is false)")
    m, s = indices.shape
    k = codebook.shape[-2]
    if (indices.dtype != torch.uint8 or not indices.is_contiguous() or indices.device.type != "cpu" or m * s == 0
            or xf.dtype != torch.float32 or not xf.is_contiguous() or xf.device.type != "cpu" or xf.dim() != 2
            or xf.shape[1] != s * codebook.shape[-1] or not 1 <= k <= ROW or codebook.dim() not in (2, 3)
            or m % (codebook.shape[0] if codebook.dim() == 3 else 1)):
        return simd_matmul(xf, codebook, indices, GROUP, isa)       # raises the precise ValueError
    return _run(xf, codebook, indices, GROUP, ISAS[isa], None)


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
    "simd", matmul=_matmul, direct=_direct, direct_ready=lambda: native_isa() is not None, available=_available, supports=lambda k, d: k <= ROW, auto=False, exact=False,
    description="C lookup-table kernel, uint8 tables in registers (AVX2 vpshufb), K <= 16; approximate "
                "(table quantization, see vqlab.kernels.simd), opt-in only"))
