"""Quantization-aware CP factorization (vqlab.methods.qaf): the ADMM's residuals, QAF against CP-ALS + PTQ at the
same rank and bits (a trained LeNet-5 layer and a synthetic low-rank tensor), and the factorized layers through
quantize_, compressed_size, save/load and count_flops."""
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vqlab
from vqlab import all_layers, compressed_size, quantize_
from vqlab.methods import qaf
from vqlab.layers import QuantizedConv2d, QuantizedLinear
from vqlab.methods.qaf import QAFCode, QAFConfig, cp_decompose
from vqlab.train import checkpoint_path


def _low_rank(shape=(16, 8, 3, 3), rank=6, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    x = qaf.cp_reconstruct(fs)
    return (x + noise * x.std() * torch.randn(shape, generator=g, dtype=torch.float64)).float()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, (3, 1), padding=(1, 0), dilation=(1, 1)), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _lenet_conv2() -> torch.Tensor:
    path = checkpoint_path("lenet5", "fashion-mnist", 10)
    if not path.exists():
        pytest.skip(f"{path} (the committed LeNet-5 baseline) is missing")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["features.3.weight"]


def test_cp_als_recovers_an_exact_low_rank_tensor_in_both_layouts():
    for shape in ((12, 6, 3, 3), (20, 9)):
        x = _low_rank(shape, rank=3, noise=0.0)
        res = qaf.cp_decompose(x, 3, algorithm="als")
        assert res.rel_error < 1e-5 and res.q is None and [f.shape for f in res.factors] == [(n, 3) for n in shape]
        assert torch.allclose(qaf.cp_reconstruct(res.factors).float(), x, atol=1e-4)


def test_admm_residuals_fall_and_the_factors_lie_on_the_grid():
    x = _low_rank()
    res = qaf.cp_decompose(x, 6, bits=3, algorithm="admm", iters=30)
    h = res.history
    assert list(h.columns) == ["iter", "primal", "dual", "rel_error"] and len(h) == 31
    assert h["primal"].iloc[-1] < 0.25 * h["primal"].iloc[1]
    assert h["dual"].iloc[-1] < 0.25 * h["dual"].iloc[1]
    assert res.rel_error == pytest.approx(h["rel_error"].min(), rel=1e-6)
    for q in res.q:                                                      # symmetric 3-bit grid: -3..3
        assert q.dtype == torch.int64 and int(q.abs().max()) <= 3
    deq = [res.q[0] * res.scales] + res.q[1:]
    assert torch.allclose(qaf.cp_reconstruct([f.double() for f in deq]), qaf.cp_reconstruct(res.factors))


@pytest.mark.parametrize("which", ["lenet5 conv2", "synthetic"])
def test_qaf_beats_cp_als_plus_ptq_at_equal_rank_and_bits(which):
    # the trained layer: about 0.92 -> 0.73; a rank-12 tensor fit at rank 8: about 0.327 -> 0.311
    w = _lenet_conv2() if which == "lenet5 conv2" else _low_rank(rank=12, noise=0.0)
    rank, bits, gain = (16, 3, 0.85) if which == "lenet5 conv2" else (8, 3, 0.98)
    ptq = qaf.cp_decompose(w, rank, bits, algorithm="als")
    admm = qaf.cp_decompose(w, rank, bits, algorithm="admm", iters=30)
    float_als = qaf.cp_decompose(w, rank, algorithm="als")
    assert float_als.rel_error < admm.rel_error < gain * ptq.rel_error
    assert len(admm.q) == len(ptq.q) == w.dim() and admm.scales.shape == ptq.scales.shape == (rank,)


