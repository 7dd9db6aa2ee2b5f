"""Gong et al. 2014's quantizers (vqlab.methods.gong): binarization, scalar k-means, PQ and RVQ, end to end
through quantize_, compressed_size, save/load and count_flops, plus each method's defining property."""
import copy
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import vqlab
from vqlab import QuantizedConv2d, QuantizedLinear, all_layers, compressed_size, count_flops, quantize_
from vqlab.methods.gong import (BinaryCode, BinaryConfig, PQCode, PQConfig, RVQCode, RVQConfig, ScalarCode,
                                ScalarConfig)

CONFIGS = [BinaryConfig(), ScalarConfig(k=16), PQConfig(k=8, subspaces=4), PQConfig(k=16, subspaces=4, axis="output"),
           RVQConfig(k=16, stages=2, d=4)]
METHODS = ["gong_binary", "gong_scalar", "gong_pq", "gong_pq", "gong_rvq"]
BITS = [(1.0, 1.0), (4.0, 4.0), (3 / 18, 3 / 64), (4 / 4, 4 / 8), (2.0, 2.0)]     # (conv "2", linear "4")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.ReLU(), nn.Linear(32, 10)).eval()


def _float_bytes(m):
    return sum(p.numel() * 4 for p in m.parameters())


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[type(c).__name__ + getattr(c, "axis", "") for c in CONFIGS])
def test_each_method_end_to_end(i, tmp_path):
    config, method, bits = CONFIGS[i], METHODS[i], BITS[i]
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    w = {n: mod.weight.detach().clone() for n, mod in model.named_modules() if hasattr(mod, "weight")}
    report = quantize_(model, config, progress=False).set_index("layer")

    # report: first conv / last linear stay float, the middle two carry the code's numbers
    assert report["status"].tolist() == ["float (first conv)", config.name, config.name,
                                         "float (last linear)"]
    assert isinstance(model[2], QuantizedConv2d) and isinstance(model[4], QuantizedLinear)
    for name, b in zip(("2", "4"), bits):
        r = report.loc[name]
        assert r["method"] == method and r["bits_per_weight"] == pytest.approx(b)
        mse = (w[name].double() - model[int(name)].weight.double()).pow(2).mean().item()
        assert r["weight_mse"] == pytest.approx(mse, rel=1e-9, abs=1e-15)

    # compressed_size = the codes' own counts + the float layers and biases
    size = compressed_size(model)
    codes = [model[2].code.size(set()), model[4].code.size(set())]
    floats = _float_bytes(model[0]) + _float_bytes(model[6]) + (16 + 32) * 4
    assert size.compressed_bytes == floats + sum(c.index_bytes + c.codebook_bytes + c.other_bytes for c in codes)
    assert size.dense_bytes == _float_bytes(_model())

    # save / load without model=: bit-exact, the file is the counted bytes plus metadata
    path = tmp_path / "gong.vqz"
    nbytes = vqlab.save(model, path)
    back = vqlab.load(path)
    assert nbytes == os.path.getsize(path) and 0 <= nbytes - size.compressed_bytes <= 4096
    assert type(back[2].code) is type(model[2].code) and back[4].code.config() == model[4].code.config()
    assert torch.equal(back(x), model(x))
    sa, sb = model.state_dict(), back.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)

    # FLOPs: the codes count a dense product, as FlopCounterMode does on the quantized model
    df = count_flops(model, (4, 1, 8, 8))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(4, 1, 8, 8))
    assert df["vq_flops"].sum() == counter.get_total_flops()


