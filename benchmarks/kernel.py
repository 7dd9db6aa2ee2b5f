"""Benchmark the VQ kernels against dense fp32 and int8 dynamic quantization; prints a pandas table.

    python benchmarks/kernel.py            # the full grid (several minutes on 2 cores)
    python benchmarks/kernel.py --quick    # 4096x4096, K=256, d=4 only
    python benchmarks/kernel.py --out results/kernel.csv

All rows are measured in one process, with equal thread counts for every backend (1 and 2 threads),
as the median of --repeats runs after warm-up (vqlab.bench.layer_timings).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import pandas as pd

LAYERS = [(512, 512), (1024, 1024), (4096, 4096), (11008, 4096)]
CODEBOOKS = [(256, 4), (256, 8), (16, 2), (65536, 8)]
BATCHES = [1, 16, 128]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only 4096x4096, K=256, d=4")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds per backend and row; slower calls get fewer runs (at least 5, see min_runs)")
    p.add_argument("--out", default=None, help="also write the table as CSV")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    from tqdm.auto import tqdm

    from vqlab.bench import layer_timings

    layers = [(4096, 4096)] if args.quick else LAYERS
    books = [(256, 4)] if args.quick else CODEBOOKS
    grid = [(t, m, n, k, d, b) for t in args.threads for (m, n) in layers for (k, d) in books for b in args.batches]
    frames = []
    for t, m, n, k, d, b in tqdm(grid, desc="kernel benchmark", file=sys.stderr):
        frames.append(layer_timings(m, n, k, d, b, repeats=args.repeats, threads=t, budget=args.budget))
    df = pd.concat(frames, ignore_index=True)
    wide = df.pivot_table(index=["threads", "m", "n", "K", "d", "batch"], columns="backend", values="seconds",
                          sort=False) * 1e3
    out = wide.reset_index()
    out["min_runs"] = df.groupby(["threads", "m", "n", "K", "d", "batch"], sort=False)["runs"].min().values
    for col in ("int8 dynamic", "vq numba", "vq auto"):
        out[f"dense/{col.split()[-1]}" if col != "int8 dynamic" else "dense/int8"] = wide["dense fp32"].values / wide[col].values
    if "vq simd packed" in wide:        # K <= 16 rows: the register-table kernel against int8 dynamic
        out["int8/simd packed"] = wide["int8 dynamic"].values / wide["vq simd packed"].values
    best = wide[["vq dense", "vq numba"]].min(axis=1).values
    out["auto/best"] = wide["vq auto"].values / best
    pd.set_option("display.width", 250)
    pd.set_option("display.max_rows", 500)
    print(f"milliseconds per call (median of up to {args.repeats} runs, min_runs = fewest for a slow backend); ratios > 1 mean faster than dense fp32; "
          f"auto/best <= ~1 means auto picked the faster of vq dense (dequantize+GEMM) and vq numba")
    print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        df.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
