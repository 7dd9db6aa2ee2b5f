"""Format 5's compact metadata (`vqlab.filemeta`): it expands to exactly the version-4 metadata, a header costs
a few hundred bytes, version-4 files still load, and malformed or inflating metadata gives only VQFileError."""
from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib

import pytest
import torch
import torch.nn as nn

import vqlab
import vqlab.methods.gong as gong
from vqlab import filemeta
from vqlab.io import META_CAP, VQFileError, load, save
from vqlab.methods.lattice import LatticeConfig
from vqlab.methods.qaf import QAFConfig
from vqlab.methods.vq import VQConfig
from vqlab.size import LZMA_FILTERS, compressed_size

_HDR = struct.Struct("<8sHHIQ")


def _parts(data: bytes) -> tuple[int, bytes, bytes]:
    _, version, _, meta_len, _ = _HDR.unpack_from(data)
    return version, data[_HDR.size:_HDR.size + meta_len], data[_HDR.size + meta_len:-32]


def _file(meta_b: bytes, payload: bytes, version: int) -> bytes:
    body = _HDR.pack(b"\x89VQLAB\r\n", version, 0, len(meta_b), len(payload)) + meta_b + payload
    return body + hashlib.sha256(body).digest()


def _models():
    torch.manual_seed(0)
    lenet = vqlab.get_model("lenet5", input_size=8)
    vqlab.quantize_(lenet, VQConfig(k=16, d=4, iters=2), progress=False)
    shared = vqlab.get_model("resnet20", in_channels=1)
    vqlab.quantize_(shared, VQConfig(k=16, d=8, codebook="shared", iters=1), progress=False)
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight                                     # a tensor with two names
    mixed = vqlab.get_model("lenet5", input_size=8)
    vqlab.quantize_(mixed, gong.PQConfig(k=4, subspaces=2), progress=False)
    lattice = vqlab.get_model("lenet5", input_size=8)
    vqlab.quantize_(lattice, LatticeConfig(lattice="E8", step=0.05, pad=True), progress=False)
    qaf = vqlab.get_model("lenet5", input_size=8)
    vqlab.quantize_(qaf, QAFConfig(rank_ratio=0.3, bits=3, iters=2), progress=False)
    half = vqlab.get_model("lenet5", input_size=8).half()                # floats of another dtype
    return {"lenet": lenet, "resnet20 shared": shared, "tied": tied, "pq": mixed, "lattice": lattice, "qaf": qaf,
            "half": half, "list": [lenet, mixed]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    out = {}
    for name, m in _models().items():
        for store, coding in ((None, "packed"), ("float16", "ans")):
            path = d / f"{name.replace(' ', '_')}-{coding}.vqz"
            save(m, path, store_dtype=store if name != "half" else None, index_coding=coding)
            out[(name, coding)] = (m, path)
    return out


def test_compact_expands_to_exactly_the_version_4_metadata(saved):
    for (name, coding), (m, path) in saved.items():
        version, meta_b, _ = _parts(path.read_bytes())
        assert version == 5
        small = json.loads(filemeta.inflate(meta_b, META_CAP))
        full = filemeta.expand(small)
        assert filemeta.compact(full) == small, name
        assert filemeta.expand(filemeta.compact(full)) == full, name
        named = {**dict(nn.ModuleList(m).named_parameters() if isinstance(m, list) else m.named_parameters()),
                 **dict(nn.ModuleList(m).named_buffers() if isinstance(m, list) else m.named_buffers())}
        assert all(e[0] in named for e in full["tensors"]), name   # names derived from the tree are the model's
        offsets = [e[2] for e in full["tensors"]]
        assert offsets == sorted(offsets) and offsets[0] == 0


def test_files_load_back_equal(saved):
    for (name, coding), (m, path) in saved.items():
        back = load(path)
        models = (m, back) if not isinstance(m, list) else zip(m, back)
        for a, b in ([models] if not isinstance(m, list) else models):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys(), name
            if coding == "packed" and name != "half":
                assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_tied_weight_keeps_its_first_name_and_stays_tied(saved):
    m, path = saved[("tied", "packed")]
    full = filemeta.expand(json.loads(filemeta.inflate(_parts(path.read_bytes())[1], META_CAP)))
    assert [e[0] for e in full["tensors"]] == ["0.weight", "0.bias", "1.bias"]
    back = load(path)
    assert back[1].weight is back[0].weight


def test_the_header_costs_a_few_hundred_bytes():
    """The compact header of a LeNet-5 and a ResNet-20 VQ file against the version-4 one (LZMA'd JSON)."""
    torch.manual_seed(0)
    for model, cap in ((vqlab.get_model("lenet5"), 300), (vqlab.get_model("resnet20", in_channels=1), 600)):
        vqlab.quantize_(model, VQConfig(k=16, d=4, codebook="shared", iters=1), progress=False)
        import io as _io
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            nbytes = save(model, f"{d}/m.vqz", store_dtype="float16", index_coding="ans")
            data = open(f"{d}/m.vqz", "rb").read()
        _, meta_b, payload = _parts(data)
        v4 = lzma.compress(json.dumps(filemeta.expand(json.loads(filemeta.inflate(meta_b, META_CAP))),
                                      separators=(",", ":")).encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        assert len(meta_b) <= cap and len(meta_b) < len(v4) / 2, (len(meta_b), len(v4))
        assert nbytes == len(data) == _HDR.size + len(meta_b) + len(payload) + 32
        assert len(payload) == compressed_size(model, store_dtype="float16").ans_bytes


def test_version_4_files_still_load(saved, tmp_path):
    for (name, coding), (m, path) in saved.items():
        _, meta_b, payload = _parts(path.read_bytes())
        full = filemeta.expand(json.loads(filemeta.inflate(meta_b, META_CAP)))
        full["version"] = 4
        v4 = lzma.compress(json.dumps(full).encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        (tmp_path / "v4.vqz").write_bytes(_file(v4, payload, 4))
        a, b = load(path), load(tmp_path / "v4.vqz")
        for x, y in (zip(a, b) if isinstance(a, list) else [(a, b)]):
            sa, sb = x.state_dict(), y.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_deflate_bomb_is_refused_before_it_inflates(tmp_path):
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=filemeta.PRESET)
    meta_b = z.compress(b'{"format":"vqlab","version":5,"x":"') + b"".join(
        z.compress(b"a" * (1 << 20)) for _ in range((META_CAP >> 20) + 1)) + z.compress(b'"}') + z.flush()
    assert len(meta_b) < 64 << 10
    (tmp_path / "bomb.vqz").write_bytes(_file(meta_b, b"", 5))
    with pytest.raises(VQFileError, match="metadata inflates to more than"):
        load(tmp_path / "bomb.vqz")


@pytest.mark.parametrize("meta_b, match", [
    (b"\xff\xfe\xfd", "not DEFLATE data|cut short"),
    (filemeta.deflate({"format": "vqlab", "version": 5})[:-2], "cut short|not DEFLATE"),
    (filemeta.deflate({"format": "vqlab", "version": 5}) + b"xx", "bytes follow"),
])
def test_damaged_deflate_streams(tmp_path, meta_b, match):
    (tmp_path / "d.vqz").write_bytes(_file(meta_b, b"", 5))
    with pytest.raises(VQFileError, match=match):
        load(tmp_path / "d.vqz")


def _mutations(small: dict):
    """(what, mutate) pairs that break one compact field each."""
    def at(f):
        return f
    yield "params", "field 'params'", lambda s: s.__setitem__("params", "3")
    yield "params range", "field 'params' is", lambda s: s.__setitem__("params", len(s["tensors"]) + 1)
    yield "store", "field 'store'", lambda s: s.__setitem__("store", "int8")
    yield "coding", "field 'coding'", lambda s: s.__setitem__("coding", "zip")
    yield "tensors", "field 'tensors' must be a list", lambda s: s.__setitem__("tensors", {})
    yield "modules", "field 'modules' must be a list", lambda s: s.__setitem__("modules", 3)
    yield "entry", r"field 'tensors\[0\]' must be", lambda s: s["tensors"].__setitem__(0, [1, 2])
    yield "length", "length must be an integer", lambda s: s["tensors"][0].__setitem__(0, 1.5)
    yield "exceptions", "unknown fields", lambda s: s["tensors"][0].append({"zz": 1}) or s["tensors"][0].__setitem__(
        slice(3, None), [{"zz": 1}])
    yield "child", "children must be an integer", lambda s: next(
        n for n in s["modules"] if n.get("children"))["children"][0].__setitem__(1, "x")
    yield "child far", r"children|earlier node", lambda s: next(
        n for n in s["modules"] if n.get("children"))["children"][0].__setitem__(1, 10 ** 6)
    yield "ref", "params must be an integer", lambda s: next(
        n for n in s["modules"] if n.get("params"))["params"][0].__setitem__(1, [])
    yield "ref far", "tensor indices below", lambda s: next(
        n for n in s["modules"] if n.get("params"))["params"][0].__setitem__(1, 10 ** 9)
    yield "node", r"field 'modules\[0\]' must be an object", lambda s: s["modules"].__setitem__(0, [])
    yield "no name", "has no name", lambda s: s["modules"].__setitem__(
        -1, {k: v for k, v in s["modules"][-1].items() if k != "children"})
    yield "offset", "outside the", lambda s: s["tensors"][0].__setitem__(0, 10 ** 12)


def test_malformed_compact_fields_name_the_field(saved, tmp_path):
    _, path = saved[("lenet", "ans")]
    _, meta_b, payload = _parts(path.read_bytes())
    small = json.loads(filemeta.inflate(meta_b, META_CAP))
    for what, match, mutate in _mutations(small):
        bad = json.loads(json.dumps(small))
        mutate(bad)
        (tmp_path / "m.vqz").write_bytes(_file(filemeta.deflate(bad), payload, 5))
        with pytest.raises(VQFileError, match=match):
            load(tmp_path / "m.vqz")


def test_the_preset_dictionary_is_frozen():
    """Format 5 means this preset: a changed byte would make every written file unreadable."""
    assert hashlib.sha256(filemeta.PRESET).hexdigest() == \
        "91e8f72ed04f3c35f3d0cd302da7aa31c56dfae6683f890e37fe8a29a646ceb7"
    assert len(filemeta.PRESET) <= 32 << 10                          # DEFLATE's window


def test_node_defaults_round_trip_also_when_a_field_is_absent():
    full = {"format": "vqlab", "version": 5, "tensors": [], "modules": [
        {"type": "torch.nn.ReLU", "training": False, "state": {}},                    # inplace absent
        {"type": "torch.nn.ReLU", "training": True, "state": {"inplace": True}},
        {"type": "torch.nn.Flatten", "training": False, "state": {"start_dim": 1.0, "end_dim": -1}},   # 1.0, not 1
        {"type": "torch.nn.Sequential", "training": False, "children": [["0", 0], ["1", 1], ["2", 2]]}]}
    small = filemeta.compact(full)
    assert small["modules"][0]["~"] == ["inplace"] and small["modules"][2]["state"] == {"start_dim": 1.0}
    assert filemeta.expand(small) == full