def test_binary_and_scalar_sizes_by_hand():
    conv0, fc6 = (8 * 9 + 8) * 4, (32 * 10 + 10) * 4
    model = _model()
    quantize_(model, BinaryConfig(), progress=False)
    size = compressed_size(model)
    conv2 = 16 * 72 // 8 + 16 * 4 + 16 * 4                       # 1-bit signs + alpha + bias
    fc4 = 32 * 256 // 8 + 32 * 4 + 32 * 4
    assert size.compressed_bytes == conv0 + conv2 + fc4 + fc6
    assert size.index_bytes == 16 * 72 // 8 + 32 * 256 // 8 and size.codebook_bytes == 0

    model = _model()
    quantize_(model, ScalarConfig(k=16), progress=False)
    size = compressed_size(model)
    conv2 = 16 * 72 * 4 // 8 + 16 * 4 + 16 * 4                   # 4-bit indices + (16,) codebook + bias
    fc4 = 32 * 256 * 4 // 8 + 16 * 4 + 32 * 4
    assert size.compressed_bytes == conv0 + conv2 + fc4 + fc6
    assert size.index_bytes == (16 * 72 + 32 * 256) // 2 and size.codebook_bytes == 2 * 16 * 4
    # the Huffman figure: from the index histogram, one code-length byte per codeword
    code = model[4].code
    assert code.size(set()).entropy_index_bytes == vqlab.bits.huffman_bytes(code.indices, 16)
    entropy = sum(model[i].code.size(set()).entropy_index_bytes for i in (2, 4))
    assert size.huffman_bytes == size.compressed_bytes - size.index_bytes + entropy

    # k = 5: 3-bit indices, rounded up per layer
    model = _model()
    quantize_(model, ScalarConfig(k=5), progress=False)
    assert compressed_size(model).index_bytes == -(-16 * 72 * 3 // 8) + 32 * 256 * 3 // 8


def test_binary_rows_are_alpha_times_sign():
    torch.manual_seed(1)
    w = torch.randn(6, 5, 3, 3)
    w[0, 0, 0, 0] = 0.0                                              # sign(0) is stored as +1
    code = BinaryCode.from_weight(w)
    flat = w.reshape(6, -1)
    alpha = flat.abs().mean(1, keepdim=True)
    assert torch.equal(code.rows(), alpha * torch.where(flat >= 0, 1.0, -1.0))
    assert torch.equal(code.rows()[:, 1:], (alpha * torch.sign(flat))[:, 1:])
    model = _model()
    quantize_(model, BinaryConfig(), filter_fn=all_layers, progress=False)
    for i in (0, 2, 4, 6):
        f = _model()[i].weight.detach()
        fl = f.reshape(len(f), -1)
        assert torch.equal(model[i].weight, (fl.abs().mean(1, keepdim=True) * torch.where(fl >= 0, 1.0, -1.0))
                           .reshape(f.shape))


@pytest.mark.parametrize("axis", ["input", "output"])
def test_pq_with_one_subspace_is_plain_kmeans(axis):
    torch.manual_seed(2)
    w = torch.randn(24, 40)
    code = PQCode.from_weight(w, k=8, subspaces=1, axis=axis, iters=10, seed=3)
    vectors = w if axis == "input" else w.T
    ref = vqlab.kmeans(vectors, 8, iters=10, seed=3)
    rebuilt = ref.codebook[ref.assignments]
    assert torch.equal(code.rows(), rebuilt if axis == "input" else rebuilt.T)
    assert torch.equal(code.codebooks[0], ref.codebook) and torch.equal(code.codes[0].long(), ref.assignments)
    # more sub-spaces: each block is its own k-means (seed + i), and the error does not grow here
    pq4 = PQCode.from_weight(w, k=8, subspaces=4, axis=axis, iters=10, seed=3)
    blk = vectors[:, 10:20] if axis == "input" else vectors[:, 6:12]
    ref1 = vqlab.kmeans(blk, 8, iters=10, seed=4)
    assert torch.equal(pq4.codebooks[1], ref1.codebook)
    assert (pq4.rows() - w).pow(2).mean() < (code.rows() - w).pow(2).mean()


def test_rvq_distortion_falls_with_every_stage():
    torch.manual_seed(3)
    w = torch.randn(32, 64)
    errs = []
    for t in range(1, 5):
        code = RVQCode.from_weight(w, k=16, stages=t, d=4, iters=15)
        errs.append((code.rows() - w).pow(2).mean().item())
        assert code.rows().shape == w.shape and code.codes.shape == (t, 32 * 64 // 4)
        seg = code.codebooks[torch.arange(t), code.codes.T.long()].sum(1).reshape(32, 64)
        assert torch.equal(code.rows(), seg)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    ref = vqlab.residual_quantize(w.reshape(-1, 4), 16, 4, iters=15)
    assert errs[-1] == pytest.approx(ref.distortion, rel=1e-5)


def test_scalar_kmeans_with_enough_codewords_is_exact():
    torch.manual_seed(4)
    levels = torch.randn(10)
    w = levels[torch.randint(0, 10, (12, 3, 2, 2))]
    for k in (10, 16):
        code = ScalarCode.from_weight(w, k=k)
        assert torch.equal(code.rows(), w.reshape(12, -1))
    # fewer codewords than values: lossy, but every weight goes to a codeword of the (k,) codebook
    code = ScalarCode.from_weight(w, k=4)
    assert code.codebook.shape == (4,) and set(code.rows().unique().tolist()) <= set(code.codebook.tolist())


@pytest.mark.parametrize("make, field", [
    (lambda: ScalarConfig(k=1), "k"), (lambda: ScalarConfig(k=True), "k"), (lambda: ScalarConfig(k=2.0), "k"),
    (lambda: ScalarConfig(k=16, iters=0), "iters"), (lambda: ScalarConfig(k=16, seed=-1), "seed"),
    (lambda: PQConfig(k=16, subspaces=0), "subspaces"), (lambda: PQConfig(k=16, axis="rows"), "axis"),
    (lambda: PQConfig(k=1 << 17), "k"), (lambda: RVQConfig(k=16, stages=0), "stages"),
    (lambda: RVQConfig(k=16, d=0), "d"), (lambda: RVQConfig(k=16, d="4"), "d"),
])
def test_bad_config_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


@pytest.mark.parametrize("config, what", [
    (PQConfig(k=8, subspaces=5), "subspaces=5"),                   # 72 and 256 in-features: 5 divides neither
    (PQConfig(k=32, subspaces=1), "k=32"),                         # the conv has 16 rows
    (RVQConfig(k=16, d=5), "d=5"), (ScalarConfig(k=2000), "k=2000"),
])
def test_layers_that_do_not_fit_are_refused_before_anything_changes(config, what):
    model = _model()
    with pytest.raises(ValueError, match=what):
        quantize_(model, config, progress=False)
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten) for m in model)


