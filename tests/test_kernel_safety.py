"""Indices are checked on every backend, results are never stale or aliased, FLOPs have one formula.

Each test reproduces a crash or silent wrong answer found on main (../shared/notes/reliability.md)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vqlab.kernels as ops
from vqlab import VQConv2d, VQLinear
from vqlab.flops import count_flops
from vqlab.kernels import available_backends, dequantize, vq_conv2d, vq_matmul

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _fresh_caches():
    ops.clear_caches()
    yield
    ops.clear_caches()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_index_raises_instead_of_crashing(backend):
    with pytest.raises(ValueError, match=r"values in \[1073741824, 1073741824\] .* K=16 .* \[0, 15\]"):
        vq_matmul(torch.randn(2, 64), torch.randn(16, 4), torch.full((8, 16), 2**30, dtype=torch.int32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_byte_index_above_k_raises(backend):
    idx = torch.zeros(8, 16, dtype=torch.uint8)
    idx[3, 5] = 200
    with pytest.raises(ValueError, match=r"\[0, 200\] but the codebook has K=16"):
        vq_matmul(torch.randn(2, 64), torch.randn(16, 4), idx, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 200\] but the codebook has K=16"):
        vq_conv2d(torch.randn(1, 16, 5, 5), torch.randn(16, 4), idx[:, 2:6], (8, 16, 1, 1), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_and_signed_indices_are_refused_on_every_backend(backend):
    g = torch.Generator().manual_seed(0)
    book = torch.randn(200, 4, generator=g)
    idx = torch.randint(0, 200, (8, 16), generator=g, dtype=torch.int64)
    idx[0, 0] = -1                                       # torch wrapped this to K-1, numba read padding
    with pytest.raises(ValueError, match=r"\[-1, \d+\] but the codebook has K=200"):
        vq_matmul(torch.randn(2, 64), book, idx, backend=backend)
    u8 = torch.randint(0, 200, (8, 16), generator=g).to(torch.uint8)
    u8[0, 0] = 199
    with pytest.raises(ValueError, match="K=200"):       # bytes 128..199 read as int8 are negative
        vq_matmul(torch.randn(2, 64), book, u8.view(torch.int8), backend=backend)
    i16 = torch.full((4, 2), 39999, dtype=torch.int64).to(torch.int16)    # wraps to a negative int16
    with pytest.raises(ValueError, match="K=40000"):
        vq_matmul(torch.randn(1, 8), torch.randn(40000, 4), i16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_indices_are_refused(backend, dtype):
    with pytest.raises(ValueError, match="integer dtype"):
        vq_matmul(torch.randn(1, 8), torch.randn(4, 2), torch.zeros(3, 4, dtype=dtype), backend=backend)


def test_in_range_signed_indices_mean_the_same_everywhere():
    g = torch.Generator().manual_seed(1)
    book = torch.randn(100, 4, generator=g)
    idx = torch.randint(0, 100, (9, 5), generator=g)
    x = torch.randn(3, 20, generator=g)
    ref = x.double() @ dequantize(book.double(), idx).T
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        for backend in BACKENDS:
            torch.testing.assert_close(vq_matmul(x, book, idx.to(dtype), backend=backend).double(), ref,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_groups_must_divide_rows(backend):
    idx = torch.randint(0, 16, (32, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="32 output rows cannot be split into 3 codebook groups"):
        vq_matmul(torch.randn(2, 64), torch.randn(3, 16, 4), idx, backend=backend)


def test_dense_with_groups_never_returns_stale_rows():
    # before: dense with G not dividing m returned rows left in the scratch buffer by an earlier call
    big = torch.randint(0, 16, (64, 16), dtype=torch.uint8)
    vq_matmul(torch.randn(2, 64), torch.full((16, 4), 1e6), big, backend="dense")
    idx = torch.randint(0, 16, (30, 16), dtype=torch.uint8)
    book = torch.randn(3, 16, 4)
    x = torch.randn(2, 64)
    y = vq_matmul(x, book, idx, backend="dense")
    torch.testing.assert_close(y, x @ dequantize(book, idx).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_behind_torchs_back_is_seen(backend):
    g = torch.Generator().manual_seed(2)
    book = torch.randn(16, 4, generator=g)
    idx = torch.randint(0, 16, (40, 16), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 64, generator=g)
    vq_matmul(x, book, idx, backend=backend)
    version = idx._version
    idx.numpy()[:] = np.random.default_rng(0).integers(0, 16, size=(40, 16))   # no version bump
    assert idx._version == version
    torch.testing.assert_close(vq_matmul(x, book, idx, backend=backend), x @ dequantize(book, idx).T,
                               rtol=1e-5, atol=1e-4)
    idx.numpy()[0, 0] = 99                                                       # and an out-of-range write
    with pytest.raises(ValueError, match=r"\[\d+, 99\] but the codebook has K=16"):
        vq_matmul(x, book, idx, backend=backend)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba not installed: pip install numba")
def test_indices_are_checked_once_per_content(monkeypatch):
    calls = []
    import vqlab.kernels.checked as checked
    real = checked.check_indices
    monkeypatch.setattr(checked, "check_indices", lambda *a, **k: (calls.append(1), real(*a, **k)))
    book, idx = torch.randn(16, 4), torch.randint(0, 16, (40, 16), dtype=torch.uint8)
    x = torch.randn(1, 64)
    for backend in ("numba", "dense", "auto", "numba"):
        vq_matmul(x, book, idx, backend=backend)
    assert len(calls) == 1
    idx[0, 0] = (idx[0, 0] + 1) % 16
    vq_matmul(x, book, idx, backend="numba")
    assert len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_never_alias_reused_buffers(backend):
    g = torch.Generator().manual_seed(3)
    book = torch.randn(16, 4, generator=g)
    idx = torch.randint(0, 16, (24, 8), generator=g, dtype=torch.uint8)
    x = torch.randn(5, 32, generator=g)
    y1 = vq_matmul(x, book, idx, backend=backend)
    keep = y1.clone()
    vq_matmul(x * 3, book.flip(0), idx.flip(0), backend=backend)
    assert torch.equal(y1, keep)
    c1 = vq_conv2d(torch.randn(1, 8, 4, 4, generator=g), book, idx[:, :2], (24, 8, 1, 1), backend=backend)
    keep = c1.clone()
    vq_conv2d(torch.randn(1, 8, 4, 4, generator=g), book.flip(0), idx[:, 2:4], (24, 8, 1, 1), backend=backend)
    assert torch.equal(c1, keep)


def test_vq_layer_with_bad_indices_raises_in_eval():
    layer = VQLinear(64, 8, k=65536, d=4).eval()
    layer.indices.fill_(2**30)
    with pytest.raises(ValueError, match="K=65536"):
        layer(torch.randn(2, 64))
    layer.train()
    with pytest.raises(ValueError, match="K=65536"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"K=65536"):
        layer.indices = torch.full((8, 16), -3, dtype=torch.int32)


def test_unclear_argument_errors_are_clear():
    book, idx = torch.randn(4, 2), torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        vq_matmul(torch.tensor(1.0), book, idx)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        vq_matmul(torch.zeros(2, 8, dtype=torch.int32), book, idx)
    with pytest.raises(ValueError, match="at least one row"):
        vq_matmul(torch.randn(2, 8), book, torch.zeros(0, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="padding must be an int >= 0 or a pair .* got 'same'"):
        vq_conv2d(torch.randn(1, 2, 4, 4), book, torch.zeros(3, 9, dtype=torch.uint8), (3, 2, 3, 3), padding="same")
    assert vq_matmul(torch.randn(0, 8), book, idx, backend="auto").shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_are_computed_in_float64(backend):
    g = torch.Generator().manual_seed(4)
    book = torch.randn(16, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 16, (10, 8), generator=g, dtype=torch.uint8)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vq_matmul(x, book, idx, backend=backend), x @ dequantize(book, idx).T,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_groups_not_aligned_with_codebook_groups(backend):
    # conv groups c=2 (rows 0-2, 3-5) and codebook groups G=3 (rows 0-1, 2-3, 4-5) cut each other
    g = torch.Generator().manual_seed(5)
    book = torch.randn(3, 8, 2, generator=g)
    idx = torch.randint(0, 8, (6, 4 * 9 // 2), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 8, 6, 6, generator=g)
    w = dequantize(book, idx).reshape(6, 3, 3, 4).permute(0, 3, 1, 2)
    y = vq_conv2d(x, book, idx, (6, 4, 3, 3), padding=1, groups=2, backend=backend)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1, groups=2), rtol=1e-5, atol=1e-4)


def _flop_counter(model, shape):
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("layer, kw, shape", [
    (nn.Conv2d(8, 12, 3, padding=1, groups=2), dict(k=16, d=2), (2, 8, 6, 6)),                   # grouped
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), dict(k=4, d=1), (1, 8, 5, 5)),                     # depthwise
    (nn.Conv2d(8, 12, 3, padding=1), dict(k=16, d=4, codebook_groups=4), (1, 8, 6, 6)),          # codebook groups
    (nn.Conv2d(8, 12, 3, padding=1, groups=2), dict(k=8, d=2, codebook_groups=3), (1, 8, 6, 6)), # both, misaligned
    (nn.Conv2d(6, 4, 3, padding=(1, 2), stride=2), dict(k=8, d=4, pad=True), (1, 6, 7, 7)),      # padded segments
    (nn.Linear(30, 16), dict(k=8, d=4, codebook_groups=4, pad=True), (3, 30)),                # padded linear
])
def test_count_flops_equals_flop_counter_mode(layer, kw, shape):
    torch.manual_seed(0)
    q = nn.Sequential((VQConv2d if isinstance(layer, nn.Conv2d) else VQLinear).from_float(layer, **kw)).eval()
    df = count_flops(q, shape)
    assert df["vq_flops"].sum() == _flop_counter(q, shape)
    assert df["vq_table_flops"].iloc[0] > 0


# ---------------------------------------------------------------- issue 27: empty batches, shapes, threads

@pytest.mark.parametrize("backend", available_backends(approximate=True))
@pytest.mark.parametrize("segment", ["input", "kernel"])
def test_vq_conv2d_of_an_empty_batch_is_the_empty_result(backend, segment):
    g = torch.Generator().manual_seed(0)
    book, idx = torch.randn(16, 2, generator=g), torch.randint(0, 16, (8, 18), dtype=torch.uint8, generator=g)
    for x in (torch.randn(0, 4, 6, 6), torch.randn(0, 4, 6, 6).double()):
        y = vq_conv2d(x, book, idx, (8, 4, 3, 3), padding=1, stride=2, segment=segment, backend=backend)
        assert y.shape == (0, 8, 3, 3) and y.dtype == x.dtype


@pytest.mark.parametrize("backend", available_backends(approximate=True))
def test_an_eval_vq_model_on_an_empty_batch_returns_the_empty_result(backend):
    from vqlab import VQConfig, get_model, quantize_
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(k=16, d=2, iters=2), progress=False)
    for m in model.modules():
        if isinstance(m, (VQLinear, VQConv2d)):
            m.backend = backend
    with torch.no_grad():
        assert model.eval()(torch.randn(0, 1, 8, 8)).shape == (0, 10)


@pytest.mark.parametrize("bad", [None, (8, 4, 3), [8, 4, 3, 0], (8, 4, 3, 3.0), "8433", (8, 4, 3, True), 8])
def test_vq_conv2d_weight_shape_must_be_four_positive_ints(bad):
    book, idx = torch.randn(16, 2), torch.randint(0, 16, (8, 18), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"weight_shape must be 4 positive ints .* got " + re_escape(repr(bad))):
        vq_conv2d(torch.randn(1, 4, 6, 6), book, idx, bad)


def re_escape(s: str) -> str:
    import re
    return re.escape(s)


@pytest.mark.parametrize("threads", [-1, 0, 2.5, True, "2"])
def test_simd_threads_must_be_a_positive_int(threads):
    from vqlab.kernels import simd
    if simd.native_isa() is None:
        pytest.skip(simd.native_status())
    x, book, idx = torch.randn(3, 16), torch.randn(16, 2), torch.randint(0, 16, (32, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"simd threads must be an integer >= 1, got " + re_escape(repr(threads))):
        simd.simd_matmul(x, book, idx, threads=threads)
    packed = simd.simd_pack(idx, 16)
    with pytest.raises(ValueError, match="simd threads"):
        simd._matmul_packed(x, book, packed, 32, threads=threads)
