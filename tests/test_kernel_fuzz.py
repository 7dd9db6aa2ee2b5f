"""Fuzz: over index dtype, value range, shapes, codebook groups and backends, every call either equals the
dequantize reference or raises ValueError.  The hypothesis run happens in a child pytest process, so a crash
in native code (SIGSEGV) fails this test instead of killing the test session."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vqlab.kernels import available_backends, dequantize, vq_conv2d, vq_matmul

CHILD = os.environ.get("VQLAB_FUZZ_CHILD") == "1"
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.bool]


def test_fuzz_in_a_child_process():
    if CHILD:
        pytest.skip("this is the child run")
    env = dict(os.environ, VQLAB_FUZZ_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "child"],
                          env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"child fuzz run ended with status {proc.returncode} (negative = killed by a signal):\n{tail}"
    assert " passed" in proc.stdout, tail


def _indices(data, m, s, k, dtype):
    """Mostly valid indices, sometimes with one planted value just outside, far outside or negative."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    idx = torch.randint(0, k, (m, s), generator=g, dtype=torch.int64)
    bad = data.draw(st.sampled_from([None, None, k, k + 1, 255, 2**15, 2**31 - 1, -1, -(2**31)]), label="bad")
    if bad is not None:
        idx[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, s - 1))] = bad
    return idx.to(dtype), g               # the cast wraps like the C types do (e.g. 200 -> -56 in int8)


def _expect(idx, k):
    """Whether a call must succeed: an integer dtype and every value, as the dtype holds it, in [0, k)."""
    return (not idx.dtype.is_floating_point and idx.dtype != torch.bool
            and int(idx.long().min()) >= 0 and int(idx.long().max()) < k)


@pytest.mark.skipif(not CHILD, reason="runs inside test_fuzz_in_a_child_process")
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), m=st.integers(1, 40), s=st.integers(1, 20), k=st.sampled_from([2, 16, 100, 256, 257, 40000]),
       d=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2, 3]), batch=st.sampled_from([0, 1, 5]),
       dtype=st.sampled_from(DTYPES), backend=st.sampled_from(available_backends()))
def test_child_matmul(data, m, s, k, d, groups, batch, dtype, backend):
    idx, g = _indices(data, m, s, k, dtype)
    book = torch.randn((groups, k, d) if groups > 1 else (k, d), generator=g)
    x = torch.randn(batch, s * d, generator=g)
    ok = _expect(idx, k) and m % groups == 0
    if not ok:
        with pytest.raises(ValueError):
            vq_matmul(x, book, idx, backend=backend)
        return
    y = vq_matmul(x, book, idx, backend=backend)
    ref = x.double() @ dequantize(book.double(), idx.long()).T
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * (s * d) ** 0.5)


@pytest.mark.skipif(not CHILD, reason="runs inside test_fuzz_in_a_child_process")
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), k=st.sampled_from([2, 16, 300]), d=st.sampled_from([1, 2]), conv_groups=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2, 3]), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(available_backends()))
def test_child_conv(data, k, d, conv_groups, groups, dtype, backend):
    out_c, cin_g, kh, kw = 6, 2, 3, 3
    s = cin_g * kh * kw // d
    idx, g = _indices(data, out_c, s, k, dtype)
    book = torch.randn((groups, k, d) if groups > 1 else (k, d), generator=g)
    x = torch.randn(2, cin_g * conv_groups, 5, 5, generator=g)
    if not _expect(idx, k):
        with pytest.raises(ValueError):
            vq_conv2d(x, book, idx, (out_c, cin_g, kh, kw), padding=1, groups=conv_groups, backend=backend)
        return
    y = vq_conv2d(x, book, idx, (out_c, cin_g, kh, kw), padding=1, groups=conv_groups, backend=backend)
    w = dequantize(book.double(), idx.long()).reshape(out_c, kh, kw, cin_g).permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(x.double(), w, padding=1, groups=conv_groups)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * (cin_g * kh * kw) ** 0.5)


@pytest.mark.skipif(not CHILD, reason="runs inside test_fuzz_in_a_child_process")
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), m=st.integers(1, 70), s=st.integers(1, 80), k=st.sampled_from([2, 9, 16]),
       d=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), batch=st.sampled_from([0, 1, 2, 5]),
       bad=st.sampled_from([None, None, None, 16, 17, 127, 128, 255]), threads=st.sampled_from([1, 2]))
def test_child_simd_direct(data, m, s, k, d, groups, batch, bad, threads):
    """The approximate "simd" backend reading the caller's uint8 indices in place: within its 6-sigma error
    bound of the reference, or ValueError for a byte >= K; never a crash, the scalar path bit-identical."""
    from vqlab.kernels import simd
    if simd.native_isa() is None:
        pytest.skip("no native simd kernel here")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    idx = torch.randint(0, k, (m, s), generator=g, dtype=torch.uint8)
    if bad is not None:
        idx[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, s - 1))] = min(bad, 255) if bad >= k else k
    book = torch.randn((groups, k, d) if groups > 1 else (k, d), generator=g)
    x = torch.randn(batch, s * d, generator=g)
    if int(idx.max()) >= k or m % groups:
        with pytest.raises(ValueError):
            vq_matmul(x, book, idx, backend="simd")
        return
    y = vq_matmul(x, book, idx, backend="simd")
    assert torch.equal(simd.simd_matmul(x, book, idx, threads=threads), y)
    os.environ["VQLAB_SIMD_ISA"] = "scalar"
    try:
        assert torch.equal(vq_matmul(x, book, idx, backend="simd"), y)
    finally:
        del os.environ["VQLAB_SIMD_ISA"]
    ref = x.double() @ dequantize(book.double(), idx.long()).T
    per = m // groups
    for j in range(groups):
        b = book[j] if groups > 1 else book
        sigma = torch.from_numpy(simd.error_sigma(simd.simd_tables(x, b)[1], s))[:, None] if batch else 0
        err = (y[:, j * per:(j + 1) * per].double() - ref[:, j * per:(j + 1) * per]).abs()
        assert (err <= 6 * sigma + 1e-5 * (1 + ref[:, j * per:(j + 1) * per].abs())).all()
