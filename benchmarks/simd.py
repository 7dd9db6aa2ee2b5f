"""Benchmark the "simd" backend (2 bits/weight: K=16, d=2) against numba, fp32 F.linear and torch int8 dynamic.

    python benchmarks/simd.py                      # 4096x4096, batch 1/4/16, one thread, ~1-2 minutes
    python benchmarks/simd.py --batches 1 --rounds 5 --threads 1 2

Every backend is timed in the same process, in blocks of calls, the backends alternating block after block
(order shuffled each round), so a noisy neighbour slows all of them alike; the table gives the median and the
[min, max] range over rounds of the per-call time, and the paired ratios int8/simd (> 1: simd faster).
Cases: "cache" (one layer, called again and again: its 8 MB of uint8 indices stay in the 32 MB L3) and "dram"
(--layers distinct layers in rotation, weights streaming from memory).  "simd" is `vq_matmul(backend="simd")`
end to end: the kernel reads the caller's uint8 index tensor in place on every call (no private copy, no
freshness compare) and range-checks every byte as it goes, so that check is inside every "simd" time;
"simd kernel" is `simd.simd_matmul` on the same tensor (the same kernel without vq_matmul's argument checks
and dispatch).  "simd packed" is a whole layer, `QuantizedLinear(code=SimdCode)` as `vqlab.pack_simd_` builds
it, called like the int8 module: the indices stored in the kernel's own 4-bit layout (4 MB), no transpose.
Then the error of simd and of int8 dynamic against the float64 reference on the same VQ weights, relative to
rms(y), for Gaussian inputs and for inputs with 8 outlier channels (30x); and the training / "torch" path
(K=256, d=4): `dequantize` forward, dequantize + GEMM, and a training step (forward + backward to the
codebook), next to plain torch indexing (the reference before it was sped up) and the fp32 GEMM.

OMP_WAIT_POLICY=PASSIVE is set unless given: numba's OpenMP workers otherwise spin after each parallel region
and slow whatever runs next on a 2-core machine (torch int8 right after numba: 12-20 ms instead of 0.4-1).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before numba / torch start their OpenMP runtimes

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def cpu_line() -> str:
    """CPU model, cores and vector flags (from /proc/cpuinfo where it exists)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx[0-9a-z_]*|neon|asimd)\b", info)))
    return f"{model.group(1) if model else platform.machine()}, {torch.get_num_threads()} torch threads of " \
           f"{info.count('processor')} logical cores; vector flags: {' '.join(flags) or 'none'}"


