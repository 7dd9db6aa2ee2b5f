"""`auto`'s cost model: the predicted seconds of one product on each backend, from counted work and a few
constants of this machine measured once.

Why not timing: `auto` used to time every candidate on the user's own call, once per shape -- 2-6 s on the first
evaluation of a small CNN, 25-30 s with one other CPU-bound job, and another answer from run to run on a busy
machine (issue 23).  A formula costs microseconds and gives the same answer every time; timing stays available,
asked for explicitly (`vqlab.kernels.tune`).

Work of one product (`Work`): rows B (input vectors: the batch, or batch * output positions of a convolution),
outputs m, segments S of length d (n = S d), K codewords, T tables per input vector (`flops.table_count`), and
whether a convolution's input must first be unfolded (im2col).  Formulas, in seconds (roofline: a kernel is
bound by its arithmetic or by its memory traffic, whichever is slower):

    dense   call_dense + max(2 B m n / gemm_flops, 4 m n / stream_bytes)
            the weight is rebuilt once and cached (`backends.dense_matmul`), so a call reads 4 m n bytes; a weight
            too large to cache (`backends.DENSE_CACHE_FLOATS`) adds its rebuild, another 4 m n / stream_bytes
    numba   call_lut + (2 B T S d K + pair) / table_flops + B m S' / lookups  [+ 4 B n / unfold_bytes for im2col]
            S' = ceil(S / 2) and pair = 256 B T S' (the pair tables) for K <= 16, else S' = S and pair = 0;
            wide_lookups instead of lookups for K > 256 (int16 indices, tables outside L1)

The constants (`Constants`) are measured once per machine at small sizes (well under a second once numba's
kernels are loaded; each the fastest of a few runs) and stored as JSON in the user cache folder
($VQLAB_CACHE_DIR, else $XDG_CACHE_HOME/vqlab, else ~/.cache/vqlab: `vqlab.kernels.simd`'s folder, with its
ownership checks) under a name hashed from `machine_key()`: CPU model and flags, vqlab/torch/numba versions,
thread counts.  A file that cannot be read, is not JSON, is too large, holds another key or a constant that is
not a positive finite number, or is not this user's own, is ignored and measured again; nothing in it is run.
On a busy machine the first measurement may be off, but it is stored, so every later choice is the same.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Work", "Constants", "dense_cost", "numba_cost", "constants", "load_stored", "machine_key", "cache_file",
           "measure", "forget"]

FORMAT = 1
MAX_FILE_BYTES = 16384


class Work(NamedTuple):
    """What one product computes (module docstring): rows B, outputs m, segments S, d, K, tables T per input
    vector, im2col (a convolution whose input a LUT kernel must unfold first)."""

    rows: int
    m: int
    segments: int
    d: int
    k: int
    tables: int = 1
    im2col: bool = False


@dataclass(frozen=True)
class Constants:
    """Per-machine rates (units in the names: per second, or seconds per call)."""

    call_dense: float       # s: one small F.linear call
    gemm_flops: float       # FLOP/s of a float32 GEMM (compute-bound shape)
    stream_bytes: float     # weight bytes/s a GEMV reads (memory-bound shape)
    call_lut: float         # s: one small numba LUT call
    table_flops: float      # FLOP/s of numba's table build
    lookups: float          # table reads/s of the packed LUT kernel (K <= 256)
    wide_lookups: float     # table reads/s of the wide LUT kernel (K > 256)
    unfold_bytes: float     # bytes/s F.unfold writes (im2col)


# ---------------------------------------------------------------- the formulas

def dense_cost(w: Work, c: Constants) -> float:
    """Predicted seconds of the "dense" backend: GEMM (or F.conv2d) on the cached rebuilt weight."""
    from .backends import DENSE_CACHE_FLOATS

    n = w.segments * w.d
    weight = 4.0 * w.m * n
    rebuild = weight / c.stream_bytes if w.m * n > DENSE_CACHE_FLOATS else 0.0
    return c.call_dense + max(2.0 * w.rows * w.m * n / c.gemm_flops, weight / c.stream_bytes) + rebuild


def numba_cost(w: Work, c: Constants) -> float:
    """Predicted seconds of the "numba" LUT backend (plus im2col for a convolution)."""
    pairs = w.k <= 16
    s_read = -(-w.segments // 2) if pairs else w.segments
    table = 2.0 * w.rows * w.tables * w.segments * w.d * w.k + (256.0 * w.rows * w.tables * s_read if pairs else 0.0)
    rate = c.lookups if w.k <= 256 else c.wide_lookups
    unfold = 4.0 * w.rows * w.segments * w.d / c.unfold_bytes if w.im2col else 0.0
    return c.call_lut + table / c.table_flops + w.rows * w.m * s_read / rate + unfold


# ---------------------------------------------------------------- measuring the constants

def _rate(amount: float, seconds: float, overhead: float) -> float:
    """amount / (seconds - overhead), the overhead never taking more than 90 % of the time."""
    return amount / max(seconds - overhead, 0.1 * seconds, 1e-9)


def _fastest(cases: dict[str, Callable[[], object]], rounds: int, runs: int) -> dict[str, float]:
    """Per case the fastest single call: `rounds` passes over all cases, `runs` timed calls each (after one
    warm-up), so a burst of other work on the machine spoils one pass of a case, not its minimum."""
    best = {name: math.inf for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure() -> Constants:
    """Time small products on this machine -> Constants (about 0.2-0.5 s once numba's kernels are loaded).

    Measured on one thread (torch's and numba's, restored after): a multi-threaded kernel on a busy machine
    waits for its slowest thread, which would make the constants depend on the load at the moment they were
    measured.  Both backends run on the same threads, so one-thread rates rank them as the thread count does."""
    import numba

    from .lut_numba import lut_layout, lut_matmul

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def lut(b: int, n: int, m: int, k: int, d: int):
        book, x = rnd(k, d), rnd(b, n)
        layout = lut_layout(torch.randint(0, k, (m, n // d), generator=g, dtype=torch.int32), k)
        return lambda: lut_matmul(x, book, layout)

    x1, w1 = rnd(1, 16), rnd(16, 16)
    xg, wg = rnd(64, 512), rnd(512, 512)
    xv, wv = rnd(1, 1024), rnd(2048, 1024)
    xc = rnd(8, 16, 32, 32)
    cases = {"call_dense": lambda: F.linear(x1, w1), "gemm": lambda: F.linear(xg, wg),
             "gemv": lambda: F.linear(xv, wv), "call_lut": lut(1, 32, 8, 256, 4),
             "table": lut(64, 512, 8, 256, 4),           # 16.8 M table FLOPs, 65 k lookups
             "lookups": lut(4, 1024, 4096, 256, 4),      # 4.2 M lookups, 2.1 M table FLOPs
             "wide": lut(4, 512, 2048, 512, 4),          # 1 M lookups at K=512, 2.1 M table FLOPs
             "unfold": lambda: F.unfold(xc, 3, padding=1)}
    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        t = _fastest(cases, rounds=3, runs=3)
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)
    table = _rate(2.0 * 64 * 512 * 256, t["table"], t["call_lut"])
    return Constants(call_dense=t["call_dense"],
                     gemm_flops=_rate(2.0 * 64 * 512 * 512, t["gemm"], t["call_dense"]),
                     stream_bytes=_rate(4.0 * 2048 * 1024, t["gemv"], t["call_dense"]),
                     call_lut=t["call_lut"], table_flops=table,
                     lookups=_rate(4.0 * 4096 * 256, t["lookups"], t["call_lut"] + 2.0 * 4 * 1024 * 256 / table),
                     wide_lookups=_rate(4.0 * 2048 * 128, t["wide"], t["call_lut"] + 2.0 * 4 * 512 * 512 / table),
                     unfold_bytes=_rate(4.0 * 8 * 144 * 1024, t["unfold"], 0.0))


# ---------------------------------------------------------------- the key and the file

@functools.cache
def _cpu() -> tuple[str, str]:
    """(CPU model name, its flags) from /proc/cpuinfo's first processor; platform's words elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip() and info:
                    break                                           # the first processor's block ends
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags") or info.get("Features") or ""
    return info.get("model name") or platform.processor() or "", " ".join(sorted(flags.split()))


def machine_key() -> dict:
    """What the constants depend on: CPU model and flags (hashed), machine, vqlab/torch/numba versions, threads."""
    from importlib import import_module

    try:
        import numba
        numba_version, numba_threads = numba.__version__, int(numba.config.NUMBA_NUM_THREADS)
    except ImportError:
        numba_version, numba_threads = None, 0
    model, flags = _cpu()
    return {"format": FORMAT, "vqlab": import_module("vqlab").__version__, "torch": torch.__version__,
            "numba": numba_version, "machine": platform.machine(), "cpu": model,
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch_threads": torch.get_num_threads(),
            "numba_threads": numba_threads}


def cache_file(key: dict | None = None) -> Path:
    """Where the constants for `key` (default: this machine's) are stored."""
    from .simd import user_cache_dir

    key = machine_key() if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return user_cache_dir() / f"cost-{digest}.json"


def _valid(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 1e-12 <= value <= 1e18)


def _load(path: Path, key: dict) -> Constants | None:
    """The constants stored in `path` for `key`, or None for anything else (module docstring)."""
    from .simd import unsafe_path

    if unsafe_path(path.parent, folder=True) or unsafe_path(path, folder=False):
        return None
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    names = [f.name for f in fields(Constants)]
    if (not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("constants"), dict)
            or sorted(data["constants"]) != sorted(names) or not all(_valid(v) for v in data["constants"].values())):
        return None
    return Constants(**{n: float(data["constants"][n]) for n in names})