def test_quantize_runs_the_cp_sequence_and_saves_counts_and_flops_it(tmp_path):
    model, ptq_model = _model(), _model()
    x = torch.randn(2, 3, 8, 8)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    cfg = dict(rank=4, bits=4, iters=5, als_iters=30)
    report = quantize_(model, QAFConfig(**cfg), filter_fn=all_layers, progress=False).set_index("layer")
    ptq_report = quantize_(ptq_model, QAFConfig(**cfg, algorithm="ptq"), filter_fn=all_layers,
                           progress=False).set_index("layer")
    assert set(report["method"]) == {"qaf"} and set(ptq_report["method"]) == {"qaf"}
    assert all(s.startswith("admm ") for s in report["setting"]) and all(s.startswith("ptq ") for s in ptq_report["setting"])
    assert (report["weight_mse"] <= ptq_report["weight_mse"] + 1e-12).all()
    assert report.loc["2", "bits_per_weight"] == pytest.approx(4 * 4 * (16 + 8 + 3 + 3) / (16 * 72))
    layers = {i: model[i] for i in (0, 2, 4, 6, 8)}
    assert all(isinstance(layers[i], QuantizedConv2d) and isinstance(layers[i].code, QAFCode) for i in (0, 2, 4))
    assert all(isinstance(layers[i], QuantizedLinear) and isinstance(layers[i].code, QAFCode) for i in (6, 8))
    code = model[2].code
    assert isinstance(code, QAFCode) and code.rel_error == pytest.approx(
        ((model[2].weight - dense["2"]).norm() / dense["2"].norm()).item(), rel=1e-4)

    # the sequence equals the layer with its reconstructed dense weight
    h = torch.relu(model[0](x))
    assert torch.allclose(model[0](x), F.conv2d(x, model[0].weight, model[0].bias, padding=1), atol=1e-5)
    assert torch.allclose(model[2](h), F.conv2d(h, model[2].weight, model[2].bias, stride=2, padding=1), atol=1e-5)
    v = torch.randn(5, 128)
    assert torch.allclose(model[6](v), F.linear(v, model[6].weight, model[6].bias), atol=1e-5)

    # stored: b-bit factors (each buffer packed) + float32 lambda + float32 biases
    size = compressed_size(model)
    want = sum(sum(-(-d * 4 * 4 // 8) for d in m.code.dims) + 4 * 4 + 4 * m.bias.numel() for m in layers.values())
    assert size.compressed_bytes == want and size.other_bytes == sum(4 * 4 + 4 * m.bias.numel() for m in layers.values())
    path = tmp_path / "qaf.vqz"
    nbytes = vqlab.save(model, path)
    assert nbytes == os.path.getsize(path) and 0 <= nbytes - size.compressed_bytes <= 0.01 * nbytes + 4096
    back = vqlab.load(path)
    assert isinstance(back[2], QuantizedConv2d) and isinstance(back[2].code, QAFCode) and torch.equal(back[2].code.q1, code.q1)
    assert torch.equal(back(x), model(x))

    # FLOPs: the sequence's own count, as FlopCounterMode counts the ops it runs
    df = vqlab.count_flops(model, (2, 3, 8, 8))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, 8, 8))
    assert df["vq_flops"].sum() == counter.get_total_flops() < df["dense_flops"].sum()


def test_rank_ratio_and_config_errors():
    conv = nn.Conv2d(8, 16, 5)
    assert qaf.layer_rank(conv, rank_ratio=0.25) == round(0.25 * 16 * 8 * 25 / (16 + 8 + 5 + 5))
    assert qaf.layer_rank(conv, rank=7) == 7
    for bad in (dict(), dict(rank=4, rank_ratio=0.5), dict(rank=4, bits=1), dict(rank=4, bits=9),
                dict(rank=4, algorithm="svd"), dict(rank_ratio=-1.0)):
        with pytest.raises(ValueError):
            QAFConfig(**bad)
    with pytest.raises(ValueError, match="needs bits"):
        qaf.cp_decompose(torch.randn(4, 4), 2, algorithm="admm")
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="groups=1"):
        quantize_(model, QAFConfig(rank=2), progress=False)
    assert isinstance(model[1], nn.Conv2d)


# ---------------------------------------------------------------- issue 27: degenerate weights and ranks

def test_degenerate_weights_and_ranks_give_clear_errors_or_exact_zeros():
    """rank > the largest CP rank, NaN/Inf/empty weights: ValueError naming the argument (tensorly's and numpy's
    internals before); an all-zero weight ("Singular matrix" before) factorizes exactly into zero factors."""
    for alg, bits in (("als", None), ("als", 4), ("admm", 4)):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 3\], got 10"):
            cp_decompose(torch.randn(4, 3), 10, bits, alg)
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 12\], got 40"):
            cp_decompose(torch.randn(4, 3, 2, 2), 40, bits, alg)
        for bad in (torch.full((8, 6), float("nan")), torch.full((8, 6), float("inf"))):
            with pytest.raises(ValueError, match="finite"):
                cp_decompose(bad, 2, bits, alg)
        with pytest.raises(ValueError, match=r"must not be empty, got shape \[0, 6\]"):
            cp_decompose(torch.zeros(0, 6), 2, bits, alg)
        for shape in ((8, 6), (8, 6, 3, 3)):
            res = cp_decompose(torch.zeros(shape), 3, bits, alg, iters=2)
            assert res.rel_error == 0 and all(not bool(f.any()) for f in res.factors)


def test_all_zero_layer_quantizes_and_rank_ratio_is_bounded_before_allocating():
    torch.manual_seed(0)
    model = vqlab.get_model("lenet5", input_size=8)
    with torch.no_grad():
        model.features[3].weight.zero_()
    vqlab.quantize_(model, QAFConfig(rank_ratio=0.25, iters=2), progress=False)
    assert not bool(model.features[3].weight.any())
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="rank_ratio must be a finite number > 0, got inf"):
        QAFConfig(rank_ratio=float("inf"))
    model = vqlab.get_model("lenet5", input_size=8)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"layer 'features.3': rank_ratio=1000000.0 gives rank 38400000, which "
                                         r"exceeds the largest CP rank 72 of its \[16, 8, 3, 3\] weight"):
        vqlab.quantize_(model, QAFConfig(rank_ratio=1e6), progress=False)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match=r"layer 'features.3': rank=100 exceeds the largest CP rank 72"):
        vqlab.quantize_(model, QAFConfig(rank=100), progress=False)
    assert isinstance(model.features[3], torch.nn.Conv2d)                          # nothing changed
