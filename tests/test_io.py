"""save/load: compact file, bit-identical round trip, sharing and buffers kept, clear errors; ResNet-20 end to end;
store_dtype and ANS-coded indices; format-2 files still load."""
import hashlib
import json
import lzma
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from vqlab.methods.uniform import UniformConfig
from vqlab import filemeta
from vqlab.io import FORMAT_VERSION, VQFileError, load, save
from vqlab.methods.vq import VQConv2d, VQLinear
from vqlab.methods.gong import BinaryConfig, ScalarConfig
from vqlab.models import get_model
from vqlab.methods.vq import VQConfig
from vqlab.quantize import quantize_
from vqlab.size import LZMA_FILTERS, compressed_size, round_to_store_dtype_


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
    assert lat is not None and torch.equal(lat.detach(), back.classifier[1].weight_to_rows(back.classifier[1].dequantize()))
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


# ---------------------------------------------------------------- store_dtype and index_coding="ans"

def _lenet_k16_d2():
    torch.manual_seed(0)
    model = get_model("lenet5")
    quantize_(model, VQConfig(k=16, d=2, iters=5), progress=False)
    return model.eval()


def _payload_len(path) -> int:
    return struct.unpack_from("<8sHHIQ", open(path, "rb").read())[4]


@pytest.mark.parametrize("store_dtype", [torch.float16, "bfloat16"])
@pytest.mark.parametrize("index_coding", ["packed", "ans"])
def test_store_dtype_and_ans_round_trip_is_bit_identical(tmp_path, store_dtype, index_coding):
    model = round_to_store_dtype_(_lenet_k16_d2(), store_dtype)
    path = tmp_path / "m.vqz"
    n = save(model, path, store_dtype=store_dtype, index_coding=index_coding)
    back = load(path).eval()
    _same_tensors(model, back)                       # float32 again, the same (rounded) values
    assert back.classifier[1].bias.dtype == back.classifier[1].codebook.weight.dtype == torch.float32
    x = torch.randn(16, 1, 28, 28)
    assert torch.equal(model(x), back(x))
    # the payload is exactly what compressed_size counts; the rest is header, metadata and checksum
    r = compressed_size(model, store_dtype=store_dtype)
    counted = r.ans_bytes if index_coding == "ans" else r.compressed_bytes
    assert _payload_len(path) == counted and counted < n <= counted + 4096
    assert r.compressed_bytes == 18068                # test_size's hand count


def test_saving_with_store_dtype_rounds_what_it_writes(tmp_path):
    model = _lenet_k16_d2()
    save(model, tmp_path / "m.vqz", store_dtype="float16")
    back = load(tmp_path / "m.vqz").eval()
    assert not torch.equal(model.classifier[1].bias, back.classifier[1].bias)   # float32 values, rounded on save
    _same_tensors(round_to_store_dtype_(model, "float16"), back)


def test_ans_file_is_smaller_and_agrees_with_the_report(tmp_path):
    model = _lenet_k16_d2()
    with torch.no_grad():                            # skewed indices, as after pruning or re-assignment
        g = torch.from_numpy(np.random.default_rng(0).geometric(0.2, model.classifier[1].indices.shape) - 1)
        model.classifier[1].indices.copy_(g.clamp(max=15))
    packed_n = save(model, tmp_path / "p.vqz")
    ans_n = save(model, tmp_path / "a.vqz", index_coding="ans")
    r = compressed_size(model)
    assert ans_n < packed_n and _payload_len(tmp_path / "a.vqz") == r.ans_bytes
    assert _payload_len(tmp_path / "p.vqz") == r.compressed_bytes
    assert r.ans_bytes < r.huffman_bytes < r.compressed_bytes
    back = load(tmp_path / "a.vqz")
    _same_tensors(model, back)
    assert back.classifier[1].indices.dtype == torch.uint8


