"""The slot table a file's by-state modules are held to (`vqlab.architecture._SLOTS`) matches the classes, and a
renamed slot or child is refused at load, not met as an AttributeError in forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import vqlab
from vqlab import architecture, filemeta
from vqlab.io import VQFileError, load, save
from vqlab.models import MODULE_TYPES

from test_filemeta import _file, _parts


def _examples():
    yield "torch.nn.Linear", nn.Linear(2, 2)
    yield "torch.nn.Bilinear", nn.Bilinear(2, 2, 2)
    for n in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d"):
        yield f"torch.nn.{n}", getattr(nn, n)(1, 1, 1)
    for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d"):
        yield f"torch.nn.{n}", getattr(nn, n)(2)
    yield "torch.nn.LayerNorm", nn.LayerNorm(2)
    yield "torch.nn.GroupNorm", nn.GroupNorm(1, 2)
    yield "torch.nn.PReLU", nn.PReLU()
    yield "torch.nn.Embedding", nn.Embedding(2, 2)
    yield "torch.nn.MultiheadAttention", nn.MultiheadAttention(4, 2, add_bias_kv=True)
    yield "torch.nn.MultiheadAttention", nn.MultiheadAttention(4, 2, kdim=3, bias=False)
    yield "torch.nn.ReLU", nn.ReLU()
    yield "torch.nn.MaxPool2d", nn.MaxPool2d(2)
    for name, model in (("LeNet5", vqlab.get_model("lenet5")), ("SmallCNN", vqlab.get_model("cnn")),
                        ("CifarResNet", vqlab.get_model("resnet20", in_channels=1)),
                        ("TinyViT", vqlab.get_model("vit_tiny"))):
        for m in model.modules():
            kind = next((k for k, c in MODULE_TYPES.items() if type(m) is c), None)
            if kind:
                yield f"model:{kind}", m


def test_the_slot_table_matches_the_classes():
    seen = set()
    for name, m in _examples():
        params, buffers, optional, children = architecture._SLOTS.get(name, ((), (), (), ()))
        assert set(params) <= set(m._parameters) <= set(params) | set(optional), name
        assert set(m._buffers) == set(buffers), name
        assert set(m._modules) == set(children), name
        seen.add(name)
    assert {n for n in architecture._SLOTS if n.startswith("model:")} <= seen


@pytest.mark.parametrize("where, old, new", [
    ("params", "bias", "E8"),              # a Linear's bias renamed
    ("children", "features", "bz2"),       # LeNet5's features renamed
])
def test_a_renamed_slot_is_refused_at_load(tmp_path, where, old, new):
    torch.manual_seed(0)
    save(vqlab.get_model("lenet5", input_size=8), tmp_path / "m.vqz")
    _, meta_b, payload = _parts((tmp_path / "m.vqz").read_bytes())
    small = __import__("json").loads(filemeta.inflate(meta_b, 1 << 24))
    node = next(n for n in small["modules"] if any(s[0] == old for s in n.get(where, [])))
    next(s for s in node[where] if s[0] == old)[0] = new
    (tmp_path / "bad.vqz").write_bytes(_file(filemeta.deflate(small), payload, 5))
    with pytest.raises(VQFileError, match=rf"{where} names .*{new}.* but a .* has .*{old}"):
        load(tmp_path / "bad.vqz")


def test_a_code_hung_into_a_sequential_is_refused_at_load(tmp_path):
    torch.manual_seed(0)
    m = vqlab.get_model("lenet5", input_size=8)
    vqlab.quantize_(m, vqlab.VQConfig(k=16, d=4, iters=1), progress=False)
    save(m, tmp_path / "m.vqz")
    _, meta_b, payload = _parts((tmp_path / "m.vqz").read_bytes())
    small = __import__("json").loads(filemeta.inflate(meta_b, 1 << 24))
    full = filemeta.expand(small)
    code = next(i for i, n in enumerate(full["modules"]) if n["type"].startswith("code:"))
    seq = next(i for i, n in enumerate(full["modules"]) if n["type"] == "torch.nn.Sequential" and i > code)
    full["modules"][seq]["children"][0][1] = code              # the Sequential's first child is now the code
    (tmp_path / "bad.vqz").write_bytes(_file(filemeta.deflate(filemeta.compact(full)), payload, 5))
    with pytest.raises(VQFileError, match="is a code .*which only a quantized layer may hold"):
        load(tmp_path / "bad.vqz")
