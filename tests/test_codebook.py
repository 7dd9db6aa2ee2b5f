"""vqlab.codebook: k-means(++), mini-batch, dead clusters, PQ, residual VQ, assign, Codebook."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqlab.codebook import (Codebook, assign, decode, kmeans, pq_decode, product_quantize, residual_quantize,
                            rvq_decode)


def blobs(n: int, d: int, centers: int, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    """n points around `centers` random centers in [-3, 3]^d, Gaussian noise of std `spread`: (n, d)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(centers, d, generator=g) * 6 - 3
    which = torch.randint(centers, (n,), generator=g)
    return mu[which] + spread * torch.randn(n, d, generator=g)


def brute_assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :].double() - c[None].double()) ** 2).sum(-1).argmin(1)


# ---------------------------------------------------------------- kmeans: the basic contract

@pytest.mark.parametrize("batch_size", [None, 256])
def test_distortion_is_mean_squared_error_to_returned_centers(batch_size):
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1))
    res = kmeans(x, 32, iters=10, batch_size=batch_size, seed=3)
    assert res.codebook.shape == (32, 4) and res.codebook.dtype == x.dtype
    assert res.assignments.shape == (3000,) and res.assignments.dtype == torch.int64
    mse = ((x.double() - res.codebook.double()[res.assignments]) ** 2).mean().item()
    assert res.distortion == pytest.approx(mse, rel=1e-5)
    # assignments are the nearest codewords of the returned codebook
    assert torch.equal(res.assignments, assign(x, res.codebook))
    assert 1 <= res.n_iter <= 10


@pytest.mark.parametrize("init,batch_size", [("kmeans++", None), ("random", None), ("kmeans++", 128)])
def test_deterministic_under_seed(init, batch_size):
    x = blobs(2000, 3, 10, spread=0.3)
    a = kmeans(x, 16, init=init, batch_size=batch_size, seed=7)
    b = kmeans(x, 16, init=init, batch_size=batch_size, seed=7)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.assignments, b.assignments)
    assert (a.distortion, a.n_iter, a.dead_reseeded) == (b.distortion, b.n_iter, b.dead_reseeded)
    c = kmeans(x, 16, init=init, batch_size=batch_size, seed=8)
    assert not torch.equal(a.codebook, c.codebook)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kmeans(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)), 8, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_kmeanspp_beats_random_init_on_clusters():
    # 20 tight, well separated blobs and K=20: k-means++ finds (nearly) all of them, random init merges some
    x = blobs(4000, 2, 20, spread=0.05, seed=2)
    pp = kmeans(x, 20, init="kmeans++", iters=3, seed=0)
    rnd = kmeans(x, 20, init="random", iters=3, seed=0)
    assert pp.distortion <= rnd.distortion
    assert pp.distortion < 0.01                                        # noise variance is 0.0025


def test_minibatch_within_10_percent_of_lloyd():
    x = blobs(20000, 4, 64, spread=0.4, seed=3)
    lloyd = kmeans(x, 64, iters=25, seed=0)
    mini = kmeans(x, 64, iters=10, batch_size=1024, seed=0)
    assert mini.distortion <= 1.10 * lloyd.distortion


def test_distortion_falls_as_k_grows():
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(4))
    dist = [kmeans(x, k, iters=15, seed=0).distortion for k in (2, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(dist, dist[1:])), dist


# ---------------------------------------------------------------- dead clusters and exact reproduction

def test_dead_clusters_from_duplicated_init_are_reseeded():
    x = blobs(1000, 3, 8, spread=0.1, seed=5)
    init = x[:1].repeat(8, 1)                                          # 8 identical centers: 7 start empty
    res = kmeans(x, 8, init=init, iters=20, seed=0)
    assert res.dead_reseeded >= 7
    assert torch.bincount(res.assignments, minlength=8).min() > 0
    assert res.distortion < 0.02                                       # found the 8 blobs (noise var 0.01)


@pytest.mark.parametrize("batch_size", [None, 64])
def test_no_empty_cluster_when_k_equals_distinct_points(batch_size):
    # 12 distinct rows, most of them the same row: random init draws duplicates, yet every codeword ends used
    g = torch.Generator().manual_seed(6)
    distinct = torch.randn(12, 2, generator=g)
    which = torch.cat([torch.arange(12), torch.zeros(300, dtype=torch.long)])
    x = distinct[which]
    res = kmeans(x, 12, init="random", iters=5, batch_size=batch_size, seed=0)
    assert res.dead_reseeded > 0
    assert torch.bincount(res.assignments, minlength=12).min() > 0
    if batch_size is None:                                             # mini-batch centers are running means
        assert res.distortion == 0.0


@settings(max_examples=15, deadline=None)
@given(n_distinct=st.integers(2, 24), extra_k=st.integers(0, 8), d=st.integers(1, 5), copies=st.integers(1, 4),
       init=st.sampled_from(["kmeans++", "random"]), seed=st.integers(0, 2**16))
def test_k_at_least_distinct_points_reproduces_data_exactly(n_distinct, extra_k, d, copies, init, seed):
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randn(n_distinct, d, generator=g)
    x = distinct.repeat(copies, 1)[torch.randperm(n_distinct * copies, generator=g)]
    k = min(n_distinct + extra_k, len(x))
    res = kmeans(x, k, init=init, iters=25, seed=seed)
    assert res.distortion == 0.0
    assert torch.equal(res.codebook[res.assignments], x)


def test_half_input_gives_half_codebook_and_consistent_distortion():
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(7)).half()
    res = kmeans(x, 16, iters=10, seed=0)
    assert res.codebook.dtype == torch.float16
    mse = ((x.float() - res.codebook.float()[res.assignments]) ** 2).mean().item()
    assert res.distortion == pytest.approx(mse, rel=1e-6)


