"""Magnitude pruning with a pinned zero codeword (VQConfig(prune=p), issue 17 item 2): the smallest segments go to
codeword 0 = 0, which training keeps exactly zero and re-assignment never gives or takes segments."""
import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqlab import Codebook
from vqlab.data import load_dataset
from vqlab.io import load, save
from vqlab.codebook import fit_codebook, fit_pruned_codebook, prune_count
from vqlab.methods.vq import VQConv2d, VQLinear, weight_segments
from vqlab.models import get_model
from vqlab.methods.vq import VQConfig
from vqlab.quantize import all_layers, quantize_
from vqlab.size import compressed_size
from vqlab.train import fit


def _vq_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (VQLinear, VQConv2d))}


def _check_pruned_layer(float_layer: nn.Module, q: nn.Module, prune: float, groups: int, **seg) -> None:
    """The pruned segments are exactly the prune_count smallest-norm segments of each group of the float weight;
    codeword 0 and the rebuilt weight there are exactly zero; every other segment sits on its nearest of 1..K-1."""
    segs = weight_segments(float_layer, q.d, **seg).reshape(groups, -1, q.d)       # (G, N_g, d)
    idx = q.indices.long().reshape(groups, -1)                                     # (G, N_g)
    n_g = segs.shape[1]
    for j in range(groups):
        norms = segs[j].double().norm(dim=1)
        assert len(set(norms.tolist())) == n_g                                    # no ties: the set is unique
        smallest = set(norms.argsort()[: prune_count(n_g, prune)].tolist())
        assert set((idx[j] == 0).nonzero().flatten().tolist()) == smallest
        book = q.codebook.weight[j].detach()
        assert torch.equal(book[0], torch.zeros(q.d))
        kept = idx[j] != 0
        nearest = torch.cdist(segs[j][kept].double(), book[1:].double()).argmin(1) + 1
        assert torch.equal(idx[j][kept], nearest)
    flat = q.code.rows().detach().reshape(groups, -1, q.d)
    assert torch.equal(flat[idx == 0], torch.zeros(int((idx == 0).sum()), q.d))


def test_linear_prune_half_the_smallest_segments():
    torch.manual_seed(0)
    lin = nn.Linear(30, 12)                                   # d=3: 10 segments per row, 120 in all
    q = VQLinear.from_float(lin, 8, 3, prune=0.5)
    assert q.pinned_zero and q.code.pinned_zero
    assert int((q.indices == 0).sum()) == round(0.5 * 120) == 60
    _check_pruned_layer(lin, q, 0.5, 1)
    assert q.code.describe()["sparsity"] == 0.5
    # eval (the kernels read codebook.weight itself) agrees with the rebuilt weight, which is zero where pruned
    x = torch.randn(5, 30)
    q.eval()
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), q.bias))


