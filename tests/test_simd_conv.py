"""The lookup-table convolution on the simd path (issue 25 item 1): `vqlab.kernels.simd_conv` and the packed
convolution code `SimdConvCode` that `vqlab.pack_simd_` gives VQ convolutions.

The kernel's outputs equal its integer emulation (`conv_emulate`: the same quantized tables, exact integer sums, the
same float32 flushes) bit for bit on both instruction paths, and lie within 6 sigma of the exact convolution;
indices >= K are refused on every call; packed convolutions save, load and count like packed linears."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vqlab
from vqlab import SimdConvCode, VQConfig, pack_simd_
from vqlab.kernels import simd
from vqlab.kernels import simd_conv as sc

NATIVE = simd.native_isa() is not None
ISAS = [i for i in ("scalar", "avx2") if NATIVE and simd.native_isa(i) == i]
needs_native = pytest.mark.skipif(not NATIVE, reason="no native simd kernel here")

# (batch, C, H, W, out, kernel, stride, padding, dilation, groups, K, d)
CASES = [
    (1, 16, 28, 28, 16, (3, 3), 1, 1, 1, 1, 16, 2),          # a ResNet-20 layer
    (3, 32, 9, 7, 40, (3, 3), 2, 1, 1, 1, 11, 2),            # odd sizes, stride 2, out not a multiple of 16
    (2, 12, 8, 8, 20, (3, 2), (1, 2), (2, 1), (2, 1), 2, 7, 3),  # rectangular kernel, dilation, two groups, d=3
    (1, 6, 5, 5, 17, (1, 1), 1, 0, 1, 1, 16, 1),             # 1x1, d=1 (S odd)
    (1, 10, 6, 6, 5, (3, 3), 1, 1, 1, 1, 16, 5),             # S = 2 (one pair), d=5
    (2, 600, 5, 5, 33, (3, 3), 1, 1, 1, 1, 16, 2),           # S = 300: the integer sums restart every 128 pairs
    (1, 4, 3, 3, 4, (3, 3), 1, 0, 1, 4, 5, 1),               # depthwise, one output pixel
    (0, 16, 5, 5, 16, (3, 3), 1, 1, 1, 1, 16, 2),            # batch 0
]


def _case(b, c, h, w, out, kernel, groups, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    book = torch.randn(k, d, generator=g)
    s = c // groups // d
    idx = torch.randint(0, k, (out, kernel[0] * kernel[1] * s), dtype=torch.uint8, generator=g)
    return x, book, idx, torch.randn(out, generator=g)


def _weight(book, idx, out, kernel, cin_g):
    return book[idx.long()].reshape(out, kernel[0], kernel[1], cin_g).permute(0, 3, 1, 2)


def test_pack_and_unpack_are_inverse_and_pad_with_zeros():
    idx = torch.randint(0, 16, (20, 9 * 5), dtype=torch.uint8)
    p = sc.conv_pack(idx, 9, groups=2)
    assert tuple(p.shape) == sc.conv_packed_shape(20, 9, 5, 2) == (2, 1, 9, 3, 16)
    assert torch.equal(sc.conv_unpack(p, 20, 9, 5), idx)
    assert int(p[:, :, :, 2].max()) < 16                      # the padded segment: high nibbles zero
    assert int(p[:, :, :, :, 10:].max()) == 0                 # channels 10..15 of each group: padding


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_kernel_equals_its_integer_emulation_and_lies_within_6_sigma(isa, case):
    b, c, h, w, out, kernel, stride, padding, dilation, groups, k, d = case
    x, book, idx, bias = _case(b, c, h, w, out, kernel, groups, k, d)
    packed = sc.conv_pack(idx, kernel[0] * kernel[1], groups)
    for threads in (1, 2):
        y = sc.simd_conv2d(x, book, packed, out, kernel, stride, padding, dilation, groups, bias=bias, isa=isa,
                           threads=threads)
        want = sc.conv_emulate(x, book, idx, out, kernel, stride, padding, dilation, groups, bias=bias)
        assert torch.equal(y, want)
    exact = F.conv2d(x, _weight(book, idx, out, kernel, c // groups), bias, stride, padding, dilation, groups)
    assert y.shape == exact.shape
    if y.numel():
        sigma = sc.conv_sigma(x, book, kernel, padding, groups).repeat_interleave(out // groups, 1)[:, :, None, None]
        assert float(((y - exact).abs() / sigma).max()) <= 6.0


@needs_native
def test_both_paths_agree_bit_for_bit():
    if len(ISAS) < 2:
        pytest.skip("no AVX2 here")
    x, book, idx, bias = _case(2, 32, 11, 13, 48, (3, 3), 1, 16, 2, seed=3)
    packed = sc.conv_pack(idx, 9)
    a, b = (sc.simd_conv2d(x, book, packed, 48, 3, 1, 1, bias=bias, isa=i) for i in ISAS)
    assert torch.equal(a, b)


@needs_native
def test_bad_arguments_are_refused_with_their_names():
    x, book, idx, _ = _case(1, 8, 6, 6, 16, (3, 3), 1, 16, 2)
    packed = sc.conv_pack(idx, 9)
    with pytest.raises(ValueError, match="packed must be a contiguous uint8"):
        sc.simd_conv2d(x, book, packed[:, :, :8], 16, 3, 1, 1)
    with pytest.raises(ValueError, match="whole segments of d=3"):
        sc.simd_conv2d(x, torch.randn(16, 3), packed, 16, 3, 1, 1)
    with pytest.raises(ValueError, match="codebook must be a float32 CPU"):
        sc.simd_conv2d(x, torch.randn(17, 2), packed, 16, 3, 1, 1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        sc.simd_conv2d(x[:, :, :2], book, packed, 16, 3, 1, 0)
    nan = book.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sc.simd_conv2d(x, nan, packed, 16, 3, 1, 1)


def _vq_cnn(k=16, d=2, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                      nn.Linear(16 * 5 * 5, 10))
    take = lambda mod, name: not (isinstance(mod, nn.Conv2d) and mod.in_channels == 1)  # noqa: E731
    vqlab.quantize_(m, VQConfig(k=k, d=d, seed=seed, iters=3), take, progress=False)
    return m.eval()


@needs_native
def test_pack_simd_converts_convolutions_and_predicts_within_the_bound():
    m = _vq_cnn()
    x = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(x)
        ref2 = m[2](F.relu(m[0](x)))
    report = pack_simd_(m)
    assert report["packed"].tolist() == [True, True, True]
    assert isinstance(m[2].code, SimdConvCode) and isinstance(m[4].code, SimdConvCode)
    assert m[4].code.groups == 2 and m[4].code.codebook is m[4].codebook
    with torch.no_grad():
        h = F.relu(m[0](x))
        y2 = m[2](h)
        after = m(x)
    sigma = sc.conv_sigma(h, m[2].codebook.weight[0].detach(), 3, 1).repeat_interleave(16, 1)[:, :, None, None]
    assert float(((y2 - ref2).abs() / sigma).max()) <= 6.0
    assert torch.equal(y2, sc.conv_emulate(h, m[2].codebook.weight[0].detach(), m[2].unpack(), 16, 3, 1, 1,
                                           bias=m[2].bias.detach()))
    torch.testing.assert_close(after, before, atol=0.05 * float(before.abs().max()), rtol=0)
    assert torch.equal(m[2].unpack(), m[2].code.index_values())
    # training mode and gradients: the exact product of the rebuilt weight
    m[2].train()
    torch.testing.assert_close(m[2](h), ref2, atol=1e-5, rtol=1e-5)
    m[2].eval()
    hg = h.clone().requires_grad_(True)
    y = m[2](hg)
    torch.testing.assert_close(y, ref2, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert hg.grad is not None


def test_pack_simd_says_why_a_convolution_stays():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(6, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 32, 3))
    vqlab.quantize_(m, VQConfig(k=16, d=4, iters=2, pad=True), vqlab.all_layers, progress=False,
                    overrides={"1": VQConfig(k=16, d=2, iters=2, segment="kernel"),
                               "2": VQConfig(k=16, d=2, iters=2, codebook="group", codebook_groups=2),
                               "3": VQConfig(k=32, d=2, iters=2)})
    reasons = pack_simd_(m)["reason"].tolist()
    assert "padded channels" in reasons[0] and "segment='kernel'" in reasons[1]
    assert "codebook_groups=2" in reasons[2] and "K=32 > 16" in reasons[3]


@needs_native
def test_indices_at_or_above_k_are_refused_on_every_call():
    m = _vq_cnn(k=11)
    pack_simd_(m)
    x = torch.randn(1, 1, 10, 10)
    with torch.no_grad():
        m(x)
        m(x)                                                   # the cached fast path
        m[2].code.packed.numpy()[0, 0, 4, 1, 3] = 0x0B          # a nibble of 11 written behind torch's back
        for _ in range(2):
            with pytest.raises(ValueError, match=r"\[0, 10\]"):
                m(x)
        m[2].code.packed.numpy()[0, 0, 4, 1, 3] = 0x0A
        m(x)
    with pytest.raises(ValueError, match="K=11"):
        m[2].set_indices(torch.full_like(m[2].unpack(), 11))
    m[4].code.packed.numpy()[0, 0, 0, 0, 12] = 0x01             # channel 12 of group 0 (8 outputs): padding
    with pytest.raises(ValueError, match="padding"):
        m[4].code.validate()


@needs_native
def test_nonfinite_codebook_runs_the_exact_product():
    m = _vq_cnn()
    pack_simd_(m)
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        m(x)
        m[2].codebook.weight[0, 15, 1] = float("inf")
        h = F.relu(m[0](x))
        want = F.conv2d(h, m[2].weight, m[2].bias, 1, 1)
        torch.testing.assert_close(m[2](h), want, equal_nan=True)


@needs_native
def test_packed_convolutions_save_load_and_count(tmp_path):
    m = _vq_cnn()
    plain = _vq_cnn()
    pack_simd_(m)
    path = tmp_path / "m.vqz"
    vqlab.save(m, path)
    back = vqlab.load(path)
    assert isinstance(back[2].code, SimdConvCode) and back[4].code.groups == 2
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    for i in (2, 4):
        assert torch.equal(back[i].unpack(), plain[i].indices)
    # 4 bits per index, plus the padding to 16 output channels per conv group (the grouped conv has 8) and even S
    assert m[2].code.size(set()).index_bytes == plain[2].code.size(set()).index_bytes == 16 * 9 * 4 // 2
    assert m[4].code.size(set()).index_bytes == 2 * plain[4].code.size(set()).index_bytes == 2 * 16 * 9 * 4 // 2
    packed, vq = vqlab.compressed_size(m), vqlab.compressed_size(plain)
    assert packed.codebook_bytes == vq.codebook_bytes
    parts = sum(m[i].code.size(set()).index_bytes for i in (2, 4, 7))
    assert packed.index_bytes == parts
    assert path.stat().st_size < packed.compressed_bytes + 2048


@needs_native
def test_a_packed_resnet_block_keeps_channels_and_batch_semantics():
    m = _vq_cnn()
    pack_simd_(m)
    with torch.no_grad():
        x = torch.randn(5, 1, 10, 10)
        whole = m(x)
        parts = torch.cat([m(x[i:i + 1]) for i in range(5)])
        assert torch.equal(whole, parts)                        # one step per image: batch-independent outputs
        assert m(x[:0]).shape == (0, 10)
        half = m.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert half.dtype == torch.bfloat16
