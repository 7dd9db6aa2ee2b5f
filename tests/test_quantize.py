"""VQConfig validation and quantize_: layer choice, overrides, report, errors, accuracy after fine-tuning."""
import re

import pandas as pd
import pytest
import torch
import torch.nn as nn

from vqlab.layers import VQConv2d, VQLinear
from vqlab.models import get_model
from vqlab.quantize import VQConfig, quantize_

from conftest import needs_fashion

REPORT_COLUMNS = ["layer", "type", "shape", "K", "d", "bits_per_weight", "weight_mse", "params_before",
                  "params_after", "status"]


def _lenet(seed=0):
    torch.manual_seed(seed)
    return get_model("lenet5", input_size=8)   # digits variant: 3x3 convs, fc 64-120-84-10


# ---------------------------------------------------------------- VQConfig

@pytest.mark.parametrize("kw, msg", [
    (dict(k=1), r"VQConfig.k must be an integer >= 2, got 1"),
    (dict(d=0), r"VQConfig.d must be an integer >= 1, got 0"),
    (dict(k=2.5), r"VQConfig.k must be an integer >= 2, got 2.5"),
    (dict(init="pca"), r"VQConfig.init must be 'kmeans\+\+' or 'random', got 'pca'"),
    (dict(segment="row"), r"VQConfig.segment must be 'input' or 'kernel', got 'row'"),
    (dict(codebook="global"), r"VQConfig.codebook must be 'layer', 'group' or 'shared', got 'global'"),
    (dict(codebook="group"), r"VQConfig.groups must be >= 2 with codebook='group', got groups=1"),
    (dict(groups=4), r"VQConfig.groups=4 needs codebook='group'"),
    (dict(batch_size=0), r"VQConfig.batch_size must be an integer >= 1, got 0"),
    (dict(reassign_every=-1), r"VQConfig.reassign_every must be an integer >= 0, got -1"),
    (dict(codebook_dtype=torch.int8), r"VQConfig.codebook_dtype must be a float dtype .* got torch.int8"),
    (dict(codebook_dtype="int4"), r"VQConfig.codebook_dtype 'int4' is not a float dtype"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        VQConfig(**kw)


def test_config_normalises_and_is_frozen():
    c = VQConfig(k=16, d=2, codebook_dtype="float16")
    assert c.codebook_dtype is torch.float16 and c.bits_per_weight == 2.0
    with pytest.raises(Exception):
        c.k = 4
    assert VQConfig(k=16, d=2, codebook_dtype="float16") == c and hash(c) == hash(VQConfig(k=16, d=2, codebook_dtype=torch.float16))


# ---------------------------------------------------------------- quantize_

def test_quantize_keeps_first_and_last_float_and_reports():
    model = _lenet()
    x = torch.randn(4, 1, 8, 8)
    report = quantize_(model, VQConfig(k=64, d=4, iters=10), progress=False)
    assert list(report.columns) == REPORT_COLUMNS
    assert report["layer"].tolist() == ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    assert report["status"].tolist() == ["float (first conv)", "vq", "vq", "vq", "float (last linear)"]
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier[5]) is nn.Linear
    assert isinstance(model.features[3], VQConv2d) and isinstance(model.classifier[1], VQLinear)
    r = report.set_index("layer")
    # conv 8->16 3x3: 1152 weights, +16 bias; 288 indices + 16 bias + 64*4 codebook
    assert r.loc["features.3", "shape"] == (16, 8, 3, 3)
    assert r.loc["features.3", "params_before"] == 1168 and r.loc["features.3", "params_after"] == 288 + 16 + 256
    assert r.loc["classifier.1", "bits_per_weight"] == 1.5 and r.loc["features.0", "bits_per_weight"] == 32.0
    assert r.loc["classifier.1", "K"] == 64 and pd.isna(r.loc["features.0", "K"])
    # weight_mse is the measured error of the stored weight
    assert 0 < r.loc["classifier.3", "weight_mse"] < 1e-2
    model.eval()
    y = model(x)
    dense = _lenet()
    with torch.no_grad():
        for name in ("features.3", "classifier.1", "classifier.3"):
            dense.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize())
    torch.testing.assert_close(y, dense.eval()(x), rtol=1e-4, atol=1e-5)


def test_weight_mse_in_report_is_measured():
    model, ref = _lenet(), _lenet()
    report = quantize_(model, VQConfig(k=16, d=2, iters=5), progress=False).set_index("layer")
    w0 = ref.classifier[3].weight.detach()
    mse = (model.classifier[3].dequantize() - w0).pow(2).mean().item()
    assert report.loc["classifier.3", "weight_mse"] == pytest.approx(mse, rel=1e-6)


def test_overrides_filter_and_first_last():
    model = _lenet()
    report = quantize_(model, VQConfig(k=16, d=4, iters=5), progress=False,
                       overrides={"classifier.3": None, re.compile(r"classifier\.[5]"): VQConfig(k=4, d=2, iters=5)},
                       filter_fn=lambda m, name: not isinstance(m, nn.Conv2d))
    st = report.set_index("layer")["status"].to_dict()
    assert st == {"features.0": "skipped (filter_fn)", "features.3": "skipped (filter_fn)", "classifier.1": "vq",
                  "classifier.3": "skipped (override)", "classifier.5": "vq (override)"}
    assert model.classifier[5].k == 4 and model.classifier[1].k == 16
    assert type(model.classifier[3]) is nn.Linear
    model2 = _lenet()
    quantize_(model2, VQConfig(k=8, d=1, iters=5, quantize_first_last=True), progress=False)
    assert isinstance(model2.features[0], VQConv2d) and isinstance(model2.classifier[5], VQLinear)


def test_group_and_shared_codebooks():
    model = _lenet()
    quantize_(model, VQConfig(k=8, d=4, iters=5, codebook="group", groups=4), progress=False)
    assert model.classifier[1].codebook.weight.shape == (4, 8, 4)
    model = _lenet()
    report = quantize_(model, VQConfig(k=32, d=4, iters=5, codebook="shared"), progress=False)
    books = {id(model.get_submodule(n).codebook) for n in ("features.3", "classifier.1", "classifier.3")}
    assert len(books) == 1
    pa = report.set_index("layer")["params_after"]
    assert pa["features.3"] == 288 + 16 + 32 * 4 and pa["classifier.1"] == 120 * 64 // 4 + 120   # codebook once


def test_override_on_norm_layer_is_an_error_naming_it():
    model = get_model("resnet20", in_channels=1)
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=r"override 'layers.0.\*' asks to quantize layer 'layers.0.bn1' \(BatchNorm2d\)"):
        quantize_(model, VQConfig(k=16, d=4), overrides={"layers.0.*": VQConfig(k=16, d=4)}, progress=False)
    vit = get_model("vit_tiny")
    with pytest.raises(TypeError, match=r"'blocks.0.norm1' \(LayerNorm\)"):
        quantize_(vit, VQConfig(k=16, d=4), overrides={"blocks.0.norm*": VQConfig()}, progress=False)
    assert [type(m) for m in model.modules()] == before
    # a pattern that matches only Linear/Conv layers is fine
    quantize_(model, VQConfig(k=16, d=4, iters=3), overrides={"layers.0.conv*": VQConfig(k=8, d=4, iters=3)},
              progress=False)
    assert model.layers[0].conv1.k == 8 and model.layers[1].conv1.k == 16


