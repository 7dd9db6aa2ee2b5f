"""Crafted files under a memory cap: decompression bombs in lattice streams (lzma, bz2, huffman) and ANS entries, and
random damage to the JSON fields and payload bytes of a file of every method, give VQFileError, quickly and within
1 GiB of memory beyond what the interpreter holds after importing torch; a file that loads also runs forward.

The run happens in a child pytest process whose address space is capped with resource.setrlimit(RLIMIT_AS), so a
bomb fails the test (MemoryError or a killed child) instead of exhausting the machine.
"""
from __future__ import annotations

import bz2
import contextlib
import copy
import functools
import json
import lzma
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import vqlab
from vqlab import filemeta
from vqlab.io import VQFileError

from test_io_security import _build, _split

CHILD = os.environ.get("VQLAB_FILE_FUZZ_CHILD") == "1"
CAP = 1 << 30                                  # bytes of address space the child may add to its baseline
HERE = os.path.join(os.path.dirname(__file__), "fixtures", "v3")
child_only = pytest.mark.skipif(not CHILD, reason="runs inside test_file_fuzz_in_a_capped_child")


def _cap_memory() -> None:
    """RLIMIT_AS = what this process maps now (torch's libraries: several GB of address space) + CAP."""
    import resource
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + CAP, vm + CAP))


if CHILD:
    torch.set_num_threads(1)
    _cap_memory()


