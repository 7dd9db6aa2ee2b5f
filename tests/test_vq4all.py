"""VQ4ALL (vqlab.methods.vq4all): the KDE-sampled universal codebook, candidate assignments and their ratios,
progressive network construction, the plain-VQ networks it ends in, and one codebook counted once (or not at
all, in ROM) across three architectures, through quantize_, compressed_size, save/load and count_flops."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import vqlab
from vqlab import QuantizedConv2d, QuantizedLinear, VQConfig, all_layers, compressed_size, quantize_
from vqlab.methods.vq import VQConv2d, VQLinear
from vqlab.methods import vq4all
from vqlab.methods.vq4all import VQ4ALLCode, VQ4ALLConfig


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.ReLU(), nn.Linear(32, 10)).eval()


def _mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(),
                         nn.Linear(24, 10)).eval()


def _bn_net(seed=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                         nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_universal_codebook_is_a_frozen_kde_sample_reproducible_from_its_seed():
    models = [_cnn(), _mlp()]
    book = vq4all.universal_codebook(models, k=32, d=4, seed=3)
    assert isinstance(book, vqlab.Codebook) and book.frozen and tuple(book.weight.shape) == (1, 32, 4)
    assert torch.equal(book.weight, vq4all.universal_codebook(models, k=32, d=4, seed=3).weight)
    assert not torch.equal(book.weight, vq4all.universal_codebook(models, k=32, d=4, seed=4).weight)
    pool = vq4all.pooled_subvectors(models, 4)
    # every Linear/Conv2d whose row length 4 divides (the first conv's rows of 9 are left out)
    assert len(pool) == sum(m.weight.numel() // 4 for net in models for m in net.modules()
                            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight[0].numel() % 4 == 0)
    n = len(pool)
    assert vq4all.kde_bandwidth(n, 4) == pytest.approx(n ** (-1 / 8))                 # Scott's rule
    assert vq4all.kde_bandwidth(n, 4, "silverman") == pytest.approx((n * 6 / 4) ** (-1 / 8))
    # a tiny bandwidth samples the pooled points themselves; Scott's spreads them by h * the data's spread
    tight = vq4all.universal_codebook(models, k=32, d=4, bandwidth=1e-9, seed=3).weight[0]
    assert torch.cdist(tight.double(), pool.double()).min(1).values.max() < 1e-6
    noise = book.weight[0] - tight
    assert 0.2 < noise.std().item() / (pool.std().item() * vq4all.kde_bandwidth(n, 4)) < 5
    with pytest.raises(ValueError, match="bandwidth"):
        vq4all.universal_codebook(models, k=8, d=4, bandwidth=-1.0)


def test_candidates_are_the_n_nearest_with_equal_ratios_and_the_mean_forward():
    model = _cnn()
    book = vq4all.universal_codebook([model], k=32, d=4)
    w = model[4].weight.detach().clone()
    report = quantize_(model, VQ4ALLConfig(codebook=book, candidates=3, alpha=0.8), progress=False)
    assert report["status"].tolist() == ["float (first conv)", "vq4all", "vq4all", "float (last linear)"]
    assert isinstance(model[2], QuantizedConv2d) and isinstance(model[4], QuantizedLinear)
    code = model[4].code
    assert isinstance(code, VQ4ALLCode) and code.codebook is book and model[2].code.codebook is book
    dist = torch.cdist(w.reshape(-1, 4), book.weight[0])
    want = dist.argsort(1)[:, :3]
    assert torch.equal(code.cands.long().reshape(-1, 3), want)                        # n nearest, nearest first
    r = code.ratios()
    assert torch.allclose(r, torch.full_like(r, 1 / 3)) and torch.allclose(r.sum(-1), torch.ones(r.shape[:-1]))
    mean = book.weight[0][code.cands.long()].mean(2).reshape(32, 256)
    assert torch.allclose(code.rows(), mean, atol=1e-6)
    x = torch.randn(5, 256)
    assert torch.allclose(model[4](x), F.linear(x, mean, model[4].bias), atol=1e-5)
    assert code.describe() == {"method": "vq4all", "setting": "K=32 d=4 candidates=3", "K": 32, "d": 4,
                               "bits_per_weight": 5 / 4}


def test_alpha_zero_fixes_everything_at_the_nearest_codeword_which_is_plain_vq():
    model, plain = _cnn(), _cnn()
    book = vq4all.universal_codebook([model], k=32, d=4)
    quantize_(model, VQ4ALLConfig(codebook=book, candidates=4, alpha=0.0), progress=False)
    quantize_(plain, VQConfig(codebook=book, segment="kernel"), progress=False)
    assert vq4all.fix_assignments(model) == sum(c.fixed.numel() for c in vq4all.vq4all_codes(model))
    assert vq4all.fixed_fraction(model) == 1.0
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    assert vq4all.finalize(model) == 2
    for i, cls in ((2, VQConv2d), (4, VQLinear)):
        assert isinstance(model[i], cls) and model[i].codebook is book
        assert torch.equal(model[i].indices, plain[i].indices)
    assert torch.allclose(model(x), plain(x), atol=1e-6) and torch.allclose(model(x), before, atol=1e-5)


def test_progressive_fit_fixes_more_each_round_and_ends_as_the_plain_vq_network():
    model = _cnn()
    book = vq4all.universal_codebook([model, _mlp()], k=16, d=4)
    quantize_(model, VQ4ALLConfig(codebook=book, candidates=4, alpha=0.3), progress=False)
    biases = [model[i].bias.detach().clone() for i in (0, 2, 4, 6)]
    hist = vq4all.progressive_fit(model, _data(), rounds=4, steps_per_round=6, lr=0.1, batch_size=32, progress=False)
    fractions = hist["fixed_fraction"].tolist()
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and hist["fixed_now"].sum() > 0
    assert hist["fixed_fraction"].iloc[0] > 0                                          # alpha passed after training
    assert all(torch.equal(model[i].bias, b) for i, b in zip((0, 2, 4, 6), biases))   # only the ratios trained
    assert book.weight.grad is None
    for c in vq4all.vq4all_codes(model):
        r = c.ratios()
        assert torch.allclose(r.sum(-1), torch.ones(r.shape[:-1])) and set(r.unique().tolist()) <= {0.0, 1.0}
    ids = {i: model[i].code.chosen_indices() for i in (2, 4)}
    x = torch.randn(6, 1, 8, 8)
    before = model(x)
    vq4all.finalize(model)
    plain = _cnn()
    quantize_(plain, VQConfig(codebook=book, segment="kernel"), progress=False)
    for i in (2, 4):
        assert torch.equal(model[i].indices.long(), ids[i])
        plain[i].indices = ids[i].to(plain[i].indices.dtype)
    assert torch.allclose(model(x), before, atol=1e-5) and torch.allclose(model(x), plain(x), atol=1e-6)


def test_three_architectures_share_one_codebook_counted_once_or_in_rom(tmp_path):
    nets = [_cnn(), _mlp(), _bn_net()]
    book = vq4all.universal_codebook(nets, k=64, d=4)
    cfg = VQ4ALLConfig(codebook=book, candidates=2)
    for net in nets:
        quantize_(net, cfg, filter_fn=all_layers, overrides={"0": None} if net is not nets[1] else None,
                  progress=False)  # rows of 9
        vq4all.fix_assignments(net, force=True)
        vq4all.finalize(net)
    layers = [m for net in nets for m in net.modules() if isinstance(m, (VQLinear, VQConv2d))]
    assert len(layers) == 2 + 1 + 3 + 3 and all(m.codebook is book for m in layers)
    book_bytes = 64 * 4 * 4
    size = compressed_size(nets)
    assert size.codebook_bytes == book_bytes
    assert size.per_model["codebook_bytes"].tolist() == [book_bytes, 0, 0]
    assert size.compressed_bytes == sum(compressed_size(n).compressed_bytes for n in nets) - 2 * book_bytes
    rom = compressed_size(nets, codebook_in_rom=True)
    assert rom.codebook_bytes == 0 and rom.compressed_bytes == size.compressed_bytes - book_bytes
    assert rom.dense_bytes == size.dense_bytes and rom.ratio > size.ratio
    # one file for the three networks: bit-exact, the codebook one object again, the counted bytes + metadata
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / "three.vqz"
    nbytes = vqlab.save(nets, path)
    assert nbytes == os.path.getsize(path) and 0 <= nbytes - size.compressed_bytes <= 0.01 * nbytes + 4096
    back = vqlab.load(path)
    books = {id(m.codebook) for net in back for m in net.modules() if isinstance(m, (VQLinear, VQConv2d))}
    assert len(books) == 1
    for a, b in zip(nets, back):
        assert torch.equal(a(x), b(x))
    df = vqlab.count_flops(nets[0], (2, 1, 8, 8))
    assert (df.loc[df["type"] == "VQLinear", "vq_table_flops"] > 0).all()


def test_training_stage_code_saves_bit_exact_and_counts_what_it_stores(tmp_path):
    model = _cnn()
    book = vq4all.universal_codebook([model], k=32, d=4)
    quantize_(model, VQ4ALLConfig(codebook=book, candidates=3, alpha=0.5), progress=False)
    with torch.no_grad():
        for c in vq4all.vq4all_codes(model):
            c.logits.normal_(generator=torch.Generator().manual_seed(0))
    vq4all.fix_assignments(model)
    code = model[4].code
    assert 0 < code.fixed_fraction < 1
    size = compressed_size(model)
    c = code.size(set())
    assert c.index_bytes == -(-code.cands.numel() * 5 // 8) + -(-code.choice.numel() * 2 // 8) + -(-code.fixed.numel() // 8)
    assert c.other_bytes == code.logits.numel() * 4 and c.codebook_bytes == 32 * 4 * 4
    path = tmp_path / "stage.vqz"
    nbytes = vqlab.save(model, path)
    assert 0 <= nbytes - size.compressed_bytes <= 0.01 * nbytes + 4096
    back = vqlab.load(path)
    bc = back[4].code
    assert isinstance(bc, VQ4ALLCode) and bc.codebook is back[2].code.codebook and bc.codebook.frozen
    for name in ("cands", "choice", "fixed", "logits"):
        assert torch.equal(getattr(bc, name), getattr(code, name))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(back(x), model(x))
    df = vqlab.count_flops(model, (3, 1, 8, 8))                   # a dense product until finalize
    assert (df["vq_flops"] == df["dense_flops"]).all()


def test_config_errors_leave_the_model_untouched():
    model = _cnn()
    book = vq4all.universal_codebook([model], k=8, d=4)
    with pytest.raises(TypeError, match="Codebook"):
        VQ4ALLConfig(codebook="shared")
    with pytest.raises(ValueError, match="candidates"):
        VQ4ALLConfig(codebook=book, candidates=9)
    with pytest.raises(ValueError, match="alpha"):
        VQ4ALLConfig(codebook=book, alpha=1.0)
    with pytest.raises(ValueError, match=r"layer '0'.*row length 9"):
        quantize_(model, VQ4ALLConfig(codebook=book), filter_fn=all_layers, progress=False)
    assert isinstance(model[2], nn.Conv2d)
    quantize_(model, VQ4ALLConfig(codebook=book), progress=False)
    with pytest.raises(ValueError, match="free sub-vectors"):
        vq4all.finalize(copy.deepcopy(model))
    with pytest.raises(ValueError, match="no VQ4ALL layer"):
        vq4all.progressive_fit(_cnn(), _data(), progress=False)


def test_universal_codebook_names_what_is_wrong():
    """Issue 27: universal_codebook(["x"]) raised AttributeError, NaN weights a Cholesky error naming no layer."""
    from vqlab.methods.vq4all import VQ4ALLConfig, universal_codebook
    torch.manual_seed(0)
    good = vqlab.get_model("lenet5", input_size=8)
    with pytest.raises(TypeError, match=r"models\[1\] must be a torch.nn.Module, got str"):
        universal_codebook([good, "x"], k=16, d=2)
    for bad in ("x", 3, None):
        with pytest.raises(TypeError, match="models must be an nn.Module or a list of them"):
            universal_codebook(bad, k=16, d=2)
    with pytest.raises(ValueError, match="at least one"):
        universal_codebook([], k=16, d=2)
    sick = vqlab.get_model("lenet5", input_size=8)
    with torch.no_grad():
        sick.features[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"models\[1\] layer 'features.3': the weight has 1 non-finite value"):
        universal_codebook([good, sick], k=16, d=2)
    book = universal_codebook(good, k=16, d=2)
    with pytest.raises(ValueError, match=r"layer 'features.3': the weight has 1 non-finite value"):
        vqlab.quantize_(sick, VQ4ALLConfig(codebook=book), progress=False)