# ---------------------------------------------------------------- assign / decode

@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_assign_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(8)
    x, c = torch.randn(500, 6, generator=g, dtype=torch.float64), torch.randn(33, 6, generator=g, dtype=torch.float64)
    assert torch.equal(assign(x, c, chunk=chunk), brute_assign(x, c))
    assert torch.equal(decode(c, assign(x, c)), c[brute_assign(x, c)])


def test_assign_finds_exact_copies_far_from_the_origin():
    # codewords 1000 + 1e-3 i: ||x||^2 - 2 x.c + ||c||^2 alone cannot tell neighbours apart in float32
    c = (1000 + 1e-3 * torch.arange(64.0))[:, None]                   # (64, 1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(assign(c[perm], c), perm)
    res = kmeans(c[perm].repeat(3, 1), 64, seed=0)
    assert res.distortion == 0.0 and torch.equal(res.codebook[res.assignments], c[perm].repeat(3, 1))


def test_assign_ties_go_to_lowest_index():
    c = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert assign(torch.zeros(4, 2), c).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- product and residual quantization

def test_pq_shapes_and_decode():
    x = torch.randn(1500, 8, generator=torch.Generator().manual_seed(9))
    res = product_quantize(x, 16, 4, iters=10, seed=0)
    assert res.codebooks.shape == (4, 16, 2) and res.codes.shape == (1500, 4) and res.codes.dtype == torch.int64
    x_hat = pq_decode(res.codebooks, res.codes)
    assert x_hat.shape == x.shape
    assert res.distortion == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-5)
    assert torch.equal(x_hat[:, 2:4], decode(res.codebooks[1], res.codes[:, 1]))


def test_pq_with_one_subspace_is_kmeans():
    x = blobs(1000, 4, 6, spread=0.3, seed=10)
    pq = product_quantize(x, 8, 1, iters=10, seed=5)
    km = kmeans(x, 8, iters=10, seed=5)
    assert torch.equal(pq.codebooks[0], km.codebook) and torch.equal(pq.codes[:, 0], km.assignments)
    assert pq.distortion == km.distortion


def test_rvq_distortion_per_stage_non_increasing_and_decode():
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(11))
    res = residual_quantize(x, 16, 4, iters=10, seed=0)
    assert res.codebooks.shape == (4, 16, 4) and res.codes.shape == (2000, 4)
    per = res.distortion_per_stage
    assert len(per) == 4 and all(b <= a for a, b in zip(per, per[1:])) and per[-1] < 0.5 * per[0]
    assert per[0] == pytest.approx(kmeans(x, 16, iters=10, seed=0).distortion, rel=1e-6)
    x_hat = rvq_decode(res.codebooks, res.codes)
    assert x_hat.shape == x.shape
    assert res.distortion == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-4)


# ---------------------------------------------------------------- Codebook module

def test_codebook_module():
    t = torch.randn(16, 4)
    book = Codebook.from_tensor(t)
    assert isinstance(book.weight, torch.nn.Parameter) and book.weight.shape == (1, 16, 4)
    assert (book.k, book.d, book.codebook_groups) == (16, 4, 1)
    assert torch.equal(book.weight[0], t) and book.weight.data_ptr() != t.data_ptr()
    g = Codebook.from_tensor(torch.randn(3, 8, 2, dtype=torch.float64))
    assert (g.k, g.d, g.codebook_groups, g.weight.dtype) == (8, 2, 3, torch.float64)
    assert repr(g) == "Codebook(codebook_groups=3, K=8, d=2, dtype=torch.float64)"
    assert Codebook(256, 4).weight.shape == (1, 256, 4)


# ---------------------------------------------------------------- errors name the bad value

@pytest.mark.parametrize("call,exc,match", [
    (lambda x: kmeans(x, 1), ValueError, r"K must be an integer >= 2, got 1"),
    (lambda x: kmeans(x, 101), ValueError, r"K=101 .* N=100"),
    (lambda x: kmeans(x[:, 0], 4), ValueError, r"2-D .* got shape \(100,\)"),
    (lambda x: kmeans(x[None], 4), ValueError, r"2-D .* got shape \(1, 100, 3\)"),
    (lambda x: kmeans(x.long(), 4), TypeError, r"float tensor, got dtype torch.int64"),
    (lambda x: kmeans(torch.cat([x, torch.tensor([[float("nan"), 0, float("inf")]])]), 4), ValueError,
     r"2 non-finite values"),
    (lambda x: kmeans(x, 4, init="kmeans||"), ValueError, r"init must be .* got init='kmeans\|\|'"),
    (lambda x: kmeans(x, 4, init=torch.zeros(3, 3)), ValueError, r"shape \(K, d\) = \(4, 3\), got \(3, 3\)"),
    (lambda x: kmeans(x, 4, iters=0), ValueError, r"iters must be an integer >= 1, got 0"),
    (lambda x: kmeans(x, 4, batch_size=0), ValueError, r"batch_size must be an integer >= 1, got 0"),
    (lambda x: assign(x, torch.zeros(4, 2)), ValueError, r"codebook has d=2 but x has d=3"),
    (lambda x: product_quantize(x, 4, 2), ValueError, r"M=2 must divide .* D=3"),
    (lambda x: residual_quantize(x, 4, 0), ValueError, r"stages must be an integer >= 1, got 0"),
    (lambda x: Codebook.from_tensor(torch.zeros(4)), ValueError, r"\(K, d\) or \(G, K, d\) tensor, got \(4,\)"),
    (lambda x: Codebook.from_tensor(torch.zeros(1, 3)), ValueError, r"K must be an integer >= 2, got 1"),
])
def test_errors(call, exc, match):
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(exc, match=match):
        call(x)