@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and RLIMIT_AS")
def test_file_fuzz_in_a_capped_child():
    if CHILD:
        pytest.skip("this is the child run")
    env = dict(os.environ, VQLAB_FILE_FUZZ_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "child"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"child fuzz run ended with status {proc.returncode} (negative: a signal):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


# ---------------------------------------------------------------- decompression bombs in a lattice stream

def _lattice_file(tmp_path, coder: str) -> tuple[dict, bytes]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    vqlab.quantize_(model, vqlab.LatticeConfig(lattice="Z", step=0.1, coder=coder), filter_fn=vqlab.all_layers,
                    progress=False)
    vqlab.save(model, tmp_path / "lat.vqz")
    _, meta, payload = _split((tmp_path / "lat.vqz").read_bytes())
    return meta, payload


def _zeros_stream(coder: str, nbytes: int) -> bytes:
    """`nbytes` zero bytes (a stream of zero symbols) coded by `coder`: a few hundred KB or bytes."""
    comp = (lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
            if coder == "lzma" else bz2.BZ2Compressor(9))
    chunk = bytes(1 << 24)
    return b"".join(comp.compress(chunk) for _ in range(nbytes >> 24)) + comp.flush()


def _bomb(meta: dict, payload: bytes, stream: bytes, rows: int, n: int) -> bytes:
    """The lattice file with its stream replaced by `stream` and its layer claiming rows x n weights."""
    meta = copy.deepcopy(meta)
    layer = next(x for x in meta["modules"] if x["type"] == "vqlab:linear")
    code = next(x for x in meta["modules"] if x["type"] == "code:lattice")
    layer["config"].update(in_features=n, out_features=rows)
    code["config"].update(rows=rows, n=n, nbytes=len(stream))
    entry = next(e for e in meta["tensors"] if e[0].endswith("stream"))
    entry[2], entry[3], entry[6] = 0, len(stream), [len(stream)]
    return _build(meta, stream)


@child_only
@pytest.mark.parametrize("coder, inflated, rows, n", [
    ("lzma", 1 << 30, 1 << 15, 1 << 15),     # 156 KB -> 1 GiB, the layer claims 2**30 weights
    ("lzma", 1 << 30, 8, 8),                 # the same stream for a layer of 64 weights
    ("bz2", 1 << 28, 1 << 14, 1 << 14),      # 208 bytes -> 256 MiB
    ("bz2", 1 << 28, 1 << 10, 1 << 10),      # within 2**22 + 64 per byte: refused by the layer's own size
])
def test_child_lattice_bombs(tmp_path, coder, inflated, rows, n):
    meta, payload = _lattice_file(tmp_path, coder)
    (tmp_path / "bomb.vqz").write_bytes(_bomb(meta, payload, _zeros_stream(coder, inflated), rows, n))
    t0 = time.perf_counter()
    with pytest.raises(VQFileError, match="decode|stream"):
        vqlab.load(tmp_path / "bomb.vqz")
    assert time.perf_counter() - t0 < 10


@child_only
def test_child_huffman_bomb(tmp_path):
    meta, payload = _lattice_file(tmp_path, "huffman")
    head = (1 << 31).to_bytes(4, "little") + bytes([0x11]) + bytes(127)      # 2 GiB announced, symbols 0/1, 1 bit each
    (tmp_path / "bomb.vqz").write_bytes(_bomb(meta, payload, head + bytes(4096), 1 << 15, 1 << 15))
    with pytest.raises(VQFileError):
        vqlab.load(tmp_path / "bomb.vqz")
    (tmp_path / "bomb.vqz").write_bytes(_bomb(meta, payload, head + bytes(4096), 64, 64))
    with pytest.raises(VQFileError, match="huffman"):
        vqlab.load(tmp_path / "bomb.vqz")


@child_only
def test_child_ans_entry_at_the_cap(tmp_path):
    """An ANS entry claiming the largest count the cap allows (2**26 values from a 2-byte-per-value... header only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    vqlab.quantize_(model, vqlab.VQConfig(k=16, d=4, iters=2), filter_fn=vqlab.all_layers, progress=False)
    vqlab.save(model, tmp_path / "a.vqz", index_coding="ans")
    _, meta, payload = _split((tmp_path / "a.vqz").read_bytes())
    entry = next(e for e in meta["tensors"] if len(e) == 9 and e[8] == "ans")
    entry[6] = [1 << 13, 1 << 13]
    (tmp_path / "b.vqz").write_bytes(_build(meta, payload))
    with pytest.raises(VQFileError):
        vqlab.load(tmp_path / "b.vqz")


# ---------------------------------------------------------------- random damage to a file of every method

def _fixtures() -> list[str]:
    return sorted(f for f in os.listdir(HERE) if f.endswith(".vqz") and ".f16." not in f)


@functools.lru_cache(maxsize=None)
def _v4(fname: str) -> tuple[dict, bytes]:
    """The fixture re-saved in today's format (meta, payload), its ANS twin for the `.ans` ones."""
    import tempfile
    back = vqlab.load(os.path.join(HERE, fname))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.vqz")
        vqlab.save(back, path, index_coding="ans" if ".ans." in fname else "packed")
        with open(path, "rb") as f:
            _, meta, payload = _split(f.read())
    return meta, payload


_JUNK = [None, -1, 0, 1, 2, 3, 7, 2 ** 31, 2 ** 62, -2 ** 40, 0.5, -0.25, 1e-30, 1e300, float("nan"), float("inf"),
         True, False, "", "x", "same", "valid", "reflect", "E8", "lzma", "bz2", "float16", [], [0], [1, 1], [0, 0],
         [-1, 2], [2, 2, 2], [3, 3], {}, {"t": [1, 1]}]


# A layer given another valid stride, padding, dilation, size or flatten range than the file's original is a valid
# layer of another architecture: the next layer may then get an input of the wrong size.  Only a forward pass on
# the intended input can tell; these are the errors that say so (a shape, not a field, is wrong).
_CHAIN = re.compile(r"shapes cannot be multiplied|Kernel size can't be greater than actual input size|"
                    r"x has \d+ features but|Output size is too small|to have \d+ channels, but got|"
                    r"must match the size of tensor|size mismatch|is invalid for input of size|Dimension out of range|"
                    r"array of sliding blocks as \(-?\d+, -?\d+\), but its components must be at least one")


def _spots(v, path=()):
    yield path
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        yield from _spots(x, path + (k,))


def _forward(model) -> None:
    """Run a loaded model (or list of models) on the fixtures' input; any exception fails the test."""
    import numpy as np
    x = torch.from_numpy(np.load(os.path.join(HERE, "expected.npz"))["x"])
    for m in model if isinstance(model, list) else [model]:
        with torch.no_grad():
            m.eval()(x)


def _build_v5(small: dict, payload: bytes) -> bytes:
    """A version-5 file: compact metadata (`vqlab.filemeta`), DEFLATE-coded, valid checksum."""
    import hashlib
    import struct
    meta_b = filemeta.deflate(small)
    body = struct.pack("<8sHHIQ", b"\x89VQLAB\r\n", 5, 0, len(meta_b), len(payload)) + meta_b + payload
    return body + hashlib.sha256(body).digest()


@child_only
@pytest.mark.parametrize("layout", [4, 5])
@pytest.mark.parametrize("fname", _fixtures() if CHILD else [])
def test_child_damaged_fields_and_bytes(tmp_path, fname, layout):
    """Junk in a random JSON value of "modules" (configs, states: padding, stride, dilation, steps, sizes) or of
    "tensors" (and format 5's "params", "store", "coding"), or random payload bytes (checksum recomputed), in the
    version-4 and the compact version-5 metadata: VQFileError, or a model whose forward runs."""
    meta, payload = _v4(fname)
    build = _build
    if layout == 5:
        meta, build = filemeta.compact({**meta, "version": 5}), _build_v5
    rng = random.Random(fname + str(layout) + os.environ.get("VQLAB_FUZZ_SEED", ""))
    paths = [p for p in _spots(meta) if len(p) > 1 and p[0] in ("modules", "tensors")]
    paths += [(k,) for k in ("params", "store", "coding") if k in meta]
    module_paths = [p for p in paths if p[0] == "modules" and len(p) >= 4 and p[2] in ("config", "state")]
    for i in range(60 if layout == 4 else 40):
        bad, data = copy.deepcopy(meta), payload
        if i % 4 == 3 and payload:
            data = bytearray(payload)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            path = rng.choice(module_paths if i % 4 < 2 and module_paths else paths)
            parent = functools.reduce(lambda v, k: v[k], path[:-1], bad)
            parent[path[-1]] = copy.deepcopy(rng.choice(_JUNK))
        (tmp_path / "f.vqz").write_bytes(build(bad, data))
        try:
            model = vqlab.load(tmp_path / "f.vqz")
        except VQFileError:
            continue
        except Exception as e:                                        # noqa: BLE001  the point of the test
            raise AssertionError(f"{fname}: {type(e).__name__} escaped VQFileError for "
                                 f"{_what(meta, bad, data, payload)}: {e}") from e
        try:
            _forward(model)
        except Exception as e:                                        # noqa: BLE001
            if isinstance(e, (RuntimeError, ValueError, IndexError)) and _CHAIN.search(str(e)):
                continue                          # valid layers that no longer chain: no per-module check can tell
            raise AssertionError(f"{fname}: loaded, then forward raised {type(e).__name__} for "
                                 f"{_what(meta, bad, data, payload)}: {e}") from e


def _what(meta, bad, data, payload) -> str:
    if data != payload:
        return "damaged payload bytes"
    for path in _spots(meta):
        with contextlib.suppress(KeyError, IndexError, TypeError):
            a = functools.reduce(lambda v, k: v[k], path, meta)
            b = functools.reduce(lambda v, k: v[k], path, bad)
            if not isinstance(a, (dict, list)) and (a != b or type(a) is not type(b)):
                return f"{'/'.join(map(str, path))} = {json.dumps(b)[:60]} (was {json.dumps(a)[:60]})"
    return "a changed container"
