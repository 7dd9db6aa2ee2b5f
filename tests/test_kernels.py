"""Every backend equals the dequantize reference, over shapes, K, d, batch, dtypes and layouts."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from vqlab.dtypes import index_dtype
from vqlab.kernels import available_backends, dequantize, vq_conv2d, vq_matmul

BACKENDS = available_backends()


def _case(m, s, k, d, seed, groups=1):
    g = torch.Generator().manual_seed(seed)
    book = torch.randn((groups, k, d) if groups > 1 else (k, d), generator=g)
    idx = torch.randint(0, k, (m, s), generator=g).to(index_dtype(k))
    return book, idx, g


def _assert_close(y, ref, n, dtype=torch.float32):
    # summation order differs between backends: tolerance grows with the sum length n
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype] * max(1.0, n ** 0.5)
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), s=st.integers(1, 40), k=st.sampled_from([2, 3, 16, 255, 256, 257, 4096, 65536]),
       d=st.sampled_from([1, 2, 3, 4, 8, 16]), batch=st.sampled_from([1, 2, 7, 33, 512]),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**16))
def test_vq_matmul_equals_reference(m, s, k, d, batch, backend, seed):
    book, idx, g = _case(m, s, k, d, seed)
    x = torch.randn(batch, s * d, generator=g)
    ref = x.double() @ dequantize(book.double(), idx).T
    y = vq_matmul(x, book, idx, backend=backend)
    assert y.shape == (batch, m) and y.dtype == torch.float32
    _assert_close(y, ref, s * d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_noncontiguous(backend, dtype):
    book, idx, g = _case(37, 12, 256, 4, 1)
    x = torch.randn(48, 5, generator=g).T                      # (5, 48), non-contiguous
    ref = x.double() @ dequantize(book.double(), idx).T
    _assert_close(vq_matmul(x, book, idx, backend=backend), ref, 48)
    xh = x.to(dtype)
    y = vq_matmul(xh, book, idx, backend=backend)
    assert y.dtype == dtype
    _assert_close(y, xh.double() @ dequantize(book.double(), idx).T, 48, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_codebook_groups(backend):
    book, idx, g = _case(12, 6, 16, 4, 2, groups=3)
    x = torch.randn(2, 3, 24, generator=g)
    y = vq_matmul(x, book, idx, backend=backend)
    assert y.shape == (2, 3, 12)
    _assert_close(y, x @ dequantize(book, idx).T, 24)


def test_parallel_kernel_has_no_races():
    # many output blocks and threads: two runs and the reference must agree on every element
    if "numba" not in BACKENDS:
        pytest.skip("numba not installed: pip install numba")
    book, idx, g = _case(4099, 257, 256, 4, 3)
    x = torch.randn(9, 1028, generator=g)
    a = vq_matmul(x, book, idx, backend="numba")
    b = vq_matmul(x, book, idx, backend="numba")
    assert torch.equal(a, b)
    _assert_close(a, x.double() @ dequantize(book.double(), idx).T, 1028)


def test_layout_cache_follows_in_place_changes():
    book, idx, g = _case(20, 8, 16, 2, 4)
    x = torch.randn(3, 16, generator=g)
    for backend in BACKENDS:
        vq_matmul(x, book, idx, backend=backend)
    idx[:, 0] = (idx[:, 0].long() + 1).remainder(16).to(idx.dtype)
    for backend in BACKENDS:
        _assert_close(vq_matmul(x, book, idx, backend=backend), x @ dequantize(book, idx).T, 16)


CONVS = [dict(stride=1, padding=0, dilation=1, groups=1), dict(stride=2, padding=1, dilation=1, groups=1),
         dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=1), dict(stride=1, padding=1, dilation=1, groups=2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segment", ["input", "kernel"])
@pytest.mark.parametrize("conv", CONVS, ids=str)
def test_vq_conv2d_equals_dense_conv(backend, segment, conv):
    cin, cout, kh, kw, d = 8, 6, 3, 3, 2
    cin_g = cin // conv["groups"]
    book, idx, g = _case(cout, cin_g * kh * kw // d, 16, d, 5)
    rows = dequantize(book, idx)
    w = rows.reshape(cout, kh, kw, cin_g).permute(0, 3, 1, 2) if segment == "input" else rows.reshape(cout, cin_g, kh, kw)
    x = torch.randn(2, cin, 9, 11, generator=g)
    bias = torch.randn(cout, generator=g)
    ref = F.conv2d(x, w, bias, **conv)
    y = vq_conv2d(x, book, idx, (cout, cin_g, kh, kw), segment=segment, bias=bias, backend=backend, **conv)
    _assert_close(y, ref, cin_g * kh * kw)


def test_bad_arguments_are_named():
    book, idx, _ = _case(4, 3, 16, 2, 0)
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        vq_matmul(torch.randn(1, 6), book, idx, backend="cuda")
    with pytest.raises(ValueError, match="x has 7 features but .* need n=6"):
        vq_matmul(torch.randn(1, 7), book, idx)
    with pytest.raises(ValueError, match="segment must be 'input' or 'kernel', got 'row'"):
        vq_conv2d(torch.randn(1, 2, 4, 4), book, idx, (4, 2, 1, 3), segment="row")


@pytest.mark.parametrize("k, groups", [(16, 1), (256, 3), (4096, 1), (40000, 2)])
def test_fast_dequantize_equals_reference_exactly(k, groups):
    # the dense path of `auto` rebuilds the weight with numba's gather; it must copy codewords bit for bit
    from vqlab.kernels.backends import dequantize_checked
    from vqlab.kernels.checked import checked_indices

    def _dequantize_fast(book, idx, temporary=False):
        return dequantize_checked(book, checked_indices(idx, book.shape[-2]), temporary).to(book.dtype)
    book, idx, _ = _case(30, 7, k, 3, 6, groups=groups)
    ref = dequantize(book, idx)
    kept = _dequantize_fast(book, idx)
    assert torch.equal(kept, ref)
    assert torch.equal(_dequantize_fast(book, idx.long()), ref)
    assert torch.equal(_dequantize_fast(book, idx, temporary=True), ref)      # into the reused scratch buffer
    _dequantize_fast(book.flip(-2), idx, temporary=True)                       # overwrites the scratch ...
    assert torch.equal(kept, ref)                                              # ... never a kept result


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_indices_and_segment_counts_off_the_packing(backend):
    # the numba kernel packs byte indices 8 segments to a word: 1, 7, 9 and 17 segments exercise the padding
    for s in (1, 7, 9, 17):
        book, idx, g = _case(13, s, 200, 2, s)
        x = torch.randn(4, 2 * s, generator=g)
        ref = x.double() @ dequantize(book.double(), idx).T
        _assert_close(vq_matmul(x, book, idx.long(), backend=backend), ref, 2 * s)


def test_auto_records_a_dense_or_numba_choice_and_bench_times_every_backend():
    from vqlab.bench import BACKENDS as BENCH_BACKENDS, layer_timings
    from vqlab.kernels import auto_choices
    df = layer_timings(64, 96, 16, 4, 3, repeats=5, budget=0.0)
    assert list(df["backend"]) == list(BENCH_BACKENDS)
    assert (df["seconds"] > 0).all() and (df["runs"] == 5).all()      # budget 0: the floor of 5 runs
    assert df.loc[df["backend"] == "dense fp32", "speedup_vs_dense"].item() == 1.0
    assert set(auto_choices().values()) <= {"dense", "numba"}
    assert any(key[0] == (64, 24) for key in auto_choices())          # the (m, n/d) of this layer was picked for


# ---------------------------------------------------------------- issue 27: gradients through the eval products

@pytest.mark.parametrize("backend", ["torch", *available_backends(approximate=True)[1:]])
@pytest.mark.parametrize("groups", [1, 2])
def test_vq_matmul_and_conv_have_the_exact_products_gradients(backend, groups):
    """Backward through vq_matmul / vq_conv2d (input saliency, fine-tuning codebooks with frozen BatchNorm) gives
    the gradients of x @ dequantize(codebook, indices).T on every backend; it had raised "no autograd formula"."""
    book, idx, g = _case(16, 12, 16, 2, seed=3, groups=groups)
    x = torch.randn(5, 24, generator=g)
    r = torch.randn(5, 16, generator=g)

    def grads(fn):
        xr, br = x.clone().requires_grad_(True), book.clone().requires_grad_(True)
        (fn(xr, br) * r).sum().backward()
        return xr.grad, br.grad
    want = grads(lambda a, b: a @ dequantize(b, idx).T)
    got = grads(lambda a, b: vq_matmul(a, b, idx, backend=backend))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xc = torch.randn(2, 4, 5, 5, generator=g)
    rc = torch.randn(2, 16, 5, 5, generator=g)
    idc = torch.randint(0, 16, (16, 18), generator=g, dtype=torch.uint8)

    def conv_grads(fn):
        xr, br = xc.clone().requires_grad_(True), book.clone().requires_grad_(True)
        (fn(xr, br) * rc).sum().backward()
        return xr.grad, br.grad
    want = conv_grads(lambda a, b: F.conv2d(a, dequantize(b, idc).reshape(16, 4, 3, 3), padding=1))
    got = conv_grads(lambda a, b: vq_conv2d(a, b, idc, (16, 4, 3, 3), padding=1, segment="kernel", backend=backend))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends())
def test_backward_through_an_eval_vq_model_equals_training_modes(backend):
    from vqlab import VQConfig, get_model, quantize_
    from vqlab.methods.vq import VQConv2d, VQLinear
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(k=16, d=2, iters=2), progress=False)
    for m in model.modules():
        if isinstance(m, (VQLinear, VQConv2d)):
            m.backend = backend
    x = torch.randn(4, 1, 8, 8)

    def grads(train: bool):
        model.train(train)
        model.zero_grad()
        xr = x.clone().requires_grad_(True)
        model(xr).square().sum().backward()
        return [xr.grad] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
