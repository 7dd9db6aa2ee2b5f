"""save/load: compact file, bit-identical round trip, sharing and buffers kept, clear errors; ResNet-20 end to end."""
import os

import pytest
import torch
import torch.nn as nn

from vqlab.io import FORMAT_VERSION, VQFileError, load, save
from vqlab.layers import VQConv2d, VQLinear
from vqlab.models import get_model
from vqlab.quantize import VQConfig, quantize_
from vqlab.size import compressed_size


def _bound(size_report) -> float:
    return size_report.compressed_bytes * 1.01 + 4096


def _quantized_lenet(**cfg):
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(**{"k": 64, "d": 4, "iters": 5, **cfg}), progress=False)
    return model.eval()


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_is_bit_identical_and_compact(tmp_path):
    model = _quantized_lenet()
    path = tmp_path / "lenet.vq"
    n = save(model, path)
    r = compressed_size(model)
    assert n == os.path.getsize(path) and r.compressed_bytes < n <= _bound(r)
    back = load(path).eval()
    _same_tensors(model, back)
    assert isinstance(back.classifier[1], VQLinear) and back.classifier[1].indices.dtype == torch.uint8
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(model(x), back(x))
    # fill an existing quantized model of the same architecture in place
    other = _quantized_lenet(seed=3)
    load(path, model=other)
    assert torch.equal(model(x), other.eval()(x))


def test_indices_are_packed_not_int64(tmp_path):
    model = _quantized_lenet(k=16)        # 4-bit indices
    r = compressed_size(model)
    n = save(model, tmp_path / "m.vq")
    indices = sum(m.indices.numel() for m in model.modules() if isinstance(m, (VQLinear, VQConv2d)))
    assert r.index_bytes == indices // 2
    assert n - r.compressed_bytes < 4096 and n < r.compressed_bytes + indices  # far below one byte per index


def test_shared_codebook_buffers_and_latent(tmp_path):
    model = _quantized_lenet(codebook="shared", reassign_every=5)
    model.register_buffer("scratch", torch.arange(3.0), persistent=False)
    save(model, tmp_path / "s.vq")
    back = load(tmp_path / "s.vq")
    assert back.features[3].codebook is back.classifier[1].codebook is back.classifier[3].codebook
    assert torch.equal(back.scratch, torch.arange(3.0))
    lat = back.classifier[1].latent            # training-only weights rebuilt from the codebook
    assert lat is not None and torch.equal(lat.detach(), back.classifier[1]._weight_to_flat(back.classifier[1].dequantize()))
    assert sum(1 for p in back.parameters() if p is back.features[3].codebook.weight) == 1


def test_bad_files_raise_clear_errors(tmp_path):
    model = _quantized_lenet()
    path = tmp_path / "m.vq"
    save(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.vq").write_bytes(data[:-100])
    with pytest.raises(VQFileError, match=r"is truncated: \d+ bytes, the header announces \d+"):
        load(tmp_path / "cut.vq")
    (tmp_path / "head.vq").write_bytes(data[:10])
    with pytest.raises(VQFileError, match="is truncated"):
        load(tmp_path / "head.vq")
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    (tmp_path / "flip.vq").write_bytes(bytes(bad))
    with pytest.raises(VQFileError, match="is corrupted: sha256 checksum mismatch"):
        load(tmp_path / "flip.vq")
    (tmp_path / "pt.vq").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(VQFileError, match="is not a vqlab file"):
        load(tmp_path / "pt.vq")
    newer = bytearray(data)
    newer[8] = FORMAT_VERSION + 1
    (tmp_path / "v.vq").write_bytes(bytes(newer))
    with pytest.raises(VQFileError, match=f"format version {FORMAT_VERSION + 1}; this vqlab reads version {FORMAT_VERSION}"):
        load(tmp_path / "v.vq")
    with pytest.raises(VQFileError, match="the model has no param"):
        load(path, model=get_model("resnet20"))


def test_resnet20_end_to_end(tmp_path):
    from vqlab.data import load_dataset
    from vqlab.train import evaluate, fit

    ds = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = get_model("resnet20", in_channels=1)
    report = quantize_(model, VQConfig(k=64, d=4, iters=5), progress=False)
    assert (report["status"] == "vq").sum() == 18              # every conv but the stem; fc stays float
    fit(model, ds, epochs=1, max_steps=4, batch_size=64, lr=1e-3, seed=0, progress=False, device="cpu")
    assert model.bn1.num_batches_tracked.item() == 4
    r = compressed_size(model)
    assert r.ratio > 5 and r.huffman_bytes < r.compressed_bytes + 18 * 64
    path = tmp_path / "r20.vq"
    n = save(model, path)
    assert n <= _bound(r), (n, r.compressed_bytes)
    back = load(path).eval()
    model.eval()
    _same_tensors(model, back)
    x = load_dataset("digits", "test").tensors[0][:64]
    assert torch.equal(model(x), back(x))
    assert evaluate(back, load_dataset("digits", "test"), device="cpu") == evaluate(model, load_dataset("digits", "test"), device="cpu")


def test_float16_codebooks_round_trip_and_dtype_mismatch_is_named(tmp_path):
    model = _quantized_lenet(codebook_dtype="float16")
    path = tmp_path / "h.vq"
    save(model, path)
    back = load(path).eval()
    _same_tensors(model, back)
    assert back.classifier[1].codebook.weight.dtype == torch.float16
    with pytest.raises(VQFileError, match=r"codebook\.weight' is \[1, 64, 4\] torch.float16 in the "
                                          r"file, but \[1, 64, 4\] torch.float32 in the model"):
        load(path, model=_quantized_lenet())
