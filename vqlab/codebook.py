"""Codebooks and how to fit them: k-means(++), mini-batch k-means, product and residual VQ, and the per-layer
fitting a VQ layer uses (codebook groups, magnitude pruning, k-means spread over torchrun ranks).

    res = kmeans(x, k=256)                  # x: (N, d) -> res.codebook (256, d), res.assignments (N,)
    codes = assign(x, res.codebook)         # nearest codeword of every row, (N,) int64
    x_hat = decode(res.codebook, codes)     # (N, d)
    pq = product_quantize(x, k=16, subspaces=4)       # one vocabulary for the three quantizers (after faiss's
    rvq = residual_quantize(x, k=16, stages=2)        # ProductQuantizer(d, M, nbits) / ResidualQuantizer(d, M, nbits))

Conventions: a codebook is (K, d) float; `Codebook` (an nn.Module) holds G of them as one (G, K, d)
parameter (G = `codebook_groups`, consecutive blocks of a layer's output rows; never a convolution's groups).  distortion := mean over the N vectors of ||x - c||^2 / d, i.e. the per-weight mean squared
error.  Everything is deterministic under `seed` (a private torch.Generator; the global RNG is never
touched); the device follows `x`; fitting runs in float32 (float64 stays float64) and codebooks come
back in x's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .checks import check_fraction, check_int, check_number

__all__ = [
    "KMeansResult", "PQResult", "RVQResult", "Codebook",
    "kmeans", "assign", "decode", "product_quantize", "pq_decode", "residual_quantize", "rvq_decode",
    "fit_codebook", "fit_pruned_codebook", "prune_count", "check_prune", "HoldsCodebook",
]

# A distance chunk holds at most this many (row, codeword) entries (8 MiB in float32): small enough
# to stay in cache, large enough that the matmul is efficient (measured: 8192 rows x K=256 is best).
_DIST_BUDGET = 2**21
# k-means++ seeding runs on a random subsample of min(N, max(_PP_MIN, _PP_PER_CENTER * k)) points, so
# seeding 256 centers costs the same for N = 1e4 and N = 1e6; Lloyd then refines on all N points.
_PP_PER_CENTER = 20
_PP_MIN = 4096
# After the last iteration empty clusters are re-seeded and the points re-assigned, at most this often.
_POLISH_ROUNDS = 16


# ---------------------------------------------------------------- results

@dataclass
class KMeansResult:
    """Result of `kmeans`.

    codebook: (k, d) in x's dtype and device.  assignments: (N,) int64, each row's nearest codeword
    in `codebook`.  distortion: mean ||x - codebook[assignments]||^2 / d.  n_iter: iterations run
    (Lloyd steps, or passes over the data for mini-batch).  dead_reseeded: how many times an empty
    cluster's center was moved onto a badly served point.
    """

    codebook: torch.Tensor
    assignments: torch.Tensor
    distortion: float
    n_iter: int
    dead_reseeded: int


@dataclass
class PQResult:
    """Result of `product_quantize`: codebooks (M, k, D/M), codes (N, M) int64, distortion (per element)."""

    codebooks: torch.Tensor
    codes: torch.Tensor
    distortion: float


@dataclass
class RVQResult:
    """Result of `residual_quantize`: codebooks (S, k, d), codes (N, S) int64, distortion after all
    stages and after each stage (`distortion_per_stage[s]` = distortion using stages 0..s)."""

    codebooks: torch.Tensor
    codes: torch.Tensor
    distortion: float
    distortion_per_stage: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- helpers

def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is fitted in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N vectors, d dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one vector of at least one dim, got shape {tuple(x.shape)}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); clean or clip them first")


def _check_k(k, n: int) -> None:
    check_int("K", k, 2)
    if k > n:
        raise ValueError(f"K={k} is larger than the number of vectors N={n}; use K <= N")


def _rows_per_chunk(k: int, chunk: int) -> int:
    return max(1, min(chunk, _DIST_BUDGET // k))


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row.  x: (N, d), c: (k, d), same dtype.

    Returns (idx (N,) int64, sqdist (N,)) with sqdist = ||x - c[idx]||^2 computed exactly.  The search
    uses ||c||^2 - 2 x.c (one matmul per chunk of rows, never an (N, k) matrix); ties go to the lowest
    index.  That expansion is off by up to ~eps * (||x||^2 + ||c||^2), so rows whose chosen codeword is
    within that bound (e.g. a row with an exact copy among the codewords) are settled with exact
    differences: a codeword equal to a row is always found.
    """
    n, d = x.shape
    k = c.shape[0]
    rows = _rows_per_chunk(k, chunk)
    c_sq = (c * c).sum(1)                                              # (k,)
    ct = c.t()
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    val = torch.empty(n, dtype=x.dtype, device=x.device)
    buf = torch.empty(min(rows, n), k, dtype=x.dtype, device=x.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        b = torch.addmm(c_sq, x[s:e], ct, alpha=-2, out=buf[: e - s])  # ||c||^2 - 2 x.c
        torch.min(b, 1, out=(val[s:e], idx[s:e]))
    dist = ((x - c[idx]) ** 2).sum(1)                                  # (N,) exact
    bound = (2 * d + 8) * torch.finfo(x.dtype).eps * ((x * x).sum(1) + c_sq.max())
    unsure = ((dist > 0) & (dist <= bound)).nonzero().flatten()
    step = max(1, _DIST_BUDGET // (k * d))
    for s in range(0, len(unsure), step):
        r = unsure[s:s + step]
        exact = ((x[r, None, :] - c[None]) ** 2).sum(-1)               # (r, k)
        dist[r], idx[r] = exact.min(1)
    return idx, dist


def _cluster_sums(v: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """sums[j] = v[idx == j].sum(0).  v: (N, d), idx: (N,) -> (k, d).

    index_add_ is deterministic on CPU but uses atomics on CUDA, so there a one-hot matmul per chunk
    (deterministic, and cheap: N * k * d flops) does the sum instead.
    """
    out = torch.zeros(k, v.shape[1], dtype=v.dtype, device=v.device)
    if v.device.type == "cpu":
        return out.index_add_(0, idx, v)
    rows = _rows_per_chunk(k, 65536)
    codes = torch.arange(k, device=v.device)
    for s in range(0, v.shape[0], rows):
        onehot = (idx[s:s + rows, None] == codes).to(v.dtype)           # (rows, k)
        out.addmm_(onehot.t(), v[s:s + rows])
    return out


def _sample_weighted(w: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices drawn with replacement with probability proportional to w >= 0 (uniform if w == 0).

    Inverse-CDF sampling with uniforms from the CPU generator: same draws on every device, no sync.
    """
    cdf = torch.cumsum(w.double(), 0)
    u = torch.rand(n, generator=gen, dtype=torch.float64).to(w.device)
    picked = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max_(len(w) - 1)
    uniform = (u * len(w)).long().clamp_max_(len(w) - 1)
    return torch.where(cdf[-1] > 0, picked, uniform)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; greedy trials as in scikit-learn).

    Runs on a random subsample of min(N, max(4096, 20 k)) rows.  Each step draws 2 + ln k candidates
    with probability proportional to D(x)^2, the squared distance to the nearest chosen center, and
    keeps the one that lowers the total potential most.  x: (N, d) -> centers (k, d), rows of x.
    """
    n = x.shape[0]
    m = min(n, max(_PP_MIN, _PP_PER_CENTER * k))
    xs = x if m == n else x[torch.randperm(n, generator=gen)[:m].to(x.device)]
    trials = 2 + int(math.log(k))
    xs_sq = (xs * xs).sum(1)                                           # (m,)
    first = torch.randint(m, (1,), generator=gen).to(x.device)
    chosen = [first]
    pot = ((xs - xs[first]) ** 2).sum(1)                               # (m,) D^2
    for _ in range(1, k):
        cand = _sample_weighted(pot, trials, gen)                      # (trials,)
        c = xs[cand]                                                   # (trials, d)
        d2 = (xs_sq[:, None] - 2 * xs @ c.t() + xs_sq[cand][None]).clamp_min_(0)  # (m, trials)
        d2 = torch.minimum(d2, pot[:, None])
        best = d2.sum(0).argmin()
        chosen.append(cand[best].reshape(1))
        pot = d2[:, best]
    return xs[torch.cat(chosen)].clone()


def _init_centers(x: torch.Tensor, k: int, init, gen: torch.Generator) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init tensor must have shape (K, d) = {(k, x.shape[1])}, got {tuple(init.shape)}")
        if not torch.isfinite(init).all():
            raise ValueError("init tensor contains non-finite values (NaN or inf)")
        return init.detach().to(device=x.device, dtype=x.dtype).clone()
    if init == "kmeans++":
        return _kmeanspp(x, k, gen)
    if init == "random":
        return x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    raise ValueError(f"init must be 'kmeans++', 'random' or a (K, d) tensor, got init={init!r}")


def _reseed(x: torch.Tensor, c: torch.Tensor, dead: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Move the centers `dead` (int64 ids) onto badly served rows of x, in place on c.

    dist: (n,) each row's exact squared error (from `_nearest`).  Farthest-point style: among the
    max(1024, 32 * len(dead)) worst rows, take the worst, treat it as served by its new center,
    take the worst again, ...; so several dead centers do not all land in the same far-off blob.
    Rows already on a center (error 0) are never used.  Returns the ids actually re-seeded.
    """
    pool = torch.topk(dist, min(len(dist), max(1024, 32 * len(dead)))).indices
    xp = x[pool]                                                       # (p, d)
    err = dist[pool]                                                   # (p,)
    picks = []
    for _ in range(len(dead)):
        j = int(err.argmax())
        if not err[j] > 0:
            break
        picks.append(j)
        err = torch.minimum(err, ((xp - xp[j]) ** 2).sum(1))
    dead = dead[: len(picks)]
    c[dead] = xp[picks]
    return dead


def _polish(x: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """Final assignment; while clusters are empty and some point is not on its center, move an
    empty center onto the worst point and assign again (each round can only lower the distortion)."""
    total = 0
    for _ in range(_POLISH_ROUNDS):
        idx, dist = _nearest(x, c, chunk)
        dead = (torch.bincount(idx, minlength=len(c)) == 0).nonzero().flatten()
        if len(dead) == 0:
            break
        moved = len(_reseed(x, c, dead, dist))
        if moved == 0:
            break
        total += moved
    else:
        idx, _ = _nearest(x, c, chunk)
    return idx, total


def _distortion(x: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> float:
    """Exact mean ||x - c[idx]||^2 / d (no expansion, so it is 0.0 when every row is a codeword)."""
    return float(((x - c[idx]) ** 2).mean())


def _converged(prev: float, cur: float, tol: float) -> bool:
    return math.isfinite(prev) and prev - cur <= tol * prev


# ---------------------------------------------------------------- core: Lloyd and mini-batch


def _end_iteration(bar, prev: float, cur: float, moved: int, tol: float) -> bool:
    """Show the distortion on the progress bar; True when converged (and nothing was re-seeded)."""
    bar.update(1)
    bar.set_postfix(distortion=f"{cur:.4g}", refresh=False)
    return moved == 0 and _converged(prev, cur, tol)


def _lloyd(x, c, iters, tol, chunk, bar) -> tuple[int, int]:
    """Lloyd iterations on all points, in place on c.  Returns (n_iter, dead_reseeded)."""
    n, d = x.shape
    k = len(c)
    prev, reseeded, it = math.inf, 0, 0
    for it in range(1, iters + 1):
        idx, dist = _nearest(x, c, chunk)
        counts = torch.bincount(idx, minlength=k)
        # c + mean(x - c) rather than mean(x): a center whose points all equal it stays bit-exact
        delta = _cluster_sums(x - c[idx], idx, k)
        dead = (counts == 0).nonzero().flatten()
        moved = len(_reseed(x, c, dead, dist)) if len(dead) else 0   # dead rows get delta 0
        c += delta / counts.clamp_min(1).to(c.dtype)[:, None]
        reseeded += moved
        cur = float(dist.sum()) / (n * d)
        if _end_iteration(bar, prev, cur, moved, tol):
            break
        prev = cur
    return it, reseeded


def _minibatch(x, c, iters, tol, batch_size, chunk, gen, bar) -> tuple[int, int]:
    """Mini-batch k-means (Sculley 2010), in place on c.  Returns (n_iter, dead_reseeded).

    One iteration = one pass over a fresh random permutation in batches of `batch_size`.  Center j
    moves towards each of its points with learning rate 1 / (points it has seen so far), i.e. it is
    the running mean of its points; for a batch this is c += sum(x - c) / v_new.  Centers that got
    no point in a pass are re-seeded onto the worst-served points of a random sample.
    """
    n, d = x.shape
    k = len(c)
    seen = torch.zeros(k, dtype=torch.long, device=x.device)           # Sculley's per-center counts v
    prev, reseeded, it = math.inf, 0, 0
    for it in range(1, iters + 1):
        perm = torch.randperm(n, generator=gen).to(x.device)
        hits = torch.zeros(k, dtype=torch.long, device=x.device)
        err = torch.zeros((), dtype=x.dtype, device=x.device)
        for s in range(0, n, batch_size):
            xb = x[perm[s:s + batch_size]]                             # (b, d)
            idx, dist = _nearest(xb, c, chunk)
            nb = torch.bincount(idx, minlength=k)
            seen += nb
            hits += nb
            c += _cluster_sums(xb - c[idx], idx, k) / seen.clamp_min(1).to(c.dtype)[:, None]
            err += dist.sum()
        dead = (hits == 0).nonzero().flatten()
        moved = 0
        if len(dead):
            sample = x[torch.randperm(n, generator=gen)[: max(batch_size, 16 * len(dead))].to(x.device)]
            _, dist = _nearest(sample, c, chunk)
            got = _reseed(sample, c, dead, dist)
            seen[got] = 1
            moved = len(got)
        reseeded += moved
        cur = float(err) / (n * d)
        if _end_iteration(bar, prev, cur, moved, tol):
            break
        prev = cur
    return it, reseeded


# ---------------------------------------------------------------- public functions

def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, init: str | torch.Tensor = "kmeans++",
           batch_size: int | None = None, seed: int = 0, tol: float = 1e-4, progress: bool = False,
           chunk: int = 65536, distributed: bool = False) -> KMeansResult:
    """Fit a k-entry codebook to the rows of x.

    x: (N, d) float tensor (any float dtype; fitted in float32, float64 stays float64); device follows x.
    k: codewords K, 2 <= K <= N.
    iters: at most this many Lloyd iterations; with `batch_size`, passes over the data.
    init: "kmeans++" (greedy k-means++ on a subsample of min(N, max(4096, 20 K)) rows), "random"
        (K distinct rows of x) or a (K, d) tensor of starting centers.
    batch_size: None = Lloyd on all points; an int = mini-batch k-means with batches of that size.
    seed: seeds a private torch.Generator; same seed, same input -> bitwise the same result.
    tol: stop once an iteration lowers the distortion by less than tol (relative) and no empty
        cluster had to be re-seeded.
    progress: show a tqdm bar.  chunk: rows per distance block (also capped at 2^21 / K).
    distributed: x is this rank's shard of the data under torch.distributed (torchrun); call on every rank
        with the same k, init, seed, ...  The centers start from rank 0 (k-means++ / random on a sample
        gathered from all ranks, or rank 0's `init` tensor) and are broadcast; each Lloyd iteration
        all-reduces the cluster sums and counts, and empty clusters are re-seeded from the globally
        worst-served rows, so the result is single-process k-means on the concatenated shards (to
        float summation order).  Every rank gets the same codebook, distortion and n_iter;
        `assignments` are those of its own shard.  Lloyd only (batch_size must be None).  In a single
        process it is plain k-means.

    Empty clusters are re-seeded every iteration onto the points with the largest error, and once
    more after the last one, so when x has at least K distinct rows every codeword is used; with
    K >= the number of distinct rows the codebook holds each of them exactly (distortion 0).
    Returns KMeansResult; `assignments` are the nearest codewords of the returned (rounded) codebook.

    Example:
        >>> res = kmeans(torch.randn(10_000, 4), 16, seed=0)
        >>> res.codebook.shape, res.assignments.shape
        (torch.Size([16, 4]), torch.Size([10000]))
    """
    if distributed:
        if _dist.init():
            return _kmeans_distributed(x, k, iters=iters, init=init, batch_size=batch_size, seed=seed, tol=tol,
                                       progress=progress, chunk=chunk)
    _check_x(x)
    n = x.shape[0]
    _check_k(k, n)
    check_int("iters", iters, 1)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)
    check_int("chunk", chunk, 1)
    check_number("tol", tol, 0)
    if not (isinstance(init, torch.Tensor) or init in ("kmeans++", "random")):
        raise ValueError(f"init must be 'kmeans++', 'random' or a (K, d) tensor, got init={init!r}")

    gen = torch.Generator().manual_seed(seed)
    xw = x.detach().to(_work_dtype(x.dtype)).contiguous()               # (N, d)
    c = _init_centers(xw, k, init, gen)                                 # (k, d)
    with tqdm(total=iters, desc=f"k-means K={k}", disable=not _dist.show_progress(progress), leave=False) as bar:
        if batch_size is None:
            n_iter, reseeded = _lloyd(xw, c, iters, tol, chunk, bar)
        else:
            n_iter, reseeded = _minibatch(xw, c, iters, tol, batch_size, chunk, gen, bar)
    c = c.to(x.dtype).to(xw.dtype)                                      # assign against what we return
    idx, moved = _polish(xw, c, chunk)
    return KMeansResult(codebook=c.to(x.dtype), assignments=idx, distortion=_distortion(xw, c, idx),
                        n_iter=n_iter, dead_reseeded=reseeded + moved)


# ---------------------------------------------------------------- k-means over torch.distributed shards

def _kmeans_distributed(x: torch.Tensor, k: int, *, iters: int, init, batch_size, seed: int, tol: float,
                        progress: bool, chunk: int) -> KMeansResult:
    """`kmeans(..., distributed=True)` with more than one process: x (N_r, d) is this rank's shard."""
    rank = _dist.rank()
    problem = None
    try:                                   # every rank checks; all raise together (no rank left waiting)
        _check_x(x)
        check_int("iters", iters, 1)
        check_int("chunk", chunk, 1)
        if batch_size is not None:
            raise ValueError("distributed k-means runs Lloyd iterations on all points: batch_size must be None")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got tol={tol!r}")
        if isinstance(init, torch.Tensor):
            if init.shape != (k, x.shape[1]):
                raise ValueError(f"init tensor must have shape (K, d) = {(k, x.shape[1])}, got {tuple(init.shape)}")
            if not torch.isfinite(init).all():
                raise ValueError("init tensor contains non-finite values (NaN or inf)")
        elif init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++', 'random' or a (K, d) tensor, got init={init!r}")
    except (TypeError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    shapes = _dist.all_gather_objects((problem, tuple(x.shape) if isinstance(x, torch.Tensor) else None))
    for r, (msg, _) in enumerate(shapes):
        if msg is not None:
            raise ValueError(f"distributed k-means, rank {r}: {msg}")
    dims = {shape[1] for _, shape in shapes}
    if len(dims) != 1:
        raise ValueError(f"distributed k-means: the ranks' shards have different d: {[s for _, s in shapes]}")
    sizes = [shape[0] for _, shape in shapes]
    n, d = sum(sizes), dims.pop()
    _check_k(k, n)

    gen = torch.Generator().manual_seed(seed)
    xw = x.detach().to(_work_dtype(x.dtype)).contiguous()               # (N_r, d)
    c = _dist_init_centers(xw, k, init, gen, sizes, seed)               # (k, d), the same on every rank
    bar = tqdm(total=iters, desc=f"k-means K={k} x{len(sizes)} ranks", disable=not progress or rank != 0, leave=False)
    with bar:
        prev, reseeded, it = math.inf, 0, 0
        for it in range(1, iters + 1):
            idx, dist = _nearest(xw, c, chunk)
            counts = _dist.all_reduce_sum(torch.bincount(idx, minlength=k))
            delta = _cluster_sums(xw - c[idx], idx, k)                  # c + mean(x - c), as `_lloyd`
            sums = _dist.all_reduce_sum(torch.cat([delta.flatten(), dist.sum().reshape(1)]))
            delta, err = sums[:-1].reshape(k, d), sums[-1]
            dead = (counts == 0).nonzero().flatten()
            moved = _dist_reseed(xw, c, dead, dist, n) if len(dead) else 0
            c += delta / counts.clamp_min(1).to(c.dtype)[:, None]
            _dist.broadcast(c)                                          # rank 0's centers, bit for bit
            reseeded += moved
            cur = float(err) / (n * d)
            if _end_iteration(bar, prev, cur, moved, tol):
                break
            prev = cur
    c = c.to(x.dtype).to(xw.dtype)
    total = 0
    for _ in range(_POLISH_ROUNDS):                                     # `_polish` over all shards
        idx, dist = _nearest(xw, c, chunk)
        dead = (_dist.all_reduce_sum(torch.bincount(idx, minlength=k)) == 0).nonzero().flatten()
        if len(dead) == 0:
            break
        moved = _dist_reseed(xw, c, dead, dist, n)
        _dist.broadcast(c)
        if moved == 0:
            break
        total += moved
    else:
        idx, _ = _nearest(xw, c, chunk)
    err = _dist.all_reduce_sum(((xw - c[idx]) ** 2).sum().reshape(1).double())
    return KMeansResult(codebook=c.to(x.dtype), assignments=idx, distortion=float(err) / (n * d), n_iter=it,
                        dead_reseeded=reseeded + total)


def _dist_init_centers(xw: torch.Tensor, k: int, init, gen: torch.Generator, sizes: list[int],
                       seed: int) -> torch.Tensor:
    """Starting centers (k, d) on every rank: rank 0's `init` tensor, or k-means++ / random rows that rank 0
    draws from a sample gathered over the ranks (each rank sends its share of min(N, max(4096, 20 K))
    random rows, in proportion to its shard), broadcast from rank 0."""
    rank, n, d = _dist.rank(), sum(sizes), xw.shape[1]
    c = torch.empty(k, d, dtype=xw.dtype, device=xw.device)
    if isinstance(init, torch.Tensor):
        if rank == 0:                                                   # checked on every rank already
            c.copy_(init.detach())
        return _dist.broadcast(c)
    m = min(n, max(_PP_MIN, _PP_PER_CENTER * k))
    share = min(sizes[rank], -(-m * sizes[rank] // n))
    local_gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    pick = torch.randperm(sizes[rank], generator=local_gen)[:share].to(xw.device)
    samples = _dist.all_gather_objects(xw[pick].cpu())
    if rank == 0:
        sample = torch.cat(samples).to(device=xw.device)
        c.copy_(_init_centers(sample, k, init, gen))
    return _dist.broadcast(c)


def _dist_reseed(xw: torch.Tensor, c: torch.Tensor, dead: torch.Tensor, dist: torch.Tensor, n: int) -> int:
    """`_reseed` over all ranks: each rank offers its worst-served rows, every rank picks from the union
    (the global worst rows, as one process would), in place on c.  Returns how many centers moved."""
    p = min(n, max(1024, 32 * len(dead)))
    top = torch.topk(dist, min(len(dist), p))
    offers = _dist.all_gather_objects((top.values.cpu(), xw[top.indices].cpu()))
    err = torch.cat([v for v, _ in offers]).to(dist.device)
    rows = torch.cat([r for _, r in offers]).to(xw.device)
    best = torch.topk(err, min(len(err), p)).indices
    return len(_reseed(rows[best], c, dead, err[best]))


def assign(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest codeword (squared Euclidean) for every row; ties go to the lowest index.

    x: (N, d); codebook: (K, d); chunk: rows per distance block (never an (N, K) matrix in memory).
    Returns (N,) int64 on x's device.  Computed in float32 (float64 if either input is float64).
    """
    _check_x(x)
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise ValueError(f"codebook must be a (K, d) tensor, got {shape}")
    if codebook.shape[1] != x.shape[1]:
        raise ValueError(f"codebook has d={codebook.shape[1]} but x has d={x.shape[1]} columns")
    check_int("chunk", chunk, 1)
    work = torch.promote_types(_work_dtype(x.dtype), _work_dtype(codebook.dtype))
    c = codebook.detach().to(device=x.device, dtype=work)
    return _nearest(x.detach().to(work).contiguous(), c, chunk)[0]


def decode(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Look codes up: codebook (K, d), codes (...) integer -> (..., d)."""
    return codebook[codes.long()]


def product_quantize(x: torch.Tensor, k: int, subspaces: int, *, iters: int = 25, init: str = "kmeans++",
                     batch_size: int | None = None, seed: int = 0, tol: float = 1e-4,
                     progress: bool = False) -> PQResult:
    """Product quantization (Jegou et al. 2011): split the D columns into M = `subspaces` equal subspaces and
    run k-means with k codewords in each (subspace m uses seed + m).

    x: (N, D); subspaces M must divide D.  Returns PQResult with codebooks (M, k, D/M) in x's dtype,
    codes (N, M) int64 and distortion = mean ||x - pq_decode(...)||^2 / D.
    With M = 1 this is exactly `kmeans(x, k, ...)`.
    """
    _check_x(x)
    check_int("subspaces", subspaces, 1)
    dim = x.shape[1]
    if dim % subspaces:
        raise ValueError(f"subspaces M={subspaces} must divide the vector length D={dim}")
    ds = dim // subspaces
    books, codes, err = [], [], 0.0
    for m in tqdm(range(subspaces), desc="PQ subspaces", disable=not _dist.show_progress(progress), leave=False):
        res = kmeans(x[:, m * ds:(m + 1) * ds], k, iters=iters, init=init, batch_size=batch_size,
                     seed=seed + m, tol=tol)
        books.append(res.codebook)
        codes.append(res.assignments)
        err += res.distortion
    return PQResult(codebooks=torch.stack(books), codes=torch.stack(codes, 1), distortion=err / subspaces)


def pq_decode(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rebuild vectors from product codes.  codebooks (M, k, D/M), codes (N, M) -> (N, D)."""
    m = codebooks.shape[0]
    if codes.dim() != 2 or codes.shape[1] != m:
        raise ValueError(f"codes must be (N, M={m}) for {m} subspace codebooks, got shape {tuple(codes.shape)}")
    sub = torch.arange(m, device=codes.device)
    return codebooks[sub, codes.long()].reshape(codes.shape[0], -1)      # (N, M, D/M) -> (N, D)


def residual_quantize(x: torch.Tensor, k: int, stages: int, *, iters: int = 25, init: str = "kmeans++",
                      batch_size: int | None = None, seed: int = 0, tol: float = 1e-4,
                      progress: bool = False) -> RVQResult:
    """Residual VQ over `stages` stages of k codewords: stage s runs k-means (seed + s) on what stages 0..s-1
    left over, x - sum of codewords.

    x: (N, d).  Returns RVQResult with codebooks (S, k, d) in x's dtype, codes (N, S) int64,
    distortion = mean ||x - rvq_decode(...)||^2 / d and the distortion after each stage (non-increasing:
    each stage's centers are cluster means, which never serve a cluster worse than the zero vector).
    """
    _check_x(x)
    check_int("stages", stages, 1)
    resid = x.detach().to(_work_dtype(x.dtype))                          # (N, d)
    books, codes, per_stage = [], [], []
    for s in tqdm(range(stages), desc="RVQ stages", disable=not _dist.show_progress(progress), leave=False):
        res = kmeans(resid, k, iters=iters, init=init, batch_size=batch_size, seed=seed + s, tol=tol)
        book = res.codebook.to(x.dtype)
        resid = resid - book.to(resid.dtype)[res.assignments]
        books.append(book)
        codes.append(res.assignments)
        per_stage.append(float((resid * resid).mean()))
    return RVQResult(codebooks=torch.stack(books), codes=torch.stack(codes, 1), distortion=per_stage[-1],
                     distortion_per_stage=per_stage)


def rvq_decode(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen codeword of every stage.  codebooks (S, k, d), codes (N, S) -> (N, d)."""
    s = codebooks.shape[0]
    if codes.dim() != 2 or codes.shape[1] != s:
        raise ValueError(f"codes must be (N, S={s}) for {s} stage codebooks, got shape {tuple(codes.shape)}")
    return codebooks[torch.arange(s, device=codes.device), codes.long()].sum(1)   # (N, S, d) -> (N, d)


# ---------------------------------------------------------------- the module a VQ layer holds

class Codebook(nn.Module):
    """G codebooks of K codewords of length d, as one parameter `weight`: (G, K, d), G = `codebook_groups`.

    A VQ layer holds one; several layers — also of different models — may hold the same object (a shared
    codebook, stored once).  Gradients reaching `weight` are the sums over the segments that use each codeword.
    frozen=True (or `freeze()`) makes `weight` require no gradient, so `vqlab.fit` never updates it (a
    universal codebook shared by several networks).
    """

    def __init__(self, k: int, d: int, codebook_groups: int = 1, *, frozen: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_int("K", k, 2)
        check_int("d", d, 1)
        check_int("codebook_groups", codebook_groups, 1)
        self.weight = nn.Parameter(torch.zeros(codebook_groups, k, d, device=device, dtype=dtype or torch.float32),
                                   requires_grad=not frozen)

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def freeze(self) -> "Codebook":
        """Stop training this codebook (returns self)."""
        self.weight.requires_grad_(False)
        return self

    @classmethod
    def from_tensor(cls, t: torch.Tensor, frozen: bool = False) -> "Codebook":
        """Build from a (K, d) or (G, K, d) float tensor (copied, detached)."""
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"Codebook.from_tensor needs a (K, d) or (G, K, d) tensor, got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"Codebook.from_tensor needs a float tensor, got dtype {t.dtype}")
        t = t.detach()
        t = t[None] if t.dim() == 2 else t
        book = cls(t.shape[1], t.shape[2], t.shape[0], frozen=frozen, device=t.device, dtype=t.dtype)
        with torch.no_grad():
            book.weight.copy_(t)
        return book

    def config(self) -> dict:
        """The constructor arguments as JSON data (what a vqlab file records)."""
        return {"k": self.k, "d": self.d, "codebook_groups": self.codebook_groups, "frozen": self.frozen,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def d(self) -> int:
        return self.weight.shape[2]

    @property
    def codebook_groups(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"codebook_groups={self.codebook_groups}, K={self.k}, d={self.d}, dtype={self.weight.dtype}"
                + (", frozen" if self.frozen else ""))


class HoldsCodebook:
    """Mixin: K, d and the codebook groups of the `Codebook` an object holds as `self.codebook`."""

    codebook: Codebook

    @property
    def k(self) -> int:
        return self.codebook.k

    @property
    def d(self) -> int:
        return self.codebook.d

    @property
    def codebook_groups(self) -> int:
        return self.codebook.codebook_groups


# ---------------------------------------------------------------- fitting one layer's codebooks

def check_prune(prune, label: str = "layer") -> float:
    """`prune` as a float; ValueError naming `label`, `prune` and the value unless it is a number in [0, 1)."""
    try:
        return check_fraction("prune", prune)
    except ValueError:
        raise ValueError(f"{label}: prune must be a number in [0, 1) (the fraction of segments pinned to the zero "
                         f"codeword; 0 = no pruning), got prune={prune!r}") from None


def prune_count(segments: int, prune: float) -> int:
    """How many of a codebook group's `segments` are pruned: floor(prune * segments + 1/2) (round half up)."""
    return math.floor(prune * segments + 0.5)


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
