"""The seam holds: a quantizer defined here, outside vqlab, plugs into quantize_, compressed_size, save/load
and count_flops through the public API alone; one frozen codebook serves three models and is counted and
stored once."""
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import vqlab
from vqlab import (Codebook, CodeSize, QuantizedConv2d, QuantizedLinear, VQConfig, WeightCode, compressed_size,
                   count_flops, fit, quantize_, register_code, register_handler)


# ---------------------------------------------------------------- a method vqlab does not know: sign binarization

@register_code
class SignCode(WeightCode):
    """W ~ alpha * sign(W): one bit per weight, one float32 alpha per output row (the mean |w| of the row)."""

    kind = "test_sign"
    method = "sign"

    def __init__(self, rows: int, n: int):
        super().__init__()
        self.register_buffer("signs", torch.zeros(rows, n, dtype=torch.uint8))
        self.register_buffer("alpha", torch.zeros(rows))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "SignCode":
        flat = w.detach().reshape(len(w), -1)
        code = cls(*flat.shape)
        code.signs.copy_(flat >= 0)
        code.alpha.copy_(flat.abs().mean(1))
        return code

    @property
    def shape(self):
        return tuple(self.signs.shape)

    def rows(self):
        return self.alpha[:, None] * (2.0 * self.signs.float() - 1.0)

    def size(self, seen):
        return CodeSize(index_bytes=vqlab.bits.packed_bytes(self.signs.numel(), 1),
                        other_bytes=self.alpha.numel() * 4, streams=[vqlab.bits.pack_indices(self.signs, 1)],
                        index_bits=1)

    def config(self):
        return {"rows": self.shape[0], "n": self.shape[1]}

    @classmethod
    def from_config(cls, rows, n):
        return cls(rows, n)

    def packing(self):
        return {"signs": 1}

    def describe(self):
        return {"method": "sign", "K": 2, "d": 1, "bits_per_weight": 1.0}


@dataclass(frozen=True)
class SignConfig:
    name = "binarized"


@register_handler(SignConfig)
def _sign_handler(modules, config):
    for name, m in modules:
        cls = QuantizedConv2d if isinstance(m, nn.Conv2d) else QuantizedLinear
        yield name, cls.from_code(m, SignCode.from_weight(m.weight))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 3)).eval()


