"""`auto` chooses from a cost model (issue 23): never by timing the call, the same answer every time, the machine's
constants measured once and stored as JSON that is validated (a corrupt or hostile file is ignored); `tune` times
when asked."""
import json
import math
import os

import pytest
import torch

import vqlab
import vqlab.kernels as K
from vqlab.kernels import cost, tuning as tune_mod
from vqlab.kernels.backends import numba_usable

pytestmark = pytest.mark.skipif(not numba_usable(), reason="numba not installed: auto has one candidate")

# rates of a plausible machine (one thread, AVX-512): what the tests choose with
KNOWN = cost.Constants(call_dense=3e-6, gemm_flops=9e10, stream_bytes=2e10, call_lut=1.5e-4, table_flops=1.8e10,
                       lookups=4e9, wide_lookups=1.2e9, unfold_bytes=3e9)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder holding KNOWN for this machine's key; nothing in memory."""
    monkeypatch.setenv("VQLAB_CACHE_DIR", str(tmp_path / "cache"))
    cost.forget()
    K.clear_caches()
    K.set_backend(None)
    yield tmp_path / "cache"
    cost.forget()
    K.clear_caches()


def _store(constants=KNOWN) -> None:
    assert cost._save(cost.cache_file(), cost.machine_key(), constants)


def _forbid_timing(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("auto must not time anything")
    monkeypatch.setattr(cost, "measure", boom)
    monkeypatch.setattr(cost, "_fastest", boom)
    monkeypatch.setattr(tune_mod, "_time_best", boom)


def _case(m, s, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, d, generator=g), torch.randint(0, k, (m, s), generator=g, dtype=torch.uint8), g)


def test_auto_follows_the_formula_the_same_every_time_and_never_times(cache, monkeypatch):
    _store()
    _forbid_timing(monkeypatch)
    book, idx, g = _case(4096, 256, 256, 4)
    picks = []
    for _ in range(3):
        K.clear_caches()
        cost.forget()                                          # read again from the file each round
        for batch in (1, 256):
            x = torch.randn(batch, 1024, generator=torch.Generator().manual_seed(batch))
            y = K.vq_matmul(x, book, idx)
            (key, name), = [(k_, v) for k_, v in K.auto_choices().items() if k_[2] == batch]
            assert torch.equal(y, K.vq_matmul(x, book, idx, backend=name))    # auto's output is its choice's
            work = cost.Work(batch, 4096, 256, 4, 256)
            costs = {"dense": cost.dense_cost(work, KNOWN), "numba": cost.numba_cost(work, KNOWN)}
            assert name == min(costs, key=costs.get)
            picks.append(name)
    # one vector: the LUT reads 1 M table entries where the GEMV reads a 16 MB weight; 256 vectors: the GEMM wins
    assert picks == ["numba", "dense"] * 3