def test_out_of_range_indices_are_refused(tmp_path):
    model = _model()
    quantize_(model, ScalarConfig(k=5), progress=False)
    model[4].code.indices[0, 0] = 6                                  # fits 3 bits, but not the 5-entry codebook
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        vqlab.save(model, tmp_path / "bad.vqz")
    model = _model()
    quantize_(model, PQConfig(k=8, subspaces=2), progress=False)
    model[2].code.codebooks[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="codebooks"):
        vqlab.save(model, tmp_path / "bad2.vqz")


def test_pq_and_rvq_sizes_by_hand_and_a_grouped_conv(tmp_path):
    conv0, fc6 = (8 * 9 + 8) * 4, (32 * 10 + 10) * 4
    model = _model()
    quantize_(model, PQConfig(k=8, subspaces=4), progress=False)        # conv: 16 rows x 4 blocks of 18
    size = compressed_size(model)
    conv2 = -(-16 * 4 * 3 // 8) + 4 * 8 * 18 * 4 + 16 * 4            # 3-bit codes + 4 (8, 18) codebooks + bias
    fc4 = 32 * 4 * 3 // 8 + 4 * 8 * 64 * 4 + 32 * 4
    assert size.compressed_bytes == conv0 + conv2 + fc4 + fc6

    model = _model()
    quantize_(model, RVQConfig(k=16, stages=3, d=8), progress=False)
    size = compressed_size(model)
    conv2 = 16 * 9 * 3 * 4 // 8 + 3 * 16 * 8 * 4 + 16 * 4            # 144 segments x 3 stages x 4 bits
    fc4 = 32 * 32 * 3 * 4 // 8 + 3 * 16 * 8 * 4 + 32 * 4
    assert size.compressed_bytes == conv0 + conv2 + fc4 + fc6
    assert model[4].bits_per_weight == 3 * 4 / 8

    # a grouped, padded, strided conv: rows = (out, cin/groups * kh * kw)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),
                        nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    for config in (BinaryConfig(), ScalarConfig(k=4), PQConfig(k=4, subspaces=2), RVQConfig(k=4, stages=2, d=2)):
        m = copy.deepcopy(net)
        quantize_(m, config, progress=False)
        assert isinstance(m[1], QuantizedConv2d) and m[1].code.shape == (8, 18) and m[1].bias is None
        ref = nn.functional.conv2d(m[0](x), m[1].weight, None, 2, 1, 1, 2)
        assert torch.equal(m[1](m[0](x)), ref)
        vqlab.save(m, tmp_path / "g.vqz")
        assert torch.equal(vqlab.load(tmp_path / "g.vqz")(x), m(x))



LUT_CODES = [PQConfig(k=8, subspaces=4), PQConfig(k=8, subspaces=2, axis="output"), PQConfig(k=8, subspaces=1),
             RVQConfig(k=16, stages=3, d=4)]


@pytest.mark.parametrize("backend", [b for b in vqlab.kernels.registry.available_backends() if b != "auto"])
@pytest.mark.parametrize("i", range(len(LUT_CODES)), ids=["pq_in4", "pq_out2", "pq_in1", "rvq3"])
def test_pq_and_rvq_run_through_the_lut_kernels(i, backend):
    """Eval-mode PQ / RVQ layers compute with the lookup-table ops (custom ops seen by FlopCounterMode), not
    with a dense weight; the result equals the dense product of the rebuilt weight, for Linear and for a
    strided, padded, dilated Conv2d (im2col), on every backend."""
    from vqlab.kernels.registry import set_backend
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)).eval()
    quantize_(model, LUT_CODES[i], progress=False)
    conv, fc = model[1], model[3]
    x = torch.randn(2, 8, 9, 9)
    h = torch.randn(5, 256)
    ref_conv = nn.functional.conv2d(x, conv.weight, conv.bias, 2, 2, 2)
    ref_fc = nn.functional.linear(h, fc.weight, fc.bias)
    set_backend(None if backend == "torch" else backend)
    try:
        with FlopCounterMode(display=False) as counter:
            y_conv, y_fc = conv(x), fc(h)
        expected = sum(conv.flops(2 * 5 * 5)) + sum(fc.flops(5))     # the codes' count for the path taken
    finally:
        set_backend(None)
    torch.testing.assert_close(y_conv, ref_conv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_fc, ref_fc, rtol=1e-4, atol=1e-4)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    lut_op = "vqlab.pq_bucket_matmul" if getattr(LUT_CODES[i], "axis", "") == "output" else "vqlab.vq_matmul"
    # linear layers always take the LUT op; convolutions when a LUT backend is pinned, else the dense conv
    assert ops == ({lut_op} if backend not in ("torch", "dense") else {lut_op, "aten.convolution"}), ops
    assert counter.get_total_flops() == expected