@pytest.mark.parametrize("segment", ["input", "kernel"])
def test_conv2d_prune_per_codebook_group_rounds_half_up(segment):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, padding=1)                      # d=2, G=2: 3 rows x 27 = 81 segments per group
    q = VQConv2d.from_float(conv, 16, 2, codebook_groups=2, segment=segment, prune=0.5)
    per_group = (q.indices.reshape(2, -1) == 0).sum(1).tolist()
    assert per_group == [41, 41] and prune_count(81, 0.5) == math.floor(40.5 + 0.5) == 41  # 40.5 rounds up
    _check_pruned_layer(conv, q, 0.5, 2, segment=segment)
    x = torch.randn(2, 6, 7, 7)
    q.eval()
    torch.testing.assert_close(q(x), F.conv2d(x, q.dequantize(), q.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_kmeans_sees_only_the_unpruned_segments():
    torch.manual_seed(2)
    segs = torch.randn(2, 50, 4)
    book, codes = fit_pruned_codebook(segs, 6, 0.3, seed=3)
    cut = prune_count(50, 0.3)                                # 15
    for j in range(2):
        keep = segs[j].norm(dim=1).argsort()[cut:].sort().values
        ref_book, ref_codes = fit_codebook(segs[j : j + 1, keep], 5, seed=3 + j)
        assert torch.equal(book[j, 1:], ref_book[0]) and torch.equal(book[j, 0], torch.zeros(4))
        assert torch.equal(codes[j, keep], ref_codes[0] + 1)
        assert int((codes[j] == 0).sum()) == cut


def test_reassign_keeps_the_pattern():
    torch.manual_seed(3)
    q = VQLinear.from_float(nn.Linear(16, 8), 4, 2, prune=0.5, reassign_every=5)
    pruned = q.indices == 0
    with torch.no_grad():   # pruned segments far from zero, the others exactly zero: nearest would swap them
        segs = q.latent.view(8, 8, 2)
        segs[pruned] = 100.0
        segs[~pruned] = 0.0
    q.reassign()
    assert torch.equal(q.indices == 0, pruned)
    # an explicit weight is re-assigned the same way
    q.reassign(torch.zeros(8, 16))
    assert torch.equal(q.indices == 0, pruned) and bool((q.indices[~pruned] > 0).all())


def _digits_lenet(cfg: VQConfig) -> nn.Module:
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    fit(model, load_dataset("digits", "train"), epochs=1, progress=False, device="cpu")
    quantize_(model, cfg, progress=False)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {n: (m.indices == 0, m.codebook.weight.detach().float().clone()) for n, m in _vq_layers(model).items()}


def _assert_zero_kept(model: nn.Module, before: dict) -> None:
    layers = _vq_layers(model)
    assert set(layers) == set(before) and layers
    for n, m in layers.items():
        mask, book = before[n]
        w = m.codebook.weight.detach()
        assert m.pinned_zero
        assert bool((w[:, 0] == 0).all()), f"{n}: codeword 0 moved: {w[:, 0]}"
        assert torch.equal(m.indices == 0, mask), f"{n}: the pruned set changed"
        assert not torch.equal(w[:, 1:].float(), book[:, 1:]), f"{n}: the learned codewords did not train"


@pytest.mark.parametrize("codebook_dtype", ["float32", "float16"])
def test_fit_with_reassign_keeps_the_zero_codeword(codebook_dtype):
    model = _digits_lenet(VQConfig(k=16, d=2, prune=0.5, reassign_every=5, codebook_dtype=codebook_dtype))
    layers = _vq_layers(model)
    assert sorted(layers) == ["classifier.1", "classifier.3", "features.3"]
    assert all(m.codebook.weight.dtype == getattr(torch, codebook_dtype) for m in layers.values())
    before = _snapshot(model)
    fit(model, load_dataset("digits", "train"), epochs=3, max_steps=30, lr=3e-3, progress=False, device="cpu")
    assert all(m.steps == 30 and m.latent is not None for m in layers.values())   # re-assigned at steps 5..25
    _assert_zero_kept(model, before)


def test_prune_zero_is_bit_identical(tmp_path):
    a = _digits_lenet(VQConfig(k=16, d=2))
    b = _digits_lenet(VQConfig(k=16, d=2, prune=0.0))
    assert VQConfig(k=16, d=2, prune=0) == VQConfig(k=16, d=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    for (_, qa), (_, qb) in zip(_vq_layers(a).items(), _vq_layers(b).items()):
        assert not qa.pinned_zero and not qb.pinned_zero and "_pinned_zero" not in qb.code.__dict__
        assert qa.code.describe() == qb.code.describe() and "sparsity" not in qb.code.describe()
    save(a, tmp_path / "a.vqlab")
    save(b, tmp_path / "b.vqlab")
    assert (tmp_path / "a.vqlab").read_bytes() == (tmp_path / "b.vqlab").read_bytes()


def test_save_load_keeps_the_pinned_zero(tmp_path):
    model = _digits_lenet(VQConfig(k=16, d=2, prune=0.5, reassign_every=5))
    path = tmp_path / "pruned.vqlab"
    save(model, path)
    loaded = load(path)
    for (n, q), (_, r) in zip(_vq_layers(model).items(), _vq_layers(loaded).items()):
        assert r.pinned_zero and r.code.config()["pinned_zero"] is True, n
        assert torch.equal(q.indices, r.indices) and torch.equal(q.codebook.weight, r.codebook.weight)
    before = _snapshot(loaded)
    fit(loaded, load_dataset("digits", "train"), epochs=2, max_steps=15, lr=3e-3, progress=False, device="cpu")
    _assert_zero_kept(loaded, before)
    # a file whose pinned codeword 0 is not zero is refused (save validates too)
    bad = copy.deepcopy(loaded)
    with torch.no_grad():
        next(iter(_vq_layers(bad).values())).codebook.weight[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="codeword 0 must be exactly zero"):
        save(bad, tmp_path / "bad.vqlab")


def test_pruning_lowers_the_index_entropy():
    torch.manual_seed(4)
    plain, pruned = nn.Sequential(nn.Linear(64, 64)), nn.Sequential(nn.Linear(64, 64))
    pruned.load_state_dict(plain.state_dict())
    cfg = dict(k=16, d=2)
    quantize_(plain, VQConfig(**cfg), filter_fn=all_layers, progress=False)
    quantize_(pruned, VQConfig(**cfg, prune=0.5), filter_fn=all_layers, progress=False)
    a, b = compressed_size(plain), compressed_size(pruned)
    assert a.index_bytes == b.index_bytes                     # still K-ary packed indices
    assert b.huffman_bytes < a.huffman_bytes and b.ans_bytes < a.ans_bytes


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_prune_values_are_named(bad):
    with pytest.raises(ValueError, match=r"prune.*" + re.escape(repr(bad))):
        VQConfig(k=16, d=2, prune=bad)
    with pytest.raises(ValueError, match=r"layer 'fc'.*prune"):
        VQLinear.from_float(nn.Linear(8, 4), 4, 2, prune=bad, name="fc")


def test_prune_needs_k3_and_an_own_codebook():
    with pytest.raises(ValueError, match="K >= 3"):
        VQConfig(k=2, d=2, prune=0.5)
    with pytest.raises(ValueError, match="codebook='shared'"):
        VQConfig(k=16, d=2, prune=0.5, codebook="shared")
    book = Codebook(8, 2)
    with pytest.raises(ValueError, match="Codebook object"):
        VQConfig(codebook=book, prune=0.5)
    with pytest.raises(ValueError, match="shared codebook"):
        VQLinear.from_float(nn.Linear(8, 4), codebook=book, prune=0.5)
    with pytest.raises(ValueError, match="K >= 3"):
        VQLinear.from_float(nn.Linear(8, 4), 2, 2, prune=0.5)
    # too few unpruned segments for the K-1 learned codewords: quantize_ refuses before changing anything
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))  # 4 segments, 3 pruned at 0.75, 1 < K-1 = 2
    with pytest.raises(ValueError, match=r"layer '0'.*prune=0.75 leaves 1 of the 4 segments"):
        quantize_(model, VQConfig(k=3, d=2, prune=0.75), filter_fn=all_layers, progress=False)
    assert isinstance(model[0], nn.Linear)
