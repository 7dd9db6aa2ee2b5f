"""Codes stored in the simd kernel's own 4-bit layout (vqlab.packed.SimdCode, vqlab.pack_simd_): the layout
round-trips, the packed kernel gives the row-major kernel's outputs bit for bit (so the same integer emulation
and 6-sigma bound hold), out-of-range nibbles are refused, a converted model predicts as before, saves, loads,
counts its size and trains its codebook; and numba no longer changes torch's thread count."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import vqlab
from vqlab.kernels import dequantize, simd
from vqlab.methods.vq_simd import SimdCode, pack_simd_

from test_kernel_simd import _case, emulate

NATIVE = simd.native_isa() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason=f"simd: {simd.native_status()}")
ISAS = [i for i in simd.ISAS if NATIVE and (i == "scalar" or simd._loaded()[0].vq_isa_supported(simd.ISAS[i]))]

SHAPES = [  # m, S, K, d, batch, codebook groups: m off the 32-row block, S off 32 / the group of 64, K < 16
    (1, 1, 2, 1, 1, 1), (31, 3, 5, 3, 3, 1), (33, 65, 16, 2, 17, 1), (70, 130, 16, 2, 2, 1), (64, 128, 7, 4, 1, 2),
    (96, 257, 16, 1, 5, 3), (512, 64, 16, 2, 1, 1),
]


@pytest.mark.parametrize("m, s, k, books, group", [(1, 1, 2, 1, 64), (33, 65, 16, 1, 64), (96, 257, 11, 3, 64),
                                                    (40, 100, 16, 2, 2), (64, 300, 16, 1, 256)])
def test_layout_round_trips_and_pads_with_zeros(m, s, k, books, group):
    idx = torch.randint(0, k, (m, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(m + s))
    packed = simd.simd_pack(idx, k, books, group)
    assert tuple(packed.shape) == simd.packed_shape(m, s, books, group)
    assert torch.equal(simd._unpack(packed, m, s, group), idx)
    assert torch.equal(simd.simd_pack(idx.long(), k, books, group), packed)
    # 4 bits per index plus zero padding: the non-zero nibbles are exactly the non-zero indices
    nibbles = torch.stack([packed & 15, packed >> 4])
    assert int((nibbles != 0).sum()) == int((idx != 0).sum())
    with pytest.raises(ValueError, match=r"K <= 16 codewords, got K=17"):
        simd.simd_pack(idx, 17, books, group)


def test_layout_places_each_index_where_the_kernel_reads_it():
    """Byte c of vector 16 b + t of block blk: rows 32 blk + c (low nibble) and + 16 (high) at segment
    32 b + t; byte 16 + c the same rows at segment 32 b + 16 + t (the table register of rows 2p, 2p + 1)."""
    m, s = 64, 64
    idx = torch.randint(0, 16, (m, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    p = simd.simd_pack(idx, 16)[0, 0]                                  # (nblk, 32, 32): one group of 64
    for blk, b, t, c in [(0, 0, 0, 0), (1, 1, 15, 15), (0, 1, 3, 7), (1, 0, 9, 2)]:
        byte, byte2 = int(p[blk, 16 * b + t, c]), int(p[blk, 16 * b + t, 16 + c])
        assert byte == int(idx[32 * blk + c, 32 * b + t]) | int(idx[32 * blk + 16 + c, 32 * b + t]) << 4
        assert byte2 == int(idx[32 * blk + c, 32 * b + 16 + t]) | int(idx[32 * blk + 16 + c, 32 * b + 16 + t]) << 4


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, s, k, d, batch, books", SHAPES)
def test_packed_kernel_equals_the_row_major_kernel_bit_for_bit(isa, m, s, k, d, batch, books):
    x, _, idx = _case(m, s, k, d, batch, seed=m + s)
    book = torch.randn(books, k, d, generator=torch.Generator().manual_seed(7))
    book2 = book[0] if books == 1 else book
    packed = simd.simd_pack(idx, k, books)
    y = simd._matmul_packed(x, book2, packed, m, isa=isa)
    assert torch.equal(y, simd.simd_matmul(x, book2, idx, isa=isa))
    assert torch.equal(simd._matmul_packed(x, book2, packed, m, isa=isa, threads=2), y)
    if books == 1:                                                      # the integer emulation, directly
        y_em = emulate(x, book2, idx)[0]
        scale = np.abs(y_em).max(initial=1.0)
        np.testing.assert_allclose(y.numpy(), y_em, rtol=0, atol=float(2e-6 * scale))
    assert simd._matmul_packed(x[:0], book2, packed, m, isa=isa).shape == (0, m)


@needs_native
def test_packed_kernel_within_six_sigma_of_the_float_reference():
    x, book, idx = _case(256, 1024, 16, 2, 8, seed=5)
    y = simd._matmul_packed(x, book, simd.simd_pack(idx, 16), 256).double()
    ref = x.double() @ dequantize(book.double(), idx).T
    sigma = simd.error_sigma(simd.simd_tables(x, book)[1], 1024)
    assert ((y - ref).abs().amax(1).numpy() <= 6 * sigma + 1e-6).all()


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_a_nibble_at_or_above_k_is_refused_on_every_call(isa):
    x, book, idx = _case(70, 130, 11, 2, 3, seed=1)
    packed = simd.simd_pack(idx, 11)
    simd._matmul_packed(x, book, packed, 70, isa=isa)
    for where, value in [((0, 1, 2, 5, 31), 0xB0), ((0, 0, 0, 0, 0), 0x0C), ((0, 2, 2, 20, 16), 0xF0)]:
        bad = packed.clone()
        bad[where] = value                                              # behind every check but the kernel's
        for threads in (1, 2):
            with pytest.raises(ValueError, match=r"K=11"):
                simd._matmul_packed(x, book, bad, 70, isa=isa, threads=threads)
    with pytest.raises(ValueError, match=r"packed must be a contiguous uint8 CPU"):
        simd._matmul_packed(x, book, packed[..., :16], 70, isa=isa)
    with pytest.raises(ValueError, match=r"packed must be a contiguous uint8 CPU"):
        simd._matmul_packed(x, book, packed, 100, isa=isa)


def _model(seed=0, k=16, d=2):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(256, 130), nn.ReLU(), nn.Linear(130, 40), nn.ReLU(), nn.Linear(40, 7))
    vqlab.quantize_(m, vqlab.VQConfig(k=k, d=d), filter_fn=vqlab.all_layers, progress=False)
    return m.eval()


@needs_native
def test_pack_simd_converts_and_predicts_as_the_simd_backend():
    m = _model()
    x = torch.randn(9, 256)
    with torch.no_grad():
        for layer in (m[0], m[2], m[4]):
            layer.backend = "simd"
        before = m(x)
        idx0 = [m[i].indices.clone() for i in (0, 2, 4)]
    report = pack_simd_(m)
    assert report["packed"].tolist() == [True, True, True] and report["reason"].tolist() == ["", "", ""]
    assert all(isinstance(m[i].code, SimdCode) for i in (0, 2, 4))
    assert all(torch.equal(m[i].code.unpack(), t) for i, t in zip((0, 2, 4), idx0))
    with torch.no_grad():
        assert torch.equal(m(x), before)                                 # the same kernel, the same numbers
    y = m(x)                                                             # grad enabled: kernel forward still
    assert torch.equal(y.detach(), before)
    y.square().sum().backward()                                          # exact product's gradient
    assert m[0].code.codebook.weight.grad is not None and m[0].code.codebook.weight.grad.abs().sum() > 0


def test_pack_simd_skips_what_it_cannot_hold_and_keeps_sharing():
    torch.manual_seed(0)
    lin = nn.Linear(12, 12)
    m = nn.Sequential(nn.Linear(8, 12), lin, nn.ReLU(), lin, nn.Linear(12, 256), nn.Linear(256, 4))
    vqlab.quantize_(m, vqlab.VQConfig(k=16, d=4), filter_fn=vqlab.all_layers,
                    overrides={"4": vqlab.VQConfig(k=64, d=4)}, progress=False)
    report = pack_simd_(m)
    assert report["packed"].tolist() == [True, True, True, False, True]
    assert "K=64 > 16" in report["reason"][3]
    assert m[1] is m[3] and isinstance(m[1].code, SimdCode)             # a module used twice: one object
    m[5] = vqlab.VQLinear(10, 4, k=16, d=4, pad=True)
    assert "padded rows" in pack_simd_(m)["reason"].iloc[-1]
    solo = vqlab.VQLinear(8, 4, k=16, d=2)             # packing changes the code in place: the model itself too
    assert pack_simd_(solo)["packed"][0] and isinstance(solo.code, SimdCode)


def test_set_indices_and_validate_check_their_values():
    m = _model()
    code = m[0].code if isinstance(m[0].code, SimdCode) else SimdCode.from_vq(m[0].code)
    good = code.unpack()
    with pytest.raises(ValueError, match=r"K=16"):
        code.set_indices(torch.full_like(good, 16))
    with pytest.raises(ValueError, match=r"shape"):
        code.set_indices(good[:, 1:])
    assert torch.equal(code.unpack(), good)                              # a refused write changes nothing
    code.set_indices(torch.flip(good, [0]))
    assert torch.equal(code.unpack(), torch.flip(good, [0]))
    code.validate()
    with torch.no_grad():
        code.packed[0, 0, -1, -1, -1] = 0x10                             # a padded row's nibble (130 rows)
    with pytest.raises(ValueError, match=r"padding"):
        code.validate()
    small = SimdCode.from_vq(_model(k=5)[0].code)
    with torch.no_grad():
        small.packed[0, 0, 0, 0, 0] = 0x07
    with pytest.raises(ValueError, match=r"K=5"):
        small.validate()


@needs_native
def test_saved_and_loaded_packed_models_predict_the_same(tmp_path):
    m = _model()
    pack_simd_(m)
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = m(x)
    for coding in ("packed", "ans"):
        path = tmp_path / f"m-{coding}.vq"
        vqlab.save(m, path, index_coding=coding)
        back = vqlab.load(path).eval()
        assert isinstance(back[0].code, SimdCode)
        with torch.no_grad():
            assert torch.equal(back(x), y)
    # a tampered file: a nibble >= K at a real position is refused by load's validate
    m5 = _model(k=5)
    pack_simd_(m5)
    with torch.no_grad():
        m5[0].code.packed[0, 0, 0, 0, 0] = 0x06
    with pytest.raises(ValueError, match=r"cannot save"):
        vqlab.save(m5, tmp_path / "bad.vq")


def test_size_counts_the_layout_as_stored():
    m = _model()
    vq_size = vqlab.compressed_size(m)
    pack_simd_(m)
    size = vqlab.compressed_size(m)
    shapes = [m[i].code.packed.numel() for i in (0, 2, 4)]
    assert size.index_bytes == sum(shapes)                               # 4 bits per index plus padding
    assert sum(shapes) >= vq_size.index_bytes                            # K=16: 4 bits either way, plus padding
    assert size.codebook_bytes == vq_size.codebook_bytes


def test_packed_layers_run_the_exact_reference_off_the_kernel():
    """Training mode and float64 inputs take F.linear on rows(): exact, and gradients reach the codebook."""
    m = _model()
    pack_simd_(m)
    x = torch.randn(3, 256, dtype=torch.float64)
    ref = m[0].bias.double() + x @ dequantize(m[0].code.codebook.weight.double(), m[0].code.unpack()).T
    assert torch.allclose(m[0].double()(x), ref, atol=1e-12)
    m.float().train()
    out = m(torch.randn(5, 256))
    out.sum().backward()
    assert m[2].code.codebook.weight.grad.abs().sum() > 0


def test_numba_leaves_torchs_thread_count_alone():
    """numba's OpenMP layer sets the OpenMP thread count at its first parallel launch; a 1-thread torch stayed
    at 2 threads after the first numba call (benchmarks then measured 2 threads)."""
    pytest.importorskip("numba")
    code = ("import torch\ntorch.set_num_threads(1)\nfrom vqlab.kernels import vq_matmul\n"
            "x, b, i = torch.randn(2, 64), torch.randn(16, 2), torch.randint(0, 16, (64, 32), dtype=torch.uint8)\n"
            "vq_matmul(x, b, i, backend='numba')\nvq_matmul(x, b, i, backend='dense')\n"
            "print(torch.get_num_threads())\n")
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


@needs_native
def test_bench_rows_for_the_simd_kernels_and_their_errors():
    from vqlab.bench import layer_errors, layer_timings
    df = layer_timings(256, 256, 16, 2, 1, repeats=3, warmup=1)
    assert {"vq simd", "vq simd packed", "int8 dynamic"} <= set(df["backend"])
    assert "vq simd packed" not in set(layer_timings(256, 256, 256, 4, 1, repeats=3, warmup=1)["backend"])
    err = layer_errors(512, 512, 16, 2, batch=8).set_index("backend")
    assert err.loc["vq simd", "rms"] == err.loc["vq simd packed", "rms"]          # the same outputs
    assert err.loc["vq numba", "max"] < 1e-5 and err.loc["dense fp32", "max"] < 1e-5
    assert 1e-3 < err.loc["vq simd packed", "rms"] < 0.05                         # table quantization, ~1 %
    out = layer_errors(512, 512, 16, 2, batch=8, outliers=8).set_index("backend")
    assert out.loc["int8 dynamic", "rms"] > out.loc["vq simd packed", "rms"]      # outliers hurt int8 more


@needs_native
def test_gradients_through_the_kernel_are_the_exact_products():
    """Eval with gradients: the kernel's output forward, the exact product's gradients backward (x and codebook)."""
    m = _model()
    pack_simd_(m)
    layer = m[0]
    x = torch.randn(6, 256, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    book = layer.code.codebook.weight
    x2 = x.detach().clone().requires_grad_()
    b2 = book.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2, dequantize(b2, layer.code.unpack()), layer.bias.detach())
    ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(book.grad, b2.grad, atol=1e-4)
    assert (y.detach() - ref.detach()).abs().max() > 0                   # forward: the approximate kernel


@needs_native
def test_default_thread_count_splits_only_calls_large_enough(monkeypatch):
    """threads=None: batch 1 of a 4096 x 4096 layer stays on this thread (a pool wake-up cost more than it
    saved); a large batch splits; an explicit threads=2 always may."""
    used = []
    real = simd._pool

    def pool(n):
        used.append(n)
        return real(n)

    monkeypatch.setattr(simd, "_pool", pool)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, book, idx = _case(4096, 2048, 16, 2, 1, seed=2)
        packed = simd.simd_pack(idx, 16)
        y1 = simd._matmul_packed(x, book, packed, 4096)
        assert used == []
        x8 = torch.randn(8, 4096)
        y8 = simd._matmul_packed(x8, book, packed, 4096)
        assert used == [2]
        assert torch.equal(simd._matmul_packed(x, book, packed, 4096, threads=2), y1) and used[-1] == 2
        assert torch.equal(simd._matmul_packed(x8, book, packed, 4096, threads=1), y8)
    finally:
        torch.set_num_threads(before)


def test_the_row_count_belongs_to_the_code(tmp_path):
    """A packed buffer for 40 rows has the shape of one for 64 (rows are padded to 32): reading it with another row
    count computed rows of padding (issue 27 item 5).  Only SimdCode, which owns m, reads the layout now; it refuses
    indices of another row count, and a file claiming another count for the same buffer is refused on load."""
    assert not hasattr(simd, "simd_matmul_packed") and not hasattr(simd, "simd_unpack")
    assert "simd_matmul_packed" not in simd.__all__ and "simd_unpack" not in simd.__all__
    assert simd.packed_shape(40, 10) == simd.packed_shape(64, 10)        # why m cannot be taken from the buffer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40))
    vqlab.quantize_(model, vqlab.VQConfig(k=16, d=2), filter_fn=vqlab.all_layers, progress=False)
    pack_simd_(model)
    code = model[0].code
    assert code.unpack().shape == (40, 10)
    for rows in (41, 64):
        with pytest.raises(ValueError, match=r"indices must have shape \(40, 10\)"):
            code.set_indices(torch.zeros(rows, 10, dtype=torch.uint8))
    path = tmp_path / "p.vqz"
    vqlab.save(model, path)
    from test_io_security import _build, _split
    _, meta, payload = _split(path.read_bytes())
    node = next(n for n in meta["modules"] if n["type"] == "code:vq_simd")
    node["config"]["rows"] = 64
    (tmp_path / "bad.vqz").write_bytes(_build(meta, payload))
    with pytest.raises(vqlab.VQFileError, match=r"rows|geometry|64"):
        vqlab.load(tmp_path / "bad.vqz")
