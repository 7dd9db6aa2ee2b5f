"""Backend "simd": exact against an integer emulation of the kernel, within 6 sigma of the float reference,
odd shapes, the scalar path, refused indices, opt-in only, and the numba fallback when no compiler exists."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vqlab.kernels as K
from vqlab.kernels import dequantize, set_backend, vq_conv2d, vq_matmul
from vqlab.kernels import simd
from vqlab.kernels.route import _candidates

NATIVE = simd.native_isa() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason=f"simd: {simd.native_status()}")
ISAS = [i for i in simd.ISAS if NATIVE and (i == "scalar" or simd._loaded()[0].vq_isa_supported(simd.ISAS[i]))]


@pytest.fixture(autouse=True)
def _clean():
    K.clear_caches()
    set_backend(None)
    yield
    set_backend(None)
    K.clear_caches()


def _case(m, s, k, d, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    book = torch.randn(k, d, generator=g)
    idx = torch.randint(0, k, (m, s), generator=g, dtype=torch.uint8)
    x = torch.randn(batch, s * d, generator=g)
    return x, book, idx


def emulate(x: torch.Tensor, book: torch.Tensor, idx: torch.Tensor, group: int = simd.GROUP):
    """The kernel in numpy, operation for operation in float32 and exact integers: (y (B, m), q, step, offset)."""
    xn, (k, d), I = x.numpy(), book.shape, idx.numpy().astype(np.int64)
    b, s, m = xn.shape[0], I.shape[1], I.shape[0]
    g = simd.group_size(s, group)
    ng = -(-s // g)
    cbt = np.zeros((d, 16), np.float32)
    cbt[:, :k] = book.numpy().T
    xs = xn.reshape(b, s, d)
    t = np.zeros((b, s, 16), np.float32)
    for j in range(d):
        t = t + xs[:, :, j:j + 1] * cbt[j]
    t[:, :, k:] = t[:, :, :1]
    lo, r = t.min(-1), t.max(-1) - t.min(-1)
    rp = np.zeros((b, ng * g), np.float32)
    rp[:, :s] = r
    step = rp.reshape(b, ng, g).max(-1) / np.float32(255)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), np.float32(0)).astype(np.float32)
    inv_s = np.repeat(inv, g, axis=1)[:, :s]
    v = (t - lo[..., None]) * inv_s[..., None] + np.float32(0.5)
    v = np.minimum(np.where(v >= 0, v, np.float32(0)), np.float32(255))
    q = v.astype(np.int64)
    q[:, :, k:] = 0
    off = np.zeros(b, np.float32)
    for j in range(s):
        off = off + lo[:, j]
    picked = np.take_along_axis(q[:, None, :, :], I[None, :, :, None], axis=3)[..., 0]      # (B, m, S)
    y = np.repeat(off[:, None], m, axis=1)
    for gi in range(ng):
        part = picked[:, :, gi * g:(gi + 1) * g].sum(-1)
        assert part.max(initial=0) <= 65535                       # what uint16 accumulation relies on
        y = y + part.astype(np.float32) * step[:, gi:gi + 1]
    return y, q, step, off


SHAPES = [  # m, S, K, d, batch: m off the 32-output block, S off the pair / group, K < 16, batch 1/3/17
    (1, 1, 2, 1, 1), (31, 3, 5, 3, 3), (33, 65, 16, 2, 17), (70, 130, 16, 2, 3), (64, 128, 7, 4, 1),
    (100, 257, 16, 1, 17),
]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, s, k, d, batch", SHAPES)
def test_equals_integer_emulation(isa, m, s, k, d, batch):
    x, book, idx = _case(m, s, k, d, batch, seed=m + s)
    y_em, q_em, step_em, off_em = emulate(x, book, idx)
    q, step, off = simd.simd_tables(x, book, isa=isa)
    np.testing.assert_array_equal(q[:, :s], q_em.astype(np.uint8))
    assert not q[:, s:].any()                                         # padded segments add nothing
    np.testing.assert_array_equal(step, step_em)
    np.testing.assert_array_equal(off, off_em)
    y = simd.simd_matmul(x, book, idx, isa=isa)                        # the caller's uint8 indices, read in place
    assert y.shape == (batch, m) and y.dtype == torch.float32
    scale = np.abs(off_em)[:, None] + 255 * s * step_em.max(1, keepdims=True)
    np.testing.assert_allclose(y.numpy(), y_em, rtol=0, atol=float(1e-6 * scale.max()))


@needs_native
@pytest.mark.parametrize("m, s, k, d, batch", SHAPES + [(256, 1024, 16, 2, 4)])
def test_within_six_sigma_of_the_float_reference(m, s, k, d, batch):
    x, book, idx = _case(m, s, k, d, batch, seed=7 * m + s)
    ref = (x.double() @ dequantize(book.double(), idx).T).numpy()
    y = vq_matmul(x, book, idx, backend="simd").double().numpy()
    sigma = simd.error_sigma(simd.simd_tables(x, book)[1], s)[:, None]
    err = np.abs(y - ref)
    assert (err <= 6 * sigma + 1e-5 * (1 + np.abs(ref))).all(), float((err / (sigma + 1e-30)).max())
    if m * s >= 2 ** 18:                                                  # enough samples: the model holds
        rms_ratio = np.sqrt((err ** 2).mean(1)) / sigma[:, 0]
        assert ((rms_ratio > 0.7) & (rms_ratio < 1.3)).all(), rms_ratio


@needs_native
def test_scalar_path_is_bit_identical_and_forced_by_the_environment(monkeypatch):
    x, book, idx = _case(45, 77, 16, 2, 5, seed=3)
    y = vq_matmul(x, book, idx, backend="simd")
    monkeypatch.setenv("VQLAB_SIMD_ISA", "scalar")
    assert simd.native_isa() == "scalar"
    assert torch.equal(vq_matmul(x, book, idx, backend="simd"), y)
    monkeypatch.setenv("VQLAB_SIMD_ISA", "avx9")
    with pytest.raises(ValueError, match="isa"):
        simd.native_isa()


@needs_native
def test_threads_chunks_and_nonfinite_inputs(monkeypatch):
    x, book, idx = _case(300, 40, 16, 2, 9, seed=4)
    y1 = simd.simd_matmul(x, book, idx, threads=1)
    assert torch.equal(simd.simd_matmul(x, book, idx, threads=2), y1)
    monkeypatch.setattr(simd, "CHUNK", 4)                               # batch split into table chunks
    assert torch.equal(simd.simd_matmul(x, book, idx, threads=1), y1)
    assert simd.simd_matmul(x[:0], book, idx).shape == (0, 300)
    assert vq_matmul(x[:0], book, idx, backend="simd").shape == (0, 300)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    y = simd.simd_matmul(x, book, idx)
    assert y[2].isnan().all() and y[4].isnan().all() and torch.equal(y[[0, 1, 3]], y1[[0, 1, 3]])


def test_bad_indices_and_shapes_are_refused():
    x, book, idx = _case(20, 6, 5, 2, 2)
    for bad_value in (5, 16, 255):
        bad = idx.clone()
        bad[3, 2] = bad_value
        with pytest.raises(ValueError, match="K=5"):
            vq_matmul(x, book, bad, backend="simd")
    neg = idx.to(torch.int8)
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="K=5"):
        vq_matmul(x, book, neg, backend="simd")
    if NATIVE:
        for bad in (idx.to(torch.int64), idx.t(), idx[:, ::2], idx[None], idx[:0]):   # dtype, strides, shape
            with pytest.raises(ValueError, match="contiguous uint8"):
                simd.simd_matmul(x, book, bad)
        with pytest.raises(ValueError, match="float32"):
            simd.simd_matmul(x[:, :-1], book, idx)
        with pytest.raises(ValueError, match="float32"):
            simd.simd_matmul(x.double(), book, idx)
        with pytest.raises(ValueError, match="K <= 16"):
            simd.simd_matmul(torch.randn(2, 12), torch.randn(17, 2), idx)
        with pytest.raises(ValueError, match="codebook groups"):
            simd.simd_matmul(x, torch.randn(3, 5, 2), idx)               # 3 groups do not divide 20 rows
        with pytest.raises(ValueError, match="group"):
            simd.group_size(10, 300)


def test_in_place_index_changes_are_seen():
    x, book, idx = _case(40, 10, 16, 2, 1)
    y0 = vq_matmul(x, book, idx, backend="simd")
    idx.numpy()[:] = (idx.numpy() + 1) % 16                               # behind torch's back
    y1 = vq_matmul(x, book, idx, backend="simd")
    ref = x @ dequantize(book, idx).T
    assert (y1 - ref).abs().max() < (y0 - ref).abs().max()


# ---------------------------------------------------------------- the direct path: the caller's uint8 indices, read in place

def emulate_groups(x, book, idx):
    """emulate() per codebook group (G, K, d): the G equal blocks of rows, concatenated."""
    if book.dim() == 2:
        return emulate(x, book, idx)[0]
    per = idx.shape[0] // book.shape[0]
    return np.concatenate([emulate(x, book[j], idx[j * per:(j + 1) * per])[0] for j in range(book.shape[0])], axis=1)


def _assert_emulated(y, x, book, idx):
    y_em = emulate_groups(x, book, idx)
    assert y.shape == y_em.shape and y.dtype == torch.float32
    scale = float(np.abs(y_em).max(initial=0)) + 1.0
    np.testing.assert_allclose(y.numpy(), y_em, rtol=0, atol=2e-6 * scale)


DIRECT_SHAPES = [  # m off 16 / 32, S odd, S off 32 / G, S < 32; batches 0..17; codebook groups
    (1, 1, 16, 2, 1, 1), (15, 31, 16, 2, 2, 1), (17, 33, 9, 2, 3, 1), (33, 65, 16, 1, 17, 1), (48, 2, 16, 4, 0, 1),
    (40, 100, 16, 2, 3, 2), (96, 130, 5, 3, 1, 3), (64, 257, 16, 2, 2, 4),
    (40, 2050, 16, 2, 17, 2),           # tables of 17 rows x 33 groups > the kernel's 128 KB pass: groups in chunks
    (50, 100, 16, 2, 1, 1), (33, 129, 9, 2, 1, 1), (70, 2050, 16, 2, 1, 2), (16, 64, 16, 2, 1, 1),   # batch 1: 32-row tiles
]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, s, k, d, batch, groups", DIRECT_SHAPES)
def test_direct_path_equals_integer_emulation(monkeypatch, isa, m, s, k, d, batch, groups):
    import vqlab.kernels.checked as checked
    x, book, idx = _case(m, s, k, d, batch, seed=3 * m + s)
    if groups > 1:
        book = torch.randn(groups, k, d, generator=torch.Generator().manual_seed(m))
    monkeypatch.setenv("VQLAB_SIMD_ISA", isa)
    y = vq_matmul(x, book, idx, backend="simd")
    _assert_emulated(y, x, book, idx)
    assert not checked._CACHE                                             # no private copy was made
    for threads in (1, 2):
        assert torch.equal(simd.simd_matmul(x, book, idx, threads=threads), y)
    # the same indices as int64 or as a strided view take the checked-copy path: same result
    assert torch.equal(vq_matmul(x, book, idx.long(), backend="simd"), y)
    wide = torch.zeros(m, s + 3, dtype=torch.uint8)
    wide[:, 1:s + 1] = idx
    view = wide[:, 1:s + 1]
    assert view.is_contiguous() == (m == 1)
    assert torch.equal(vq_matmul(x, book, view, backend="simd"), y)
    assert torch.equal(vq_matmul(x.reshape(batch, 1, s * d), book, idx, backend="simd"), y.reshape(batch, 1, m))


@needs_native
@pytest.mark.parametrize("k, bad", [(16, 16), (9, 9), (16, 255), (5, 200), (16, 128)])
def test_direct_path_refuses_every_out_of_range_byte_on_every_call(k, bad):
    x, book, idx = _case(70, 45, k, 2, 2, seed=k)
    for r, c in ((0, 0), (69, 44), (33, 31), (17, 32)):                    # first, last, tile / block edges
        idx.numpy()[r, c] = bad                                          # behind torch's back
        for _ in range(2):                                               # refused again: nothing is cached
            with pytest.raises(ValueError, match=rf"\[0, {bad}\] but the codebook has K={k} codewords"):
                vq_matmul(x, book, idx, backend="simd")
            with pytest.raises(ValueError, match=rf"K={k}"):
                vq_matmul(x[:0], book, idx, backend="simd")                # an empty batch checks too
            with pytest.raises(ValueError, match=rf"K={k}"):
                simd.simd_matmul(x, book, idx, threads=2)
        idx.numpy()[r, c] = k - 1
        _assert_emulated(vq_matmul(x, book, idx, backend="simd"), x, book, idx)
    gbook = torch.randn(2, k, 2)                                          # codebook groups: the second block too
    idx.numpy()[60, 3] = bad
    with pytest.raises(ValueError, match=rf"K={k}"):
        vq_matmul(x, gbook, idx, backend="simd")


@needs_native
def test_direct_path_sees_every_write_behind_torchs_back():
    x, book, idx = _case(50, 40, 16, 2, 3, seed=11)
    y0 = vq_matmul(x, book, idx, backend="simd")
    rng = np.random.default_rng(0)
    for _ in range(3):
        version = idx._version
        idx.numpy()[:] = rng.integers(0, 16, size=idx.shape)              # no version bump
        assert idx._version == version
        y = vq_matmul(x, book, idx, backend="simd")
        _assert_emulated(y, x, book, idx)
        assert not torch.equal(y, y0)
        y0 = y
    book.numpy()[:] = book.numpy()[::-1]                                 # the codebook too
    _assert_emulated(vq_matmul(x, book, idx, backend="simd"), x, book, idx)


@needs_native
def test_direct_path_in_conv_and_pinned():
    import vqlab.kernels.checked as checked
    g = torch.Generator().manual_seed(6)
    book = torch.randn(2, 16, 2, generator=g)
    x = torch.randn(2, 8, 5, 5, generator=g)
    idx = torch.randint(0, 16, (6, 4 * 9 // 2), generator=g, dtype=torch.uint8)
    y = vq_conv2d(x, book, idx, (6, 4, 3, 3), padding=1, groups=2, backend="simd")
    assert not checked._CACHE
    assert torch.equal(y, vq_conv2d(x, book, idx.long(), (6, 4, 3, 3), padding=1, groups=2, backend="simd"))
    idx.numpy()[5, 17] = 16
    with pytest.raises(ValueError, match="K=16"):
        vq_conv2d(x, book, idx, (6, 4, 3, 3), padding=1, groups=2, backend="simd")
    idx.numpy()[5, 17] = 3
    K.clear_caches()
    set_backend("simd")                                                   # pinned: auto takes the direct path
    xl, bl, il = _case(40, 24, 16, 2, 3, seed=8)
    assert torch.equal(vq_matmul(xl, bl, il), vq_matmul(xl, bl, il, backend="simd"))
    assert not checked._CACHE
    il.numpy()[0, 0] = 200
    with pytest.raises(ValueError, match=r"\[0, 200\] but the codebook has K=16"):
        vq_matmul(xl, bl, il)


@needs_native
def test_direct_path_keeps_the_custom_op_where_it_matters():
    from torch.utils.flop_counter import FlopCounterMode
    x, book, idx = _case(32, 16, 16, 2, 2, seed=12)
    y = vq_matmul(x, book, idx, backend="simd")
    with FlopCounterMode(display=False) as counter:                      # a dispatch mode sees the op
        assert torch.equal(vq_matmul(x, book, idx, backend="simd"), y)
    assert counter.get_total_flops() > 0
    xg = x.clone().requires_grad_()
    out = vq_matmul(xg, book, idx, backend="simd")                       # autograd asked for: through the op
    assert torch.equal(out.detach(), y)
    xh = x.half()                                                         # other float dtypes: in float32
    assert torch.equal(vq_matmul(xh, book, idx, backend="simd"), vq_matmul(xh.float(), book, idx, backend="simd").half())
    assert vq_matmul(x.double(), book, idx, backend="simd").dtype == torch.float64   # the float64 reference


def test_auto_never_picks_simd_unless_asked():
    assert "simd" not in K.available_backends() and "simd" in K.available_backends(approximate=True)
    assert "simd" not in _candidates(16, 2)
    x, book, idx = _case(64, 32, 16, 2, 1)
    ref = x @ dequantize(book, idx).T
    torch.testing.assert_close(vq_matmul(x, book, idx), ref, rtol=1e-5, atol=1e-4)   # auto: exact
    assert "simd" not in K.auto_choices().values()
    set_backend("simd")                                                   # the opt-in: pinned
    assert torch.equal(vq_matmul(x, book, idx), vq_matmul(x, book, idx, backend="simd"))
    set_backend(None)
    # a layer opts in with layer.backend
    from vqlab.methods.vq import VQLinear
    layer = VQLinear(64, 32, bias=False, k=16, d=2).eval()
    with torch.no_grad():
        layer.codebook.weight.normal_()
        layer.indices = torch.randint(0, 16, tuple(layer.indices.shape), dtype=layer.indices.dtype)
    assert layer.backend == "auto"
    xl = torch.randn(3, 64)
    exact = layer(xl)
    layer.backend = "simd"
    approx = layer(xl)
    assert torch.equal(approx, vq_matmul(xl, layer.codebook.weight, layer.indices, backend="simd"))
    if NATIVE:
        assert not torch.equal(approx, exact)
    # K > 16: asked for by name, simd hands over to the exact "dense" backend
    x2, book2, idx2 = _case(16, 8, 256, 2, 2)
    torch.testing.assert_close(vq_matmul(x2, book2, idx2, backend="simd"), x2 @ dequantize(book2, idx2).T,
                               rtol=1e-5, atol=1e-4)


@needs_native
def test_conv_and_codebook_groups_within_the_bound():
    g = torch.Generator().manual_seed(5)
    book = torch.randn(2, 16, 2, generator=g)                            # 2 codebook groups
    x = torch.randn(2, 8, 6, 6, generator=g)
    idx = torch.randint(0, 16, (6, 4 * 9 // 2), generator=g, dtype=torch.uint8)
    y = vq_conv2d(x, book, idx, (6, 4, 3, 3), padding=1, groups=2, backend="simd")
    w = dequantize(book, idx).reshape(6, 3, 3, 4).permute(0, 3, 1, 2)
    ref = F.conv2d(x, w, padding=1, groups=2)
    cols = F.unfold(x, 3, padding=1).view(2, 2, 4, 9, -1).transpose(2, 3).reshape(2, 2, 36, -1)
    sig = max(simd.error_sigma(simd.simd_tables(cols[:, j].transpose(1, 2).reshape(-1, 36).contiguous(),
                                                book[c])[1], 18).max() for j in range(2) for c in range(2))
    assert (y - ref).abs().max() <= 6 * sig + 1e-5
    xl = torch.randn(5, 36, generator=g)
    idx_l = torch.randint(0, 16, (8, 18), generator=g, dtype=torch.uint8)
    ref_l = xl @ dequantize(book, idx_l).T
    sig_l = max(simd.error_sigma(simd.simd_tables(xl, book[c])[1], 18).max() for c in range(2))
    assert (vq_matmul(xl, book, idx_l, backend="simd") - ref_l).abs().max() <= 6 * sig_l + 1e-5


def test_compiled_once_into_the_cache(monkeypatch, tmp_path):
    if simd._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("VQLAB_CACHE_DIR", str(tmp_path))
    simd._loaded.cache_clear()
    try:
        lib, why = simd._loaded()
        assert lib is not None, why
        built = list(tmp_path.glob("simd_lut-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp*"))
        stamp = built[0].stat().st_mtime_ns
        simd._loaded.cache_clear()
        assert simd._loaded()[0] is not None and built[0].stat().st_mtime_ns == stamp   # reused, not rebuilt
    finally:
        simd._loaded.cache_clear()


def test_no_compiler_falls_back_to_numba_with_one_notice(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(simd, "_compiler", lambda: None)
    monkeypatch.setattr(simd, "_WARNED", [False])
    simd._loaded.cache_clear()
    try:
        assert simd.native_isa() is None and "no C compiler" in simd.native_status()
        x, book, idx = _case(40, 12, 16, 2, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = vq_matmul(x, book, idx, backend="simd")
            vq_matmul(x, book, idx, backend="simd")
        notes = [w for w in caught if "simd" in str(w.message)]
        assert len(notes) == 1 and "numba" in str(notes[0].message) and "\n" not in str(notes[0].message)
        assert torch.equal(y, vq_matmul(x, book, idx, backend="numba"))        # the exact kernel ran
    finally:
        simd._loaded.cache_clear()


def test_no_avx2_falls_back_to_numba_with_one_notice(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(simd, "native_isa", lambda isa=None: None)        # a CPU without AVX2
    monkeypatch.setattr(simd, "_WARNED", [False])
    x, book, idx = _case(40, 12, 16, 2, 3)
    with pytest.warns(RuntimeWarning, match="numba") as caught:
        y = vq_matmul(x, book, idx, backend="simd")
    assert len([w for w in caught if "simd" in str(w.message)]) == 1
    assert "AVX2" in simd.native_status() or "compiler" in simd.native_status()
    assert torch.equal(y, vq_matmul(x, book, idx, backend="numba"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_codebook_gives_the_reference_on_every_backend(bad):
    """A NaN/Inf codeword, unused or used, in a K <= 16 codebook: every backend (and the packed code, and the
    convolution) gives what the reference gives (issue 27 item 2: simd had made every output NaN)."""
    from vqlab.methods.vq import VQConfig
    from vqlab.methods.vq_simd import pack_simd_
    from vqlab.quantize import all_layers, quantize_

    g = torch.Generator().manual_seed(0)
    book = torch.randn(8, 2, generator=g)
    book[7, 1] = bad
    idx = torch.randint(0, 7, (32, 8), dtype=torch.uint8, generator=g)      # codeword 7 unused
    x = torch.randn(3, 16, generator=g)
    for used in (False, True):
        if used:
            idx[5, 3] = 7
        want = x @ dequantize(book, idx).T
        assert bool(torch.isfinite(want).all()) != used
        for backend in ("torch", *K.available_backends(approximate=True)[1:]):
            for i in (idx, idx.long()):                                   # the direct and the checked paths
                torch.testing.assert_close(vq_matmul(x, book, i, backend=backend), want, equal_nan=True)
        if NATIVE:
            torch.testing.assert_close(simd.simd_matmul(x, book, idx), want, equal_nan=True)
            packed = simd.simd_pack(idx, 8)
            torch.testing.assert_close(simd._matmul_packed(x, book, packed, 32), want, equal_nan=True)
        xc = torch.randn(2, 4, 5, 5, generator=g)
        wc = dequantize(book, idx[:, :8].reshape(32, 8)).reshape(32, 4, 2, 2)
        for backend in ("torch", "numba", "simd"):
            y = vq_conv2d(xc, book, idx, (32, 4, 2, 2), segment="kernel", backend=backend)
            torch.testing.assert_close(y, F.conv2d(xc, wc), equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    quantize_(model, VQConfig(k=8, d=2, iters=2), filter_fn=all_layers, progress=False)
    pack_simd_(model)
    model.eval()
    with torch.no_grad():
        model[0].codebook.weight[0, 7] = bad
        model[0].set_indices(model[0].unpack().clamp(max=6))
        want = F.linear(x, model[0].weight, model[0].bias)
        y = model(x)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, want)


_PLANT = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%s", "w"); if (f) { fputs("ran", f); fclose(f); } }
int vq_abi_version(void) { return 3; }
"""