def _save(path: Path, key: dict, c: Constants) -> bool:
    """Write the constants (a temporary file in the folder, then os.replace); False where the folder cannot be
    made, is not this user's own, or is not writable (the constants then live in this process only)."""
    from .simd import unsafe_path

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    if unsafe_path(path.parent, folder=True):
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cost-", suffix=".json", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "constants": asdict(c)}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LOCK = threading.Lock()
_KNOWN: dict[str, Constants] = {}     # cache file path -> constants, for this process


def constants() -> Constants:
    """This machine's constants: from memory, else from the cache file, else measured now and stored."""
    key = machine_key()
    path = cache_file(key)
    hit = _KNOWN.get(str(path))
    if hit is not None:
        return hit
    with _LOCK:
        hit = _KNOWN.get(str(path))
        if hit is None:
            hit = _load(path, key)
            if hit is None:
                hit = measure()
                _save(path, key, hit)
            _KNOWN[str(path)] = hit
    return hit


def load_stored() -> Constants | None:
    """This machine's constants if they are in memory or stored on disk (never measured here), else None."""
    key = machine_key()
    path = cache_file(key)
    with _LOCK:
        hit = _KNOWN.get(str(path))
        if hit is None:
            hit = _load(path, key)
            if hit is not None:
                _KNOWN[str(path)] = hit
    return hit


def forget() -> None:
    """Forget the constants held in memory (the file stays; the next `constants()` reads it again)."""
    _KNOWN.clear()