def int8_dynamic(w: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


from vqlab.bench import packed_layer  # noqa: E402  the layer vqlab.pack_simd_ builds


def make_layers(count: int, m: int, n: int, k: int, d: int, seed: int = 0):
    """count VQ layers: (codebook (K, d), uint8 indices (m, n/d), dense fp32 weight)."""
    from vqlab.kernels import dequantize

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        book = torch.randn(k, d, generator=g) * 0.02
        idx = torch.randint(0, k, (m, n // d), generator=g, dtype=torch.uint8)
        out.append((book, idx, dequantize(book, idx).contiguous()))
    return out


def timings(fns: dict, rounds: int, block_s: float) -> dict[str, list[float]]:
    """Per-call seconds per round for each function: alternating blocks of calls, shuffled each round."""
    per_call = {}
    for name, fn in fns.items():                       # warm up and size each block to ~block_s seconds
        fn()
        t0 = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t0, 1e-6)
    reps = {name: max(3, int(block_s / t)) for name, t in per_call.items()}
    out = {name: [] for name in fns}
    rng = random.Random(0)
    for _ in range(rounds):
        names = list(fns)
        rng.shuffle(names)
        for name in names:
            fn, r = fns[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(r):
                fn()
            out[name].append((time.perf_counter() - t0) / r)
    return out


def fmt(xs: list[float], scale: float = 1e3) -> str:
    return f"{statistics.median(xs) * scale:7.3f} [{min(xs) * scale:.3f}, {max(xs) * scale:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[4096, 4096], metavar=("M", "N"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=float, default=0.03, help="seconds per block of calls")
    p.add_argument("--layers", type=int, default=12, help="layers rotated in the 'dram' case")
    p.add_argument("--no-dram", action="store_true")
    p.add_argument("--no-train", action="store_true", help="skip the training-path (dequantize) timings")
    p.add_argument("--train-only", action="store_true", help="only the training-path timings")
    args = p.parse_args(argv)

    from vqlab.kernels import lut_numba, simd, vq_matmul   # lut_numba selects numba's threading layer first

    import numba

    m, n = args.size
    k, d = 16, 2
    if args.train_only:
        numba.set_num_threads(min(args.threads[0], numba.config.NUMBA_NUM_THREADS))   # first: it resets torch's count
        torch.set_num_threads(args.threads[0])
        print(f"CPU: {cpu_line()}")
        train_path(m, n, args.rounds, args.block)
        return 0
    print(f"CPU: {cpu_line()}")
    print(f"simd backend: {simd.native_status()}; torch {torch.__version__}, numba {numba.__version__} "
          f"({lut_numba.LAYER} threading layer), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    layers = make_layers(1 if args.no_dram else args.layers, m, n, k, d)
    k256 = make_layers(1, m, n, 256, 4, seed=1)[0]
    int8 = [int8_dynamic(w) for _, _, w in layers]
    packed = [packed_layer(book, idx) for book, idx, _ in layers]

    def kernel_fn(book, idx, x):
        return lambda: simd.simd_matmul(x, book, idx)

    with torch.no_grad():
        for threads in args.threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))   # first: it resets torch's count
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
                cases = [("cache", layers[:1], int8[:1], packed[:1])]
                stream = [torch.zeros(m * n * 2 // 8 // 4) for _ in layers]   # float32 buffers of the packed bytes
                if not args.no_dram and batch == 1:
                    cases.append(("dram", layers, int8, packed))
                for case, lays, qs, ps in cases:
                    if case == "cache":
                        book, idx, w = lays[0]
                        fns = {"simd": lambda: vq_matmul(x, book, idx, backend="simd"),
                               "simd kernel": kernel_fn(book, idx, x),
                               "simd packed": lambda: ps[0](x),
                               "numba": lambda: vq_matmul(x, book, idx, backend="numba"),
                               "numba K256 d4": lambda: vq_matmul(x, k256[0], k256[1], backend="numba"),
                               "fp32": lambda: F.linear(x, w),
                               "int8 dynamic": lambda: qs[0](x),
                               "read packed": lambda: stream[0].sum()}
                    else:
                        it = {}

                        def rot(name, make):
                            calls = [make(i) for i in range(len(lays))]
                            it[name] = 0

                            def call():
                                it[name] = (it[name] + 1) % len(calls)
                                return calls[it[name]]()
                            return call
                        fns = {"simd": rot("simd", lambda i: (lambda: vq_matmul(x, lays[i][0], lays[i][1], backend="simd"))),
                               "simd kernel": rot("simd kernel", lambda i: kernel_fn(lays[i][0], lays[i][1], x)),
                               "simd packed": rot("simd packed", lambda i: (lambda: ps[i](x))),
                               "int8 dynamic": rot("int8", lambda i: (lambda: qs[i](x))),
                               "read packed": rot("read", lambda i: (lambda: stream[i].sum()))}
                    res = timings(fns, args.rounds, args.block)
                    print(f"\n{m}x{n}, K={k}, d={d} (2 bits/weight), batch {batch}, {threads} thread(s), {case}: "
                          f"ms per call, median [min, max] over {args.rounds} rounds")
                    for name, xs in res.items():
                        print(f"  {name:14s} {fmt(xs)}")
                    for name in ("simd", "simd kernel", "simd packed"):
                        ratio = [a / b for a, b in zip(res["int8 dynamic"], res[name])]
                        print(f"  int8 dynamic / {name:12s} = {statistics.median(ratio):.2f}x "
                              f"[{min(ratio):.2f}, {max(ratio):.2f}]  (> 1: {name} faster)")
                    if batch == 1:
                        ratio = [a / b for a, b in zip(res["simd packed"], res["read packed"])]
                        print(f"  simd packed / reading its {m * n * 2 // 8 >> 20} MiB of packed bytes ({case}) = "
                              f"{statistics.median(ratio):.2f}x [{min(ratio):.2f}, {max(ratio):.2f}]  (target <= 2; "
                              f"read = one summing pass over a buffer of that size)")
                    if "numba" in res:
                        for name in ("numba", "fp32"):
                            ratio = [a / b for a, b in zip(res[name], res["simd"])]
                            print(f"  {name} / simd = {statistics.median(ratio):.2f}x [{min(ratio):.2f}, {max(ratio):.2f}]")

        # ---- error on the same weights, relative to rms(y)
        torch.set_num_threads(args.threads[0])
        book, idx, w = layers[0]
        g = torch.Generator().manual_seed(123)
        print("\nerror vs the float64 reference on the same VQ weights, relative to rms(y): rms, max "
              "(simd: and the model sigma = sqrt(sum_g G step_g^2 / 12))")
        for label, outliers in (("gaussian x", 0), ("8 outlier channels x30", 8)):
            x = torch.randn(16, n, generator=g)
            if outliers:
                x[:, torch.randperm(n, generator=g)[:outliers]] *= 30
            ref = x.double() @ w.double().T
            scale = ref.pow(2).mean().sqrt().item()
            ys = vq_matmul(x, book, idx, backend="simd").double()
            yq = int8[0](x).double()
            sigma = simd.error_sigma(simd.simd_tables(x, book)[1], n // d)
            print(f"  {label:24s} simd packed gives the same outputs as simd, bit for bit: "
                  f"{torch.equal(packed[0](x), ys.float())}")
            for name, y in (("simd", ys), ("int8 dynamic", yq)):
                e = (y - ref) / scale
                extra = f", sigma {np.sqrt((sigma ** 2).mean()) / scale:.2e}, max/sigma " \
                        f"{((y - ref).abs().amax(1).numpy() / sigma).max():.1f}" if name == "simd" else ""
                print(f"  {label:24s} {name:13s} rms {e.pow(2).mean().sqrt().item():.2e}  max {e.abs().max().item():.2e}{extra}")
        if not args.no_train:
            train_path(m, n, args.rounds, args.block)
    return 0


def train_path(m: int, n: int, rounds: int, block_s: float, batch: int = 16) -> None:
    """Timings of the training path (K=256, d=4): dequantize, dequantize + GEMM, forward + backward (a dense
    fp32 layer's training step beside it: its backward also builds the (m, n) weight gradient)."""
    from vqlab.kernels import dequantize

    def indexing(book, idx):                   # the reference before: int64 copy, advanced indexing
        return book[idx.long()].reshape(idx.shape[0], -1)

    book0, idx, w = make_layers(1, m, n, 256, 4, seed=2)[0]
    book = book0.clone().requires_grad_()
    wp = w.clone().requires_grad_()
    x = torch.randn(batch, n)

    def step(f):
        book.grad = None
        F.linear(x, f(book, idx)).sum().backward()

    def dense_step():
        wp.grad = None
        F.linear(x, wp).sum().backward()

    with torch.no_grad():
        fns = {"fp32 GEMM": lambda: F.linear(x, w),
               "dequantize": lambda: dequantize(book0, idx),
               "indexing": lambda: indexing(book0, idx),
               "dequantize+GEMM": lambda: F.linear(x, dequantize(book0, idx)),
               "indexing+GEMM": lambda: F.linear(x, indexing(book0, idx))}
        res = timings(fns, rounds, block_s)
    with torch.enable_grad():
        res.update(timings({"train step": lambda: step(dequantize), "train step indexing": lambda: step(indexing),
                            "fp32 train step": dense_step}, rounds, block_s))
    print(f"\ntraining / torch path, {m}x{n}, K=256, d=4, batch {batch}, {torch.get_num_threads()} thread(s): "
          f"ms per call, median [min, max] over {rounds} rounds ('indexing' = torch advanced indexing, the "
          f"reference before)")
    for name, xs in res.items():
        print(f"  {name:20s} {fmt(xs)}")
    for name, base in (("dequantize+GEMM", "fp32 GEMM"), ("indexing+GEMM", "fp32 GEMM"),
                       ("train step", "fp32 train step"), ("train step indexing", "fp32 train step")):
        ratio = [a / b for a, b in zip(res[name], res[base])]
        print(f"  {name} / {base} = {statistics.median(ratio):.2f}x [{min(ratio):.2f}, {max(ratio):.2f}]")


if __name__ == "__main__":
    sys.exit(main())