def _plant(cc: str, folder, marker) -> None:
    """A library named as the simd kernel's cache entry whose constructor writes `marker` when loaded."""
    src = folder / "planted.c"
    src.write_text(_PLANT % marker)
    import subprocess
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / simd._library_name(cc)), str(src)], check=True)
    src.unlink()


@pytest.mark.parametrize("how", ["world-writable folder", "group-writable library", "another owner", "symlink"])
def test_a_library_planted_where_others_can_write_is_never_loaded(monkeypatch, tmp_path, how):
    """Issue 27 item 6: the kernel was loaded from $TMPDIR/vqlab-<uid>/ (or the cache folder) without asking who owns
    the folder and the file, so another local user could plant one whose constructor ran in this process."""
    cc = simd._compiler()
    if cc is None or simd._uid() is None:
        pytest.skip("needs a C compiler and POSIX owners")
    cache, tmp, marker = tmp_path / "cache", tmp_path / "tmp", tmp_path / "marker"
    cache.mkdir(mode=0o700)
    tmp.mkdir(mode=0o700)
    monkeypatch.setenv("VQLAB_CACHE_DIR", str(cache))
    monkeypatch.setattr(simd.tempfile, "tempdir", str(tmp))
    shared = tmp / f"vqlab-{simd._uid()}"                  # the $TMPDIR fallback, as another user would make it
    shared.mkdir(mode=0o700)
    for folder in (cache, shared):
        _plant(cc, folder, marker)
    if how == "world-writable folder":
        for folder in (cache, shared):
            os.chmod(folder, 0o777)
    elif how == "group-writable library":
        for folder in (cache, shared):
            os.chmod(folder / simd._library_name(cc), 0o775)
    elif how == "another owner":
        monkeypatch.setattr(simd, "_uid", lambda: os.getuid() + 1)
    else:
        real = tmp_path / "elsewhere"
        real.mkdir(mode=0o700)
        for folder in (cache, shared):
            os.rename(folder / simd._library_name(cc), real / folder.name)
            os.symlink(real / folder.name, folder / simd._library_name(cc))
    simd._loaded.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not using"):
            lib, why = simd._loaded()
        assert not marker.exists(), "the planted library was loaded"
        assert lib is not None, why                         # a private folder of this process's own was used
        x, book, idx = _case(40, 12, 16, 2, 3)
        ref = x @ dequantize(book, idx).T
        assert (simd.simd_matmul(x, book, idx) - ref).abs().max() < 0.05 * ref.abs().max()
    finally:
        simd._loaded.cache_clear()


def test_the_tmpdir_fallback_is_private(monkeypatch, tmp_path):
    cc = simd._compiler()
    if cc is None or simd._uid() is None:
        pytest.skip("needs a C compiler and POSIX owners")
    monkeypatch.setenv("VQLAB_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")                      # the cache cannot be created
    monkeypatch.setattr(simd.tempfile, "tempdir", str(tmp_path))
    simd._loaded.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not using"):
            assert simd._loaded()[0] is not None
        folder = tmp_path / f"vqlab-{simd._uid()}"
        assert stat_mode(folder) == 0o700 and stat_mode(folder / simd._library_name(cc)) & 0o022 == 0
    finally:
        simd._loaded.cache_clear()


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o777
