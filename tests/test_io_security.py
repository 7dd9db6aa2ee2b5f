"""vqlab files are untrusted input: no code runs on load, bounded inflation, every field checked,
indices checked against K, atomic saves, clear errors for models the file cannot rebuild."""
import builtins
import contextlib
import copy
import functools
import hashlib
import json
import lzma
import math
import os
import pickle
import random
import struct
import time
import tracemalloc

import pytest
import torch
import torch.nn as nn

from vqlab import filemeta
from vqlab.io import FORMAT_VERSION, VQFileError, load, save
from vqlab.methods.vq import VQLinear
from vqlab.models import get_model
from vqlab.methods.vq import VQConfig
from vqlab.quantize import all_layers, quantize_
from vqlab.size import LZMA_FILTERS, compressed_size, round_to_store_dtype_

# The file envelope, written independently of vqlab.io so that these tests craft files the way an
# attacker would: header, raw-LZMA2 JSON metadata, payload, sha256 of everything before it.
_HDR = struct.Struct("<8sHHIQ")
_CRAFT_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 1, "dict_size": 1 << 20}]


def _split(data: bytes) -> tuple[int, dict, bytes]:
    """(version, meta, payload) of a vqlab file; a version-5 file's compact metadata comes back in the version-4
    layout (`vqlab.filemeta.expand`) as version 4, so `_build` writes it back as a version-4 file."""
    _, version, _, meta_len, _ = _HDR.unpack_from(data)
    meta_b = data[_HDR.size:_HDR.size + meta_len]
    if version >= 5:
        meta = filemeta.expand(json.loads(filemeta.inflate(meta_b, 1 << 24)))
        meta["version"] = version = 4
    else:
        meta = json.loads(lzma.decompress(meta_b, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    return version, meta, data[_HDR.size + meta_len:-32]


def _pack(meta_b: bytes, payload: bytes, version: int = 4) -> bytes:
    """Assemble a file around already compressed metadata, with a valid checksum."""
    body = _HDR.pack(b"\x89VQLAB\r\n", version, 0, len(meta_b), len(payload)) + meta_b + payload
    return body + hashlib.sha256(body).digest()


def _build(meta, payload: bytes, version: int = 4) -> bytes:
    """A version-4 file (LZMA'd metadata in full), or of `version`, around meta and payload."""
    meta_b = lzma.compress(json.dumps(meta).encode(), format=lzma.FORMAT_RAW, filters=_CRAFT_FILTERS)
    return _pack(meta_b, payload, version)


def _tiny_vq() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(m, VQConfig(k=16, d=4, iters=3), filter_fn=all_layers, progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.vqz"
    save(_tiny_vq(), path)
    return path.read_bytes()


def _lenet_k200() -> nn.Module:
    torch.manual_seed(0)
    m = get_model("lenet5", input_size=8)
    quantize_(m, VQConfig(k=200, d=2, iters=3), progress=False)
    return m.eval()


# ---------------------------------------------------------------- no code from the file

class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_pickle_payload_where_the_skeleton_lived_never_runs(tmp_path, tiny_file):
    marker = tmp_path / "marker"
    _, meta, payload = _split(tiny_file)
    evil = lzma.compress(pickle.dumps(_Evil(str(marker))), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    meta["skeleton"] = [len(payload), len(evil)]       # where format 1 kept its pickled module tree
    meta.pop("modules", None)
    (tmp_path / "evil.vqz").write_bytes(_build(meta, payload + evil))
    with pytest.raises(VQFileError, match="field 'modules'"):
        load(tmp_path / "evil.vqz")
    assert not marker.exists()
    (tmp_path / "evil1.vqz").write_bytes(_build(meta, payload + evil, version=1))   # an "old" file
    with pytest.raises(VQFileError, match="format version 1"):
        load(tmp_path / "evil1.vqz")
    assert not marker.exists()


def test_pickle_bytes_in_any_string_field_are_data(tmp_path, tiny_file):
    marker = tmp_path / "marker"
    blob = pickle.dumps(_Evil(str(marker)), protocol=0).decode("latin-1")
    _, meta, payload = _split(tiny_file)
    for mutate in (lambda m: m["modules"][-1].__setitem__("type", blob),
                   lambda m: m["tensors"][0].__setitem__(5, blob),
                   lambda m: m["modules"][-1].setdefault("state", {}).__setitem__("x", {"cls": blob})):
        bad = copy.deepcopy(meta)
        mutate(bad)
        (tmp_path / "b.vqz").write_bytes(_build(bad, payload))
        with pytest.raises(VQFileError):
            load(tmp_path / "b.vqz")
    assert not marker.exists()


def test_load_never_unpickles(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = get_model("resnet20", in_channels=1)
    quantize_(model, VQConfig(k=16, d=2, iters=3, codebook="shared"), progress=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    model.eval()
    model.layers[0].train()                                 # per-module training flags survive too
    n = save(model, tmp_path / "r20.vqz")
    assert n <= compressed_size(model).compressed_bytes * 1.01 + 4096

    def refuse(*a, **k):
        raise AssertionError("load unpickled something")

    class NoUnpickler(pickle.Unpickler):
        __init__ = refuse
    with monkeypatch.context() as mp:
        mp.setattr(pickle, "loads", refuse)
        mp.setattr(pickle, "load", refuse)
        mp.setattr(pickle, "Unpickler", NoUnpickler)
        back = load(tmp_path / "r20.vqz")
    assert back.layers[0].training and not back.layers[1].training and not back.training
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    books = {id(m.codebook) for m in back.modules() if hasattr(m, "codebook")}
    assert len(books) == 1                                  # one shared Codebook object, as saved
    model.eval(), back.eval()
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(model(x), back(x))


# ---------------------------------------------------------------- bounded inflation, checked fields

def test_metadata_bomb_is_refused_without_inflating_it(tmp_path):
    comp = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=_CRAFT_FILTERS)
    parts = [comp.compress(b'{"format":"vqlab","version":4,"x":"')]
    chunk = b"a" * (1 << 20)
    parts += [comp.compress(chunk) for _ in range(64)]      # 64 MiB of JSON string
    parts += [comp.compress(b'"}'), comp.flush()]
    meta_b = b"".join(parts)
    assert len(meta_b) < 64 << 10
    (tmp_path / "bomb.vqz").write_bytes(_pack(meta_b, b""))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(VQFileError, match="metadata decompresses to more than"):
            load(tmp_path / "bomb.vqz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"peak {peak / 2**20:.0f} MiB while refusing the bomb"
    assert time.perf_counter() - t0 < 10


def _entry(meta: dict, bits: bool) -> list:
    return next(e for e in meta["tensors"] if (e[4] > 0) == bits)


def _vq_node(meta: dict) -> dict:
    return next(n for n in meta["modules"] if n["type"] == "vqlab:linear")


def _vq_code(meta: dict) -> dict:
    return next(n for n in meta["modules"] if n["type"] == "code:vq")


_MALFORMED = {
    "meta not an object": (lambda m, p: ([], p), "must be a JSON object"),
    "format": (lambda m, p: ({**m, "format": "zip"}, p), "field 'format'"),
    "missing tensors": (lambda m, p: ({k: v for k, v in m.items() if k != "tensors"}, p), "field 'tensors'"),
    "tensors not a list": (lambda m, p: ({**m, "tensors": {"a": 1}}, p), "field 'tensors'"),
    "short entry": (lambda m, p: (m["tensors"].__setitem__(0, m["tensors"][0][:5]) or m, p), r"field 'tensors\[0\]'"),
    "offset type": (lambda m, p: (m["tensors"][0].__setitem__(2, "0") or m, p), r"tensors\[0\]' has a bad offset"),
    "offset out of range": (lambda m, p: (m["tensors"][-1].__setitem__(2, len(p)) or m, p), "outside the"),
    "negative length": (lambda m, p: (m["tensors"][1].__setitem__(3, -1) or m, p), "bad length"),
    "unknown kind": (lambda m, p: (m["tensors"][0].__setitem__(1, "weights") or m, p), "bad kind 'weights'"),
    "bits 40": (lambda m, p: (_entry(m, True).__setitem__(4, 40) or m, p), "bad bits 40"),
    "bits 0 on packed": (lambda m, p: (_entry(m, True).__setitem__(4, 0) or m, p), r"field 'tensors\[\d+\]'.*needs"),
    "unknown dtype": (lambda m, p: (m["tensors"][0].__setitem__(5, "float128") or m, p), "bad dtype 'float128'"),
    "shape type": (lambda m, p: (m["tensors"][0].__setitem__(6, [-1, 2]) or m, p), "bad shape"),
    "shape vs length": (lambda m, p: (_entry(m, False).__setitem__(6, [10 ** 6]) or m, p), "needs"),
    "requires_grad": (lambda m, p: (m["tensors"][0].__setitem__(7, "yes") or m, p), "bad requires_grad"),
    "missing modules": (lambda m, p: ({k: v for k, v in m.items() if k != "modules"}, p), "field 'modules'"),
    "forward child": (lambda m, p: (m["modules"][-1]["children"][0].__setitem__(1, len(m["modules"])) or m, p),
                      "children"),
    "tensor index": (lambda m, p: (next(n for n in m["modules"] if n.get("buffers"))["buffers"][0].__setitem__(1, 999)
                                   or m, p), "buffers"),
    "unknown type": (lambda m, p: (m["modules"][0].__setitem__("type", "os.system") or m, p), "allow-list"),
    "vqlab non-module": (lambda m, p: (m["modules"][0].__setitem__("type", "vqlab.io.VQFileError") or m, p),
                         "allow-list"),
    "vqlab main": (lambda m, p: (m["modules"][0].__setitem__("type", "vqlab.__main__.main") or m, p), "allow-list"),
    "method attribute": (lambda m, p: (m["modules"][-1].__setitem__("state", {"forward": 1}) or m, p),
                         "may not set attribute 'forward'"),
    "unknown value tag": (lambda m, p: (m["modules"][-1].__setitem__("state", {"x": {"eval": "1"}}) or m, p),
                          "unsupported value"),
    "VQ n_pad": (lambda m, p: (_vq_code(m)["config"].__setitem__("n_pad", 20) or m, p), r"module '0.code'.*config gives"),
    "VQ out_dim": (lambda m, p: (_vq_node(m)["config"].__setitem__("out_features", 64) or m, p),
                   "do not fit its geometry"),
    "VQ attribute missing": (lambda m, p: (_vq_code(m)["config"].pop("n_pad") and m, p), "n_pad"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_fields_raise_vqfileerror_naming_the_field(tmp_path, tiny_file, case):
    mutate, match = _MALFORMED[case]
    _, meta, payload = _split(tiny_file)
    meta, payload = mutate(meta, payload)
    (tmp_path / "bad.vqz").write_bytes(_build(meta, payload))
    with pytest.raises(VQFileError, match=match):
        load(tmp_path / "bad.vqz")


def test_random_field_damage_gives_only_vqfileerror(tmp_path, tiny_file):
    """Replace random JSON values with junk: load either works or raises VQFileError, nothing else."""
    _, meta, payload = _split(tiny_file)
    junk = [None, -1, 0, 2 ** 70, 1.5, float("nan"), True, "", "x.y", [], [[]], {}, {"t": 3}, [0, 0]]
    rng = random.Random(0)

    def spots(v, path=()):
        yield path
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            yield from spots(x, path + (k,))
    paths = list(spots(meta))[1:]
    for _ in range(150):
        bad = copy.deepcopy(meta)
        path = rng.choice(paths)
        parent = functools.reduce(lambda v, k: v[k], path[:-1], bad)
        parent[path[-1]] = rng.choice(junk)
        (tmp_path / "f.vqz").write_bytes(_build(bad, payload))
        try:
            load(tmp_path / "f.vqz")
        except VQFileError:
            pass


# ---------------------------------------------------------------- stored fields: narrower floats, ANS streams

def _coded_vq() -> nn.Module:
    """_tiny_vq with skewed indices in layer 0 (so its ANS stream is a real one, not the packed fallback)."""
    m = _tiny_vq()
    with torch.no_grad():
        m[0].indices.copy_(torch.tensor([0, 0, 0, 1, 0, 2, 0, 0] * 16, dtype=torch.uint8).reshape(m[0].indices.shape))
    return m


@pytest.fixture(scope="module")
def coded_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("coded") / "coded.vqz"
    save(_coded_vq(), path, store_dtype="float16", index_coding="ans")
    return path.read_bytes()


def _stored(meta: dict, stored: str) -> list:
    return next(e for e in meta["tensors"] if len(e) == 9 and e[8] == stored)


def _restream(meta: dict, payload: bytes, data: bytes) -> tuple[dict, bytes]:
    """Point the first ANS entry at `data`, appended to the payload."""
    e = _stored(meta, "ans")
    e[2], e[3] = len(payload), len(data)
    return meta, payload + data


_MALFORMED_STORED = {
    "stored unknown dtype": (lambda m, p: (_stored(m, "float16").__setitem__(8, "float8") or m, p),
                             r"tensors\[\d+\]' \('.*'\) has a bad stored 'float8'"),
    "stored not narrower": (lambda m, p: (_stored(m, "float16").__setitem__(8, "float32") or m, p), "bad stored 'float32'"),
    "stored type": (lambda m, p: (_stored(m, "float16").__setitem__(8, 7) or m, p), "bad stored 7"),
    "ans on a raw entry": (lambda m, p: (_stored(m, "float16").__setitem__(8, "ans") or m, p), "bad stored 'ans'"),
    "float on a packed entry": (lambda m, p: (_stored(m, "ans").__setitem__(8, "float16") or m, p),
                                "bad stored 'float16'"),
    "stored on an int entry": (lambda m, p: (next(e for e in m["tensors"] if e[5] == "int64").append("float16") or m, p),
                               "bad stored 'float16'"),
    "stored length": (lambda m, p: (_stored(m, "float16").__setitem__(3, 2 * _stored(m, "float16")[3]) or m, p),
                      r"has length \d+ bytes; shape \[\d+\] float16 needs"),
    "ten fields": (lambda m, p: (_stored(m, "ans").append(0) or m, p), "must be .*requires_grad, stored"),
    "ans values beyond the cap": (lambda m, p: (_stored(m, "ans").__setitem__(6, [1 << 27]) or m, p),
                                  r"the ANS-coded entries hold 1342177\d\d values, more than the 67108864 \+ 64 per payload byte"),
    "ans truncated": (lambda m, p: (_stored(m, "ans").__setitem__(3, _stored(m, "ans")[3] - 4) or m, p),
                      r"field 'tensors\[\d+\]' \(buffer '0\.code\.indices', stored 'ans'\): "),
    "ans unknown mode": (lambda m, p: _restream(m, p, b"\x03" + bytes(8)), "unknown mode 3"),
    "ans counts not summing": (lambda m, p: _restream(m, p, bytes([8 | 0, 100, 27])), "counts sum to 127, not to the 128"),
    "ans symbol >= 2**bits": (lambda m, p: _restream(m, p, bytes([17 << 2]) + bytes(16) + bytes([128, 1])),
                              r"17 counts .*k=16 allows"),
    "ans packed wrong length": (lambda m, p: _restream(m, p, b"\x02" + bytes(63)),
                                "a packed ANS stream of 128 symbols at 4 bits has 1 \\+ 64 bytes, got 64"),
    "ans empty": (lambda m, p: _restream(m, p, b""), "the ANS stream is empty"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED_STORED))
def test_malformed_stored_fields_raise_vqfileerror_naming_the_field(tmp_path, coded_file, case):
    mutate, match = _MALFORMED_STORED[case]
    _, meta, payload = _split(coded_file)
    assert sum(len(e) == 9 and e[8] == "ans" and e[3] != 1 + 64 for e in meta["tensors"]) >= 1   # a real ANS stream
    meta, payload = mutate(meta, payload)
    (tmp_path / "bad.vqz").write_bytes(_build(meta, payload))
    with pytest.raises(VQFileError, match=match):
        load(tmp_path / "bad.vqz")


def test_coded_file_loads_and_random_damage_gives_only_vqfileerror(tmp_path, coded_file):
    """The store_dtype + ANS file loads to the rounded model; junk in its JSON values or bytes of its payload
    (checksum recomputed, as a crafted file would) give VQFileError or a model, nothing else."""
    (tmp_path / "ok.vqz").write_bytes(coded_file)
    back = load(tmp_path / "ok.vqz")
    want = round_to_store_dtype_(_coded_vq(), "float16")
    assert all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), back.state_dict().values()))
    _, meta, payload = _split(coded_file)
    rng = random.Random(1)
    junk = [None, -1, 0, 2 ** 70, 1.5, "", "ans", "float16", "bfloat16", "float64", [], {}]
    for _ in range(60):
        bad = copy.deepcopy(meta)
        e = rng.choice(bad["tensors"])
        e[rng.randrange(len(e))] = rng.choice(junk)
        (tmp_path / "f.vqz").write_bytes(_build(bad, payload))
        with contextlib.suppress(VQFileError):
            load(tmp_path / "f.vqz")
    for _ in range(60):
        p = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        (tmp_path / "p.vqz").write_bytes(_build(meta, bytes(p)))
        with contextlib.suppress(VQFileError):
            load(tmp_path / "p.vqz")


# ---------------------------------------------------------------- indices checked against K

def test_out_of_range_indices_are_refused(tmp_path):
    model = _lenet_k200()
    path = tmp_path / "k200.vqz"
    save(model, path)
    _, meta, payload = _split(path.read_bytes())
    name, _, off, n, bits = next(e for e in meta["tensors"] if e[0].startswith("classifier.1.") and e[0].endswith("indices"))[:5]
    assert bits == 8
    patched = bytearray(payload)
    patched[off + 3] = 255                                  # one index -> 255 >= K = 200
    (tmp_path / "bad.vqz").write_bytes(_build(meta, bytes(patched)))
    for kw in ({}, {"model": _lenet_k200()}):
        with pytest.raises(ValueError, match=r"classifier\.1.*\[\d+, 255\].*K=200"):
            load(tmp_path / "bad.vqz", **kw)



def _packed_file(tmp_path, model) -> tuple[dict, bytes, int, int, int]:
    """Save model() (packed by vqlab.pack_simd_): (meta, payload, offset, length, bits) of layer 0's packed buffer."""
    path = tmp_path / "packed.vqz"
    save(model(), path)
    _, meta, payload = _split(path.read_bytes())
    _, _, off, n, bits = next(e for e in meta["tensors"] if e[0] == "0.code.packed")[:5]
    return meta, payload, off, n, bits


def _patched_are_refused(tmp_path, model, meta, payload, off, cases) -> None:
    """Each (byte, value, match) written into the packed buffer at off: load refuses the file (checksum
    recomputed: otherwise valid) with a ValueError matching `match`, with and without model=."""
    for where, value, match in cases:
        patched = bytearray(payload)
        patched[off + where] = value
        (tmp_path / "bad.vqz").write_bytes(_build(meta, bytes(patched)))
        for kw in ({}, {"model": model()}):
            with pytest.raises(ValueError, match=match):
                load(tmp_path / "bad.vqz", **kw)


def test_crafted_simd_packed_buffers_are_refused(tmp_path):
    """A packed simd code (vqlab.pack_simd_) with K=5: a nibble >= K at a real position, or a non-zero padding
    nibble, in an otherwise valid file (checksum recomputed) is refused by load, with and without model=."""
    from vqlab.methods.vq_simd import pack_simd_

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 4))
        quantize_(m, VQConfig(k=5, d=2), filter_fn=all_layers, progress=False)
        pack_simd_(m)
        return m

    meta, payload, off, n, bits = _packed_file(tmp_path, model)
    assert bits == 8
    assert n == 2 * 16 * 32      # layout (1, 1, 2, 16, 32): 32 segments, blocks of rows 0-31 and 32-63
    # byte 0: rows 0 / 16 at segment 0; byte 512 (block 1): row 32 (real) / row 48 (padding: 40 rows)
    _patched_are_refused(tmp_path, model, meta, payload, off, [(0, 0x07, r"K=5"), (512, 0x10, r"padding")])


def test_crafted_simd_conv_buffers_and_geometry_are_refused(tmp_path):
    """A packed convolution code (SimdConvCode, K=11): a nibble >= K, a non-zero padding nibble (channels 8..15
    of a conv group with 8 outputs), and a code whose taps or groups disagree with its layer are refused by load,
    with and without model= (checksum recomputed: the file is otherwise valid)."""
    from vqlab.methods.vq_simd import pack_simd_

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
        quantize_(m, VQConfig(k=11, d=2, iters=2), filter_fn=all_layers, progress=False)
        pack_simd_(m)
        return m

    meta, payload, off, n, bits = _packed_file(tmp_path, model)
    assert bits == 8 and n == 2 * 1 * 9 * 1 * 16        # (groups, blocks of 16, taps, S2, 16)
    _patched_are_refused(tmp_path, model, meta, payload, off,
                         [(3, 0x0B, r"K=11"), (3, 0xB0, r"K=11"), (12, 0x01, r"padding")])
    text = json.dumps(meta)
    for old, new in [('"taps": 9', '"taps": 3'), ('"groups": 2', '"groups": 4')]:
        assert old in text
        (tmp_path / "bad.vqz").write_bytes(_build(json.loads(text.replace(old, new, 1)), payload))
        with pytest.raises((ValueError, VQFileError)):
            load(tmp_path / "bad.vqz")


# ---------------------------------------------------------------- atomic save

class _FullDisk:
    """A file object whose writes fail with ENOSPC once `limit` bytes were written (after writing them)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, b) -> int:
        if len(b) > self.left:
            self.f.write(bytes(b)[:self.left])
            self.f.flush()
            raise OSError(28, "No space left on device")
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail_halfway(monkeypatch, limit: int) -> None:
    real_open, real_fdopen = builtins.open, os.fdopen

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _FullDisk(f, limit) if "w" in mode or "a" in mode else f
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(real_fdopen(fd, mode, *a, **k), limit))


def _raise_enospc(*a, **k):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "model.vqz"
    save(_tiny_vq(), path)
    os.chmod(path, 0o640)
    before = path.read_bytes()
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))   # a different, bigger model
    if where == "write":
        _fail_halfway(monkeypatch, len(before) // 2)
    else:
        monkeypatch.setattr(os, where, _raise_enospc)
    with pytest.raises(OSError, match="No space left on device"):
        save(other, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.vqz"]            # no temporary file left behind
    save(other, path)                                        # a good save replaces it, mode kept
    assert path.read_bytes() != before and (os.stat(path).st_mode & 0o777) == 0o640
    assert torch.equal(load(path)[0].weight, other[0].weight)


def test_failed_save_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    _fail_halfway(monkeypatch, 100)
    with pytest.raises(OSError, match="No space left"):
        save(_tiny_vq(), tmp_path / "new.vqz")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- models the file cannot rebuild

def test_local_class_and_lambda_save_and_load_with_model(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    net = Net()
    save(net, tmp_path / "net.vqz")
    with pytest.raises(VQFileError, match=r"Net', which is not on vqlab's allow-list.*model="):
        load(tmp_path / "net.vqz")
    other = load(tmp_path / "net.vqz", model=Net())
    assert torch.equal(other.fc.weight, net.fc.weight)

    seq = nn.Sequential(nn.Linear(4, 4))
    seq.act = lambda x: x
    save(seq, tmp_path / "seq.vqz")
    with pytest.raises(VQFileError, match=r"'act \(function\)'.*model="):
        load(tmp_path / "seq.vqz")
    assert torch.equal(load(tmp_path / "seq.vqz", model=nn.Sequential(nn.Linear(4, 4)))[0].bias, seq[0].bias)


def test_meta_device_model_is_refused_on_save(tmp_path):
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="parameter '0.weight' is on the meta device"):
        save(m, tmp_path / "m.vqz")
    assert not (tmp_path / "m.vqz").exists()


def test_attribute_values_round_trip(tmp_path):
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.LayerNorm([4, 5, 5]))
    m.norm_layer = nn.BatchNorm2d
    m.make_norm = functools.partial(nn.LayerNorm, eps=1e-6)
    m.sizes, m.misc = (1, (2, 3)), ["a", None, 1.5, True, float("inf")]
    save(m, tmp_path / "a.vqz")
    back = load(tmp_path / "a.vqz")
    assert back.norm_layer is nn.BatchNorm2d and back.make_norm.func is nn.LayerNorm
    assert back.make_norm.keywords == {"eps": 1e-6}
    assert back.sizes == (1, (2, 3)) and back.misc == ["a", None, 1.5, True, float("inf")]
    assert back[0].padding == "same" and back[1].normalized_shape == (4, 5, 5)
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(m(x), back(x))
    assert isinstance(back[0], nn.Conv2d) and VQLinear not in {type(t) for t in back.modules()}


# ---------------------------------------------------------------- module fields checked on load (issue 27)

@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    """A LeNet-5 (8x8) with VQ layers and one with lattice layers, saved: {"vq": bytes, "lattice": bytes}."""
    out = {}
    for name, config in (("vq", VQConfig(k=16, d=2, iters=2)), ("lattice", None)):
        torch.manual_seed(0)
        m = get_model("lenet5", input_size=8)
        from vqlab.methods.lattice import LatticeConfig
        quantize_(m, config or LatticeConfig(lattice="D4", step=0.05), progress=False)
        path = tmp_path_factory.mktemp(name) / "m.vqz"
        save(m.eval(), path)
        out[name] = path.read_bytes()
    return out


def _node(meta: dict, type_: str, i: int = 0) -> dict:
    return [n for n in meta["modules"] if n["type"] == type_][i]


def _state(type_: str, key: str, value, i: int = 0):
    return lambda m: _node(m, type_, i).setdefault("state", {}).__setitem__(key, value)


def _config(type_: str, key: str, value):
    return lambda m: _node(m, type_)["config"].__setitem__(key, value)


_FIELDS = {   # file, mutation, what the VQFileError says: every one loaded and failed only at forward before
    "conv padding -1": ("vq", _state("torch.nn.Conv2d", "padding", {"t": [-1, 1]}), r"state.padding .*\(-1, 1\)"),
    "conv stride 0": ("vq", _state("torch.nn.Conv2d", "stride", {"t": [0, 1]}), r"state.stride .*\(0, 1\)"),
    "conv dilation str": ("vq", _state("torch.nn.Conv2d", "dilation", {"t": ["x", 1]}), r"state.dilation"),
    "conv stride float": ("vq", _state("torch.nn.Conv2d", "stride", {"t": [1.5, 1]}), r"state.stride"),
    "conv padding huge": ("vq", _state("torch.nn.Conv2d", "padding", {"t": [2 ** 62, 1]}), r"state.padding"),
    "conv one-entry stride": ("vq", _state("torch.nn.Conv2d", "stride", {"t": [1]}), r"state.stride"),
    "conv groups": ("vq", _state("torch.nn.Conv2d", "groups", 3), r"groups=3 must divide"),
    "conv padding mode": ("vq", _state("torch.nn.Conv2d", "padding_mode", "mirror"), r"state.padding_mode"),
    "conv same with stride": ("vq", lambda m: (_state("torch.nn.Conv2d", "padding", "same")(m),
                                               _state("torch.nn.Conv2d", "stride", {"t": [2, 2]})(m)),
                              r"padding='same' needs stride 1"),
    "conv kernel vs weight": ("vq", _state("torch.nn.Conv2d", "kernel_size", {"t": [5, 5]}), r"weight .* does not fit"),
    "conv padding twice": ("vq", _state("torch.nn.Conv2d", "_reversed_padding_repeated_twice", [9, 9, 9, 9]),
                           r"_reversed_padding_repeated_twice must be"),
    "pool kernel 0": ("vq", _state("torch.nn.MaxPool2d", "kernel_size", 0), r"state.kernel_size"),
    "pool padding > half": ("vq", _state("torch.nn.MaxPool2d", "padding", 2), r"at most half"),
    "pool ceil_mode int": ("vq", _state("torch.nn.MaxPool2d", "ceil_mode", 2), r"state.ceil_mode"),
    "pool return indices": ("vq", _state("torch.nn.MaxPool2d", "return_indices", True), r"return_indices"),
    "flatten order": ("vq", _state("torch.nn.Flatten", "end_dim", 0), r"start_dim=1 comes after end_dim=0"),
    "flatten dim str": ("vq", _state("torch.nn.Flatten", "start_dim", "1"), r"state.start_dim"),
    "relu state emptied": ("vq", lambda m: _node(m, "torch.nn.ReLU").__setitem__("state", {}), r"misses \['inplace'\]"),
    "null child": ("vq", lambda m: _node(m, "torch.nn.Sequential")["children"][1].__setitem__(1, None),
                   r"cannot hold an empty \(null\) child"),
    "VQ conv dilation 0": ("vq", _config("vqlab:conv2d", "dilation", [0, 1]), r"QuantizedConv2d.dilation .* got 0"),
    "VQ conv padding str": ("vq", _config("vqlab:conv2d", "padding", "full"), r"QuantizedConv2d.padding must be"),
    "VQ conv stride float": ("vq", _config("vqlab:conv2d", "stride", [1e-30, 1]), r"QuantizedConv2d.stride"),
    "VQ conv kernel pair": ("vq", _config("vqlab:conv2d", "kernel_size", [3, 3, 3]), r"QuantizedConv2d.kernel_size"),
    "VQ indices 1-D": ("vq", lambda m: next(e for e in m["tensors"] if e[0].endswith("indices")).__setitem__(
        6, [math.prod(next(e for e in m["tensors"] if e[0].endswith("indices"))[6])]), r"indices' is \[\d+\]"),
    "lattice step negative": ("lattice", _config("code:lattice", "step", -0.05), r"step must be a finite number > 0"),
    "lattice step huge": ("lattice", _config("code:lattice", "step", 1e300), r"beyond float32's range"),
    "lattice config null": ("lattice", lambda m: _node(m, "code:lattice").__setitem__("config", None),
                            r"config must be an object"),
    "lattice rows": ("lattice", _config("code:lattice", "rows", 2 ** 40), r"rows|geometry|decode"),
}


@pytest.mark.parametrize("case", sorted(_FIELDS))
def test_module_fields_are_checked_on_load(tmp_path, lenet_files, case):
    """Issue 27: JSON mutations of module fields (padding, stride, dilation, a negative or tiny lattice step, ...) that
    loaded and only failed at forward, and crafted tensors that escaped VQFileError, are refused by load."""
    which, mutate, match = _FIELDS[case]
    _, meta, payload = _split(lenet_files[which])
    mutate(meta)
    (tmp_path / "bad.vqz").write_bytes(_build(meta, payload))
    with pytest.raises(VQFileError, match=match):
        load(tmp_path / "bad.vqz")


def test_a_failed_load_into_a_model_changes_nothing(tmp_path):
    """Issue 27 item 9: load(path, model=m) that fails leaves every tensor of m as it was (the same objects, the
    same values): a model whose last layer does not fit."""
    torch.manual_seed(0)
    src = get_model("lenet5", input_size=8)
    quantize_(src, VQConfig(k=16, d=2, iters=2), progress=False)
    save(src, tmp_path / "m.vqz")

    def target(last_out: int) -> nn.Module:
        torch.manual_seed(1)
        m = get_model("lenet5", input_size=8, num_classes=last_out)
        quantize_(m, VQConfig(k=16, d=2, iters=2), progress=False)
        return m

    model = target(11)                                      # the last layer is Linear(84, 11): does not fit
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(VQFileError, match=r"classifier\.5"):
        load(tmp_path / "m.vqz", model=model)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(id(after[k]) == i and torch.equal(after[k], v) for k, (i, v) in before.items())


def test_a_failed_check_after_staging_restores_the_model(tmp_path, monkeypatch):
    """The same when the failure comes after the file's tensors were put in place (a layer's validate)."""
    from vqlab.layers import QuantizedLayer
    torch.manual_seed(0)
    src = get_model("lenet5", input_size=8)
    quantize_(src, VQConfig(k=16, d=2, iters=2), progress=False)
    save(src, tmp_path / "m.vqz")
    torch.manual_seed(1)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(k=16, d=2, iters=2), progress=False)
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    calls = []

    def refuse(self):
        calls.append(self)
        if len(calls) == 2:
            raise ValueError("refused by the test")
    monkeypatch.setattr(QuantizedLayer, "validate", refuse)
    with pytest.raises(VQFileError, match="refused by the test"):
        load(tmp_path / "m.vqz", model=model)
    after = model.state_dict(keep_vars=True)
    assert all(id(after[k]) == i and torch.equal(after[k], v) for k, (i, v) in before.items())


def test_a_failed_save_names_the_users_path(tmp_path):
    """Issue 27: save(m, a_folder) and save(m, "/proc/x.vqz") named the hidden temporary file."""
    m = nn.Sequential(nn.Linear(2, 2))
    for path, error in ((tmp_path, IsADirectoryError), ("/proc/x.vqz", OSError),
                        (tmp_path / "missing" / "m.vqz", FileNotFoundError)):
        with pytest.raises(error) as caught:
            save(m, path)
        assert caught.value.filename == os.fspath(path) and ".tmp" not in str(caught.value), str(caught.value)
        assert os.fspath(path) in str(caught.value)
    assert os.listdir(tmp_path) == []