def test_bad_inputs_raise_before_anything_changes():
    model = _lenet()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"override pattern 'head\*' matches no module"):
        quantize_(model, VQConfig(), overrides={"head*": None}, progress=False)
    with pytest.raises(ValueError, match=r"layer 'classifier.3' \(Linear\): d=7 does not divide in_features=120"):
        quantize_(model, VQConfig(k=4, d=4), overrides={"classifier.3": VQConfig(k=4, d=7)}, progress=False)
    with pytest.raises(ValueError, match=r"layer 'features.3' \(Conv2d\): K=4096 is larger than the 288 segments"):
        quantize_(model, VQConfig(k=4096, d=4), progress=False)
    with torch.no_grad():
        model.classifier[3].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'classifier.3' \(Linear\): weight has 1 non-finite"):
        quantize_(model, VQConfig(k=4, d=4), progress=False)
    assert [type(m) for m in model.modules()] == before          # nothing was swapped
    with pytest.raises(TypeError, match="config must be one of"):
        quantize_(model, {"k": 4}, progress=False)


def test_pad_allows_any_d():
    model = _lenet()
    report = quantize_(model, VQConfig(k=8, d=3, iters=5, pad=True), progress=False).set_index("layer")
    # 120 inputs -> padded to 120 (3 | 120); 64 -> 66: 22 indices per row
    assert model.classifier[1].indices.shape == (120, 22) and model.classifier[1].dequantize().shape == (120, 64)
    assert report.loc["classifier.1", "bits_per_weight"] == pytest.approx(3 * 22 / 64)
    x = torch.randn(2, 1, 8, 8)
    assert torch.isfinite(model.eval()(x)).all()


# ---------------------------------------------------------------- accuracy after fine-tuning (real data)

@pytest.mark.slow
@needs_fashion
def test_lenet5_fashion_mnist_k256_d4_within_one_point_of_float():
    from vqlab.data import load_dataset
    from vqlab.size import compressed_size
    from vqlab.train import evaluate, fit

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    torch.manual_seed(0)
    model = get_model("lenet5")
    fit(model, train, epochs=3, lr=2e-3, batch_size=128, seed=0, progress=False, device="cpu")
    float_acc = evaluate(model, test, device="cpu")
    report = quantize_(model, VQConfig(k=256, d=4, seed=0), progress=False)
    assert report["status"].tolist() == ["float (first conv)", "vq", "vq", "vq", "float (last linear)"]
    ptq_acc = evaluate(model, test, device="cpu")
    fit(model, train, epochs=1, lr=5e-4, batch_size=128, seed=1, progress=False, device="cpu")
    vq_acc = evaluate(model, test, device="cpu")
    size = compressed_size(model)
    print(f"\nLeNet-5 fashion-mnist: float {float_acc:.4f}, VQ before fine-tune {ptq_acc:.4f}, "
          f"after 1 epoch {vq_acc:.4f}; ratio {size.ratio:.2f}")
    # measured (seed 0, CPU): float 0.8897; VQ 0.8843 before, 0.8892 after one epoch of fine-tuning; ratio 7.65
    assert float_acc > 0.86
    assert vq_acc >= float_acc - 0.01
    assert size.ratio > 5