def test_auto_conv_choice_uses_the_convolution_work(cache, monkeypatch):
    _store()
    _forbid_timing(monkeypatch)
    g = torch.Generator().manual_seed(1)
    book = torch.randn(64, 2, generator=g)
    idx = torch.randint(0, 64, (16, 6 * 25 // 2), generator=g, dtype=torch.uint8)
    x = torch.randn(300, 6, 14, 14, generator=g)
    y = K.vq_conv2d(x, book, idx, (16, 6, 5, 5), segment="kernel")
    (name,) = K.auto_choices().values()
    assert name == "dense"                                     # 300 images x 100 positions: im2col + lookups lose
    assert torch.equal(y, K.vq_conv2d(x, book, idx, (16, 6, 5, 5), segment="kernel", backend=name))


def test_a_vq_model_evaluates_without_timing_and_equals_the_reference(cache, monkeypatch):
    _store()
    _forbid_timing(monkeypatch)
    model = vqlab.models.get_model("lenet5").eval()
    vqlab.quantize_(model, vqlab.VQConfig(k=16, d=2))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        K.set_backend("torch")
        ref = model(x)
        K.set_backend(None)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_constants_are_measured_once_then_read_from_the_file(cache, monkeypatch):
    c = cost.constants()                                       # measured now, stored
    assert cost.cache_file().is_file() and os.stat(cost.cache_file()).st_mode & 0o077 == 0
    assert all(math.isfinite(v) and v > 0 for v in vars(c).values())
    data = json.loads(cost.cache_file().read_text())
    assert data["key"] == cost.machine_key() and data["constants"] == vars(c)
    cost.forget()
    _forbid_timing(monkeypatch)
    assert cost.constants() == c


def _hostile_files():
    good = {"key": None, "constants": vars(KNOWN)}             # key filled in by the test
    yield "not json", b"\x00\xffnot json{"
    yield "empty object", b"{}"
    yield "a list", b"[1, 2, 3]"
    yield "deep nesting", b"[" * 100000 + b"]" * 100000
    for field, value in [("lookups", -1.0), ("gemm_flops", 0), ("call_lut", "1e-4"), ("table_flops", True),
                         ("stream_bytes", 1e300), ("unfold_bytes", None)]:
        yield f"{field}={value!r}", {**good, "constants": {**vars(KNOWN), field: value}}
    yield "NaN", {**good, "constants": {**vars(KNOWN), "lookups": math.nan}}
    yield "missing constant", {**good, "constants": {k: v for k, v in vars(KNOWN).items() if k != "lookups"}}
    yield "extra constant", {**good, "constants": {**vars(KNOWN), "__class__": 1.0}}
    yield "other key", {**good, "key": {"cpu": "elsewhere"}}
    yield "huge", {**good, "pad": "x" * (cost.MAX_FILE_BYTES + 1)}


@pytest.mark.parametrize("name,content", list(_hostile_files()), ids=[n for n, _ in _hostile_files()])
def test_a_corrupt_or_hostile_cache_file_is_ignored_and_measured_again(cache, monkeypatch, name, content):
    path = cost.cache_file()
    path.parent.mkdir(mode=0o700, parents=True)
    if isinstance(content, dict):
        content = json.dumps({**content, "key": content["key"] or cost.machine_key()}).encode()
    path.write_bytes(content)
    measured = []
    fresh = cost.Constants(*[2 * v for v in vars(KNOWN).values()])
    monkeypatch.setattr(cost, "measure", lambda: measured.append(1) or fresh)
    assert cost.constants() == fresh and measured == [1]
    cost.forget()
    assert cost.constants() == fresh and measured == [1]       # the file was replaced by a valid one


def test_a_file_other_users_may_write_or_a_symlink_is_not_trusted(cache, monkeypatch, tmp_path):
    _store()
    path = cost.cache_file()
    fresh = cost.Constants(*[3 * v for v in vars(KNOWN).values()])
    monkeypatch.setattr(cost, "measure", lambda: fresh)
    os.chmod(path, 0o666)
    assert cost.constants() == fresh                           # group/world-writable: ignored
    cost.forget()
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({"key": cost.machine_key(), "constants": vars(KNOWN)}))
    path.unlink()
    path.symlink_to(planted)
    assert cost._load(path, cost.machine_key()) is None        # a symlink: ignored


def test_an_unwritable_cache_folder_keeps_the_constants_in_memory(tmp_path, monkeypatch):
    target = tmp_path / "file-not-folder"
    target.write_text("x")
    monkeypatch.setenv("VQLAB_CACHE_DIR", str(target))
    cost.forget()
    monkeypatch.setattr(cost, "measure", lambda: KNOWN)
    try:
        assert cost.constants() == KNOWN
        monkeypatch.setattr(cost, "measure", lambda: (_ for _ in ()).throw(AssertionError("measured twice")))
        assert cost.constants() == KNOWN
    finally:
        cost.forget()


def test_pinning_still_wins_over_the_cost_model(cache, monkeypatch):
    _store()
    _forbid_timing(monkeypatch)
    book, idx, g = _case(64, 32, 256, 4)
    x = torch.randn(3, 128, generator=g)
    for name in ("numba", "dense", "torch"):
        K.set_backend(name)
        assert torch.equal(K.vq_matmul(x, book, idx), K.vq_matmul(x, book, idx, backend=name))
    K.set_backend(None)
    assert K.auto_choices() == {}


def test_tune_times_each_backend_on_the_real_inputs_and_records_the_fastest(cache):
    model = vqlab.models.get_model("lenet5").eval()
    vqlab.quantize_(model, vqlab.VQConfig(k=16, d=2))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    report = K.tune(model, x, budget=0.0)
    layers = [n for n, m in model.named_modules() if hasattr(m, "code")]
    assert sorted(set(report["layer"])) == sorted(layers)
    assert set(report["backend"]) == set(K.available_backends()[:-1])
    for name, rows in report.groupby("layer"):
        best = rows.loc[rows["seconds"].idxmin(), "backend"]
        assert rows["chosen"].sum() == 1 and rows.loc[rows["chosen"], "backend"].item() == best
        assert model.get_submodule(name).backend == best
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not available"):
        K.tune(model, x, backends=["nope"])


def test_a_failed_measurement_falls_back_to_the_first_candidate(cache, monkeypatch):
    def broken():
        raise RuntimeError("no timer here")
    monkeypatch.setattr(cost, "measure", broken)
    book, idx, g = _case(64, 32, 256, 4)
    x = torch.randn(3, 128, generator=g)
    y = K.vq_matmul(x, book, idx)
    assert set(K.auto_choices().values()) == {"dense"}                     # registration order: dense first
    assert torch.equal(y, K.vq_matmul(x, book, idx, backend="dense"))
