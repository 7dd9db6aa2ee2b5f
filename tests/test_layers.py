"""VQLinear / VQConv2d: layouts, exactness, gradients, padding, sharing, reassignment, errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqlab.codebook import Codebook, assign
from vqlab.methods.vq import VQConv2d, VQLinear, check_quantizable, weight_segments


def _linear(i=32, o=12, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def _conv(cin=8, cout=6, k=3, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kw)


# ---------------------------------------------------------------- storage

def test_storage_dtypes_shapes_and_layout():
    lin = _linear(32, 12)
    q = VQLinear.from_float(lin, k=16, d=4)
    assert q.indices.shape == (12, 8) and q.indices.dtype == torch.uint8
    assert q.codebook.weight.shape == (1, 16, 4) and (q.k, q.d, q.codebook_groups) == (16, 4, 1)
    # public meaning: W[i, s*d:(s+1)*d] = codebook[indices[i, s]]
    W = q.dequantize()
    i, s = 5, 3
    assert torch.equal(W[i, 12:16], q.codebook.weight[0, int(q.indices[i, s])])
    assert q.bits_per_weight == 1.0  # 4 bits / 4 weights
    big = VQLinear.from_float(_linear(512, 8), k=300, d=4, iters=1)
    assert big.indices.dtype == torch.int16


def test_segments_follow_contract_layouts():
    conv = _conv(8, 6, 3)
    w = conv.weight.detach()
    s_in = weight_segments(conv, 4, segment="input")
    assert torch.equal(s_in, w.permute(0, 2, 3, 1).reshape(6, -1).reshape(-1, 4))
    s_k = weight_segments(conv, 4, segment="kernel")
    assert torch.equal(s_k, w.reshape(6, -1).reshape(-1, 4))


@pytest.mark.parametrize("segment", ["input", "kernel"])
def test_k_equal_to_segments_reproduces_conv_exactly(segment):
    conv = _conv(8, 4, 3)                        # 4 * 72 / 4 = 72 distinct segments
    q = VQConv2d.from_float(conv, k=72, d=4, segment=segment)
    assert torch.equal(q.dequantize(), conv.weight.detach())


def test_k_at_least_distinct_segments_is_exact_with_repeats():
    torch.manual_seed(1)
    pool = torch.randn(5, 4)                     # 5 distinct segments, reused
    lin = nn.Linear(16, 10)
    with torch.no_grad():
        lin.weight.copy_(pool[torch.randint(0, 5, (10, 4))].reshape(10, 16))
    q = VQLinear.from_float(lin, k=8, d=4)       # K=8 >= 5 distinct (40 segments)
    assert torch.equal(q.dequantize(), lin.weight.detach())
    x = torch.randn(3, 16)
    torch.testing.assert_close(q.eval()(x), lin(x), rtol=1e-6, atol=1e-6)   # the LUT sums in another order


# ---------------------------------------------------------------- reconstruction error

def test_mse_falls_as_k_grows_and_d_shrinks():
    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    with torch.no_grad():
        lin.weight.normal_()                     # 16384 unit-gaussian weights

    def mse(k, d):
        q = VQLinear.from_float(lin, k=k, d=d, iters=15, seed=0)
        return (q.dequantize() - lin.weight).pow(2).mean().item()

    # measured: K = 4, 16, 64, 256 at d=4 -> 0.639, 0.334, 0.170, 0.075
    by_k = [mse(k, 4) for k in (4, 16, 64, 256)]
    assert by_k[0] > by_k[1] > by_k[2] > by_k[3]
    assert by_k[0] == pytest.approx(0.639, abs=0.03) and by_k[3] == pytest.approx(0.075, abs=0.02)
    # fixed K=16: shorter segments spend more bits per weight -> lower error (d = 8, 4, 2: 0.575, 0.334, 0.109)
    by_d = [mse(16, d) for d in (8, 4, 2)]
    assert by_d[0] > by_d[1] > by_d[2]
    # equal rate, 2 bits/weight: (K=4, d=1) 0.117 ~ Lloyd-Max's 0.1175, (K=16, d=2) 0.109, (K=256, d=4) 0.075:
    # at equal bits longer segments win (VQ's space-filling gain, plus 16 segments per codeword to fit)
    equal_bits = [mse(4, 1), mse(16, 2), mse(256, 4)]
    assert equal_bits[0] > equal_bits[1] > equal_bits[2]
    assert equal_bits[0] == pytest.approx(0.1175, abs=0.01)


# ---------------------------------------------------------------- forward equals the dense layer

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_linear_eval_and_train_equal_dense(bias, groups):
    lin = _linear(24, 12, bias=bias)
    q = VQLinear.from_float(lin, k=8, d=4, codebook_groups=groups)
    assert q.codebook.weight.shape == (groups, 8, 4)
    x = torch.randn(5, 7, 24)
    ref = F.linear(x, q.dequantize(), q.bias)
    torch.testing.assert_close(q.eval()(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.train()(x), ref, rtol=1e-5, atol=1e-5)


CONV_CASES = [
    dict(stride=1, padding=0),
    dict(stride=2, padding=1),
    dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(stride=1, padding=1, groups=2),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=1, padding=1, padding_mode="reflect"),
    dict(stride=1, padding="same", bias=False, groups=4),
]


@pytest.mark.parametrize("segment", ["input", "kernel"])
@pytest.mark.parametrize("kw", CONV_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_conv_eval_and_train_equal_dense(kw, segment):
    conv = _conv(8, 8, 3, **kw)
    q = VQConv2d.from_float(conv, k=16, d=2, segment=segment, codebook_groups=2)
    dense = _conv(8, 8, 3, **kw)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
    x = torch.randn(2, 8, 9, 10)
    torch.testing.assert_close(q.eval()(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.train()(x), dense(x), rtol=1e-5, atol=1e-5)
    if kw.get("padding_mode", "zeros") == "zeros":
        ref = F.conv2d(x, q.dequantize(), q.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        torch.testing.assert_close(q.eval()(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- padding

def test_d_not_dividing_needs_pad_and_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 'fc' \(Linear\): d=3 does not divide in_features=10.*pad=True"):
        VQLinear.from_float(_linear(10, 4), k=4, d=3, name="fc")
    with pytest.raises(ValueError, match=r"d=4 does not divide in_channels/groups=6 \(segment='input'\)"):
        VQConv2d.from_float(_conv(6, 4), k=4, d=4, name="c")
    with pytest.raises(ValueError, match=r"d=4 does not divide in_channels/groups\*kh\*kw=54"):
        VQConv2d.from_float(_conv(6, 4), k=4, d=4, segment="kernel", name="c")


def test_padded_linear_stores_zero_padded_rows():
    lin = _linear(10, 6)
    q = VQLinear.from_float(lin, k=18, d=4, pad=True)   # rows padded 10 -> 12: 3 segments per row, 18 in all
    assert q.n_pad == 12 and q.indices.shape == (6, 3)
    assert torch.equal(q.dequantize(), lin.weight.detach())     # K = #segments: exact
    x = torch.randn(4, 10)
    torch.testing.assert_close(q.eval()(x), lin(x), rtol=1e-5, atol=1e-6)
    q2 = VQLinear.from_float(lin, k=4, d=4, pad=True)
    ref = F.linear(x, q2.dequantize(), q2.bias)
    assert q2.dequantize().shape == (6, 10)
    torch.testing.assert_close(q2.eval()(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("segment", ["input", "kernel"])
def test_padded_conv_matches_dense(segment):
    conv = _conv(6, 4, 3, padding=1, groups=2)           # cin/groups = 3, not a multiple of d=2
    q = VQConv2d.from_float(conv, k=8, d=2, segment=segment, pad=True)
    if segment == "input":
        assert q.cin_pad == 4 and q.indices.shape == (4, 18)      # 9 positions x 4 padded channels / 2
    else:
        assert q.n_pad == 28 and q.indices.shape == (4, 14)       # 27 -> 28
    x = torch.randn(2, 6, 7, 7)
    ref = F.conv2d(x, q.dequantize(), q.bias, 1, 1, 1, 2)
    torch.testing.assert_close(q.eval()(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.train()(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients

def _scatter_grad(grad_flat, indices, g, k, d):
    m = indices.shape[0]
    offset = (torch.arange(m) // (m // g) * k).unsqueeze(1)
    idx = (indices.long() + offset).reshape(-1)
    return torch.zeros(g * k, d, dtype=grad_flat.dtype).index_add_(0, idx, grad_flat.reshape(-1, d)).reshape(g, k, d)


def test_linear_codebook_grad_is_sum_of_cluster_weight_grads():
    lin = _linear(16, 8)
    q = VQLinear.from_float(lin, k=6, d=4, codebook_groups=2).train()
    x = torch.randn(10, 16)
    target = torch.randn(10, 8)
    ((q(x) - target) ** 2).sum().backward()
    w = q.dequantize().detach().requires_grad_()
    ((F.linear(x, w, q.bias.detach()) - target) ** 2).sum().backward()
    expected = _scatter_grad(w.grad, q.indices, 2, 6, 4)
    torch.testing.assert_close(q.codebook.weight.grad, expected, rtol=1e-5, atol=1e-5)
    assert q.codebook.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("segment", ["input", "kernel"])
def test_conv_codebook_grad_is_sum_of_cluster_weight_grads(segment):
    conv = _conv(4, 6, 3, padding=1)
    q = VQConv2d.from_float(conv, k=5, d=2, segment=segment).train()
    x = torch.randn(2, 4, 6, 6)
    q(x).square().mean().backward()
    w = q.dequantize().detach().requires_grad_()
    F.conv2d(x, w, q.bias.detach(), padding=1).square().mean().backward()
    flat = w.grad.permute(0, 2, 3, 1).reshape(6, -1) if segment == "input" else w.grad.reshape(6, -1)
    torch.testing.assert_close(q.codebook.weight.grad, _scatter_grad(flat, q.indices, 1, 5, 2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- shared codebooks

def test_shared_codebook_is_one_object_and_gets_both_gradients():
    a, b = _linear(8, 6, seed=0), _linear(8, 4, seed=1)
    torch.manual_seed(0)
    book = Codebook.from_tensor(torch.randn(1, 5, 4))
    qa = VQLinear.from_float(a, codebook=book)
    qb = VQLinear.from_float(b, codebook=book)
    assert qa.codebook is qb.codebook is book
    net = nn.Sequential(qa, nn.ReLU(), nn.Linear(6, 8), qb)
    ids = [id(p) for p in net.parameters()]
    assert ids.count(id(book.weight)) == 1
    # indices are nearest codewords of the float weights
    assert torch.equal(qa.indices.long().reshape(-1), assign(a.weight.detach().reshape(-1, 4), book.weight[0]))
    with pytest.raises(ValueError, match="shared codebook has K=5, d=4"):
        VQLinear.from_float(a, k=8, codebook=book)
    xa, xb = torch.randn(3, 8), torch.randn(5, 8)
    qa.train(), qb.train()
    ga = torch.autograd.grad(qa(xa).pow(2).sum(), book.weight)[0]
    gb = torch.autograd.grad(qb(xb).pow(2).sum(), book.weight)[0]
    (qa(xa).pow(2).sum() + qb(xb).pow(2).sum()).backward()   # the shared codewords get both layers' sums
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0
    torch.testing.assert_close(book.weight.grad, ga + gb)


# ---------------------------------------------------------------- reassignment

def test_reassign_every_n_steps_refits_latent_to_nearest_codeword():
    lin = _linear(16, 8)
    q = VQLinear.from_float(lin, k=4, d=4, reassign_every=3)
    assert q.latent is not None and torch.equal(q.latent.detach(), lin.weight.detach())
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.train()
    x = torch.randn(32, 16)
    calls = []
    orig = q.reassign
    q.reassign = lambda *a, **k: calls.append(q.steps) or orig(*a, **k)
    for _ in range(7):
        opt.zero_grad()
        q(x).pow(2).sum().backward()
        opt.step()
    assert calls == [3, 6] and q.steps == 7            # before steps 4 and 7
    assert q.latent.grad is not None and q.latent.grad.abs().sum() > 0   # straight-through grad
    q.reassign()
    expect = assign(q.latent.detach().reshape(-1, 4), q.codebook.weight.detach()[0])
    assert torch.equal(q.indices.long().reshape(-1), expect)
    with torch.no_grad():                               # eval and no-grad forwards do not count
        q.eval()(x)
        q.train()(x)
    assert q.steps == 7


def test_reassign_without_latent_needs_a_weight():
    q = VQLinear.from_float(_linear(16, 8), k=4, d=4)
    assert q.latent is None
    with pytest.raises(RuntimeError, match="reassign_every > 0"):
        q.reassign()
    before = q.indices.clone()
    changed = q.reassign(torch.zeros(8, 16))             # every segment -> the codeword nearest 0
    assert len(set(q.indices.reshape(-1).tolist())) == 1
    assert changed == int((q.indices != before).sum()) > 0


# ---------------------------------------------------------------- bad input

def test_bad_inputs_name_layer_and_value():
    lin = _linear(16, 8)
    with pytest.raises(ValueError, match=r"layer 'fc1' \(Linear\): codebook size K must be an integer >= 2, got K=1"):
        VQLinear.from_float(lin, k=1, d=4, name="fc1")
    with pytest.raises(ValueError, match=r"layer 'fc1' \(Linear\): K=64 is larger than the 32 segments"):
        VQLinear.from_float(lin, k=64, d=4, name="fc1")
    with pytest.raises(ValueError, match=r"codebook groups G=3 must be a positive divisor of the 8 output"):
        VQLinear.from_float(lin, k=4, d=4, codebook_groups=3, name="fc1")
    bad = _linear(16, 8)
    with torch.no_grad():
        bad.weight[2, 3] = float("nan")
        bad.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'fc2' \(Linear\): weight has 2 non-finite"):
        VQLinear.from_float(bad, k=4, d=4, name="fc2")
    with pytest.raises(TypeError, match=r"layer 'bn' \(BatchNorm1d\).*supports nn.Linear and nn.Conv2d"):
        check_quantizable(nn.BatchNorm1d(4), 4, 2, name="bn")
    with pytest.raises(ValueError, match="segment must be 'input' or 'kernel', got 'rows'"):
        VQConv2d.from_float(_conv(), k=4, d=2, segment="rows", name="c")


def test_codebook_dtype_and_eval_kernel_dtype():
    lin = _linear(16, 8)
    q = VQLinear.from_float(lin, k=4, d=4, codebook_dtype=torch.float16)
    assert q.codebook.weight.dtype == torch.float16
    x = torch.randn(2, 16)
    y = q.eval()(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, q.dequantize().float(), q.bias), rtol=1e-3, atol=1e-3)
