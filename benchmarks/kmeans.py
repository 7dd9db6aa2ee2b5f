"""How fast is vqlab.codebook.kmeans?  Lloyd vs mini-batch, k-means++ vs random init.

    .venv/bin/python benchmarks/kmeans.py                 # N=1e6, d=4, K=256 (target: Lloyd < 10 s on 2 cores)
    .venv/bin/python benchmarks/kmeans.py --n 100000 --d 8 --k 1024 --threads 2

Data: a Gaussian mixture (K blobs) plus standard normal noise, like a layer's weight segments.
Prints one row per (method, init): N, d, K, method, init, iters run, seconds, distortion, dead_reseeded.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from vqlab.codebook import kmeans


def make_data(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, d) float32: half the rows from k blobs (std 0.1), half standard normal."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g)
    x = torch.randn(n, d, generator=g)
    half = n // 2
    x[:half] = mu[torch.randint(k, (half,), generator=g)] + 0.1 * x[:half]
    return x


def run(n: int, d: int, k: int, iters: int, batch_size: int, mb_iters: int, repeat: int = 1) -> pd.DataFrame:
    x = make_data(n, d, k)
    kmeans(x[:10_000], 16, iters=2)                                    # warm up threads / allocator
    rows = []
    for method, bs, its in (("lloyd", None, iters), (f"minibatch({batch_size})", batch_size, mb_iters)):
        for init in ("kmeans++", "random"):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                res = kmeans(x, k, iters=its, init=init, batch_size=bs, seed=0)
                best = min(best, time.perf_counter() - t0)
            rows.append(dict(N=n, d=d, K=k, method=method, init=init, iters=res.n_iter, seconds=round(best, 2),
                             distortion=res.distortion, dead_reseeded=res.dead_reseeded))
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=4)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (at most)")
    p.add_argument("--mb-iters", type=int, default=3, help="mini-batch passes over the data (at most)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="report the best of this many runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    df = run(a.n, a.d, a.k, a.iters, a.batch_size, a.mb_iters, a.repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