def test_lut_paths_refuse_codes_outside_the_codebook():
    torch.manual_seed(6)
    for config in (PQConfig(k=8, subspaces=4), PQConfig(k=8, subspaces=2, axis="output"), RVQConfig(k=16, stages=2)):
        model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 16)).eval()
        quantize_(model, config, filter_fn=all_layers, progress=False)
        model[0].code.codes[0, 0] = config.k                          # one past the last codeword
        with pytest.raises(ValueError, match=rf"K={config.k}"):
            model(torch.randn(2, 64))


def dataclasses_replace(config, **kw):
    import dataclasses
    return dataclasses.replace(config, **kw)


def test_pq_and_rvq_flops_formulas_by_hand():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)).eval()
    quantize_(model, PQConfig(k=8, subspaces=4), filter_fn=all_layers, progress=False)
    # 4 tables of 8 dot products of length 16 per row, then 4 reads per output
    assert model[0].flops(3) == (3 * 2 * 64 * 8, 3 * 32 * 4)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)).eval()
    quantize_(model, PQConfig(k=8, subspaces=2, axis="output"), filter_fn=all_layers, progress=False)
    # bucket sums: one add per input per sub-space; then (8,) x (8, 16) per sub-space
    assert model[0].flops(3) == (3 * 2 * 2 * 8 * 16, 3 * 2 * 64)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)).eval()
    quantize_(model, RVQConfig(k=16, stages=3, d=4), filter_fn=all_layers, progress=False)
    assert model[0].flops(3) == (3 * 3 * 2 * 64 * 16, 3 * 3 * 32 * 16)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}")
def test_eval_backward_equals_training_modes(config):
    """Gradients through the eval products (PQ's bucket product, RVQ's and PQ's vq_matmul) are those of the exact
    product, as in training mode (issue 27: backward through an eval model raised "no autograd formula")."""
    torch.manual_seed(0)
    model = vqlab.get_model("lenet5", input_size=8)
    quantize_(model, config, progress=False)
    x = torch.randn(3, 1, 8, 8)

    def grads(train: bool):
        model.train(train)
        model.zero_grad()
        xr = x.clone().requires_grad_(True)
        model(xr).square().sum().backward()
        return [xr.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