def test_a_method_defined_outside_vqlab_works_end_to_end(tmp_path):
    model = _model()
    x = torch.randn(5, 1, 8, 8)
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    report = quantize_(model, SignConfig(), progress=False).set_index("layer")

    # the report: first conv and last linear float (quantize_'s rule), the rest binarized, numbers from the code
    assert report["status"].tolist() == ["float (first conv)", "binarized", "binarized", "float (last linear)"]
    assert isinstance(model[2], QuantizedConv2d) and isinstance(model[5], QuantizedLinear)
    assert not model[2].training                                         # the mode of the layer it replaced
    for name, rows, n in (("2", 6, 2 * 9), ("5", 20, 216)):
        r = report.loc[name]
        w = float_weights[name].reshape(rows, n)
        expect = w.abs().mean(1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
        assert r["method"] == "sign" and r["bits_per_weight"] == 1.0 and r["K"] == 2 and r["d"] == 1
        assert r["params_after"] == rows * n + rows + rows                # signs + alphas + bias
        assert r["weight_mse"] == pytest.approx((w.double() - expect.double()).pow(2).mean().item(), rel=1e-6)

    # compressed_size, counted independently: 1 bit per weight rounded up per layer, float32 alpha and bias
    size = compressed_size(model)
    conv0, linear7 = (1 * 4 * 9 + 4) * 4, (20 * 3 + 3) * 4
    conv2 = -(-6 * 18 // 8) + 6 * 4 + 6 * 4
    fc5 = -(-20 * 216 // 8) + 20 * 4 + 20 * 4
    assert size.compressed_bytes == conv0 + conv2 + fc5 + linear7
    assert size.index_bytes == -(-6 * 18 // 8) + -(-20 * 216 // 8)
    assert size.dense_bytes == sum(p.numel() * 4 for p in _model().parameters())
    assert size.layers.set_index("layer").loc["5", "method"] == "sign"

    # save / load: no model= needed (the code class is registered), bit-exact, file = counted bytes + metadata
    path = tmp_path / "sign.vqz"
    nbytes = vqlab.save(model, path)
    back = vqlab.load(path)
    assert nbytes == os.path.getsize(path) and 0 < nbytes - size.compressed_bytes < 4096
    assert isinstance(back[5].code, SignCode) and torch.equal(back[5].code.signs, model[5].code.signs)
    assert torch.equal(back(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))

    # FLOPs: the code's count (a dense product here) agrees with FlopCounterMode
    df = count_flops(model, (5, 1, 8, 8))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(5, 1, 8, 8))
    assert df["vq_flops"].sum() == counter.get_total_flops() == df["dense_flops"].sum()


def test_a_corrupted_sign_file_is_refused(tmp_path):
    model = _model()
    quantize_(model, SignConfig(), progress=False)
    model[5].code.signs[0, 0] = 7                            # not a bit: packing refuses it
    with pytest.raises(ValueError, match=r"\[0, 2\*\*1\)"):
        vqlab.save(model, tmp_path / "bad.vqz")


# ---------------------------------------------------------------- one frozen codebook for three models

def _three_models():
    torch.manual_seed(1)
    lenet = vqlab.get_model("lenet5")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    resnet = vqlab.get_model("resnet20", in_channels=3)
    return [lenet, mlp, resnet]


def test_one_frozen_codebook_serves_three_models(tmp_path):
    book = Codebook.from_tensor(0.1 * torch.randn(1024, 4, generator=torch.Generator().manual_seed(0)), frozen=True)
    models = _three_models()
    for m in models:
        quantize_(m, VQConfig(codebook=book), progress=False)
        assert all(layer.codebook is book for layer in m.modules() if isinstance(layer, vqlab.VQLinear | vqlab.VQConv2d))
    book_bytes = 1024 * 4 * 4

    # counted once across the three
    each = [compressed_size(m) for m in models]
    total = compressed_size(models)
    assert [int(b) for b in total.per_model["codebook_bytes"]] == [book_bytes, 0, 0]
    assert total.codebook_bytes == book_bytes
    assert total.compressed_bytes == sum(r.compressed_bytes for r in each) - 2 * book_bytes
    assert [int(v) for v in total.per_model["compressed_bytes"]] == \
        [each[0].compressed_bytes] + [r.compressed_bytes - book_bytes for r in each[1:]]

    # fit never moves a frozen codebook (the indices and biases still train)
    before = book.weight.detach().clone()
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    fit(models[1], data, epochs=1, batch_size=16, progress=False, device="cpu")
    assert torch.equal(book.weight, before)

    # stored once: one file for the three, its size is the counted total plus metadata
    path = tmp_path / "three.vqz"
    nbytes = vqlab.save(models, path)
    assert 0 < nbytes - total.compressed_bytes < 8192 < 2 * book_bytes      # a second copy would not fit
    back = vqlab.load(path)
    assert isinstance(back, list) and len(back) == 3
    books = {id(layer.codebook) for m in back for layer in m.modules() if isinstance(layer, vqlab.VQLinear | vqlab.VQConv2d)}
    assert len(books) == 1
    x = torch.randn(2, 3, 32, 32)
    models[2].eval()
    assert torch.equal(back[2].eval()(x), models[2](x))
    with pytest.raises(vqlab.VQFileError, match="pass model= the same way"):
        vqlab.load(path, model=models[0])
    assert [isinstance(m, nn.Module) for m in vqlab.load(path, model=_requantized(book))] == [True] * 3


def _requantized(book):
    models = _three_models()
    for m in models:
        quantize_(m, VQConfig(codebook=book), progress=False)
    return models