def test_float16_model_saves_unchanged_with_store_dtype(tmp_path):
    model = _quantized_lenet(codebook_dtype="float16").half()
    a = save(model, tmp_path / "a.vqz")
    b = save(model, tmp_path / "b.vqz", store_dtype="float16")
    assert a == b and (tmp_path / "a.vqz").read_bytes() == (tmp_path / "b.vqz").read_bytes()
    _same_tensors(model, load(tmp_path / "b.vqz"))


def test_bad_store_dtype_index_coding_and_range_are_refused(tmp_path):
    model = _lenet_k16_d2()
    with pytest.raises(ValueError, match=r"store_dtype must be None or one of \['bfloat16', 'float16', 'float32'\].*'fp8'"):
        save(model, tmp_path / "m.vqz", store_dtype="fp8")
    with pytest.raises(ValueError, match=r"index_coding must be one of \['packed', 'ans'\], got 'huffman'"):
        save(model, tmp_path / "m.vqz", index_coding="huffman")
    with torch.no_grad():
        model.classifier[5].bias[0] = 7e4
    with pytest.raises(ValueError, match=r"'classifier\.5\.bias' holds 70000, beyond the range of float16"):
        save(model, tmp_path / "m.vqz", store_dtype="float16")
    assert not (tmp_path / "m.vqz").exists()
    save(model, tmp_path / "m.vqz", store_dtype="bfloat16")


def test_format_2_files_still_load(tmp_path):
    """A version-2 file (what vqlab wrote before `stored` existed: the same entries, version 2) loads; a version-2
    file may not use the 9-field entries."""
    hdr = struct.Struct("<8sHHIQ")

    def as_version(data: bytes, version: int, mutate=lambda meta: None) -> bytes:
        _, _, _, meta_len, payload_len = hdr.unpack_from(data)
        meta = filemeta.expand(json.loads(filemeta.inflate(data[hdr.size:hdr.size + meta_len], 1 << 24)))
        meta["version"] = version
        mutate(meta)
        meta_b = lzma.compress(json.dumps(meta).encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        body = hdr.pack(b"\x89VQLAB\r\n", version, 0, len(meta_b), payload_len) + meta_b + data[hdr.size + meta_len:-32]
        return body + hashlib.sha256(body).digest()

    model = _quantized_lenet()
    save(model, tmp_path / "m.vqz")
    (tmp_path / "v2.vqz").write_bytes(as_version((tmp_path / "m.vqz").read_bytes(), 2))
    back = load(tmp_path / "v2.vqz").eval()
    _same_tensors(model, back)
    save(model, tmp_path / "h.vqz", store_dtype="float16")
    (tmp_path / "h2.vqz").write_bytes(as_version((tmp_path / "h.vqz").read_bytes(), 2))
    with pytest.raises(VQFileError, match=r"field 'tensors\[\d+\]' must be \[name, kind, offset, length, bits, dtype, "
                                          r"shape, requires_grad\], got"):
        load(tmp_path / "h2.vqz")
    (tmp_path / "v9.vqz").write_bytes(as_version((tmp_path / "m.vqz").read_bytes(), 9))
    with pytest.raises(VQFileError, match=rf"format version 9; this vqlab reads version {FORMAT_VERSION} \(and 2, 3, 4\)"):
        load(tmp_path / "v9.vqz")


@pytest.mark.parametrize("method", ["uniform", "gong_scalar", "gong_binary"])
def test_other_codes_ans_figure_is_what_the_file_holds(tmp_path, method):
    config = {"uniform": UniformConfig(bits=4), "gong_scalar": ScalarConfig(k=8), "gong_binary": BinaryConfig()}[method]
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, config, progress=False)
    r = compressed_size(model, store_dtype="float16")
    assert r.ans_bytes != r.compressed_bytes
    save(model.eval(), tmp_path / "m.vqz", store_dtype="float16", index_coding="ans")
    assert _payload_len(tmp_path / "m.vqz") == r.ans_bytes
    back = load(tmp_path / "m.vqz").eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(round_to_store_dtype_(model, "float16")(x), back(x))
