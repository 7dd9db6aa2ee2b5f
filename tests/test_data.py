import pytest
import torch

import vqlab.data as vdata
from vqlab.data import DatasetNotFoundError, load_dataset, loader

from conftest import needs_fashion


def _check(ds, n, shape):
    x, y = ds.tensors
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.isfinite(x).all()


def test_digits_shapes_split_and_normalisation():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    _check(tr, 1347, (1, 8, 8))
    _check(te, 450, (1, 8, 8))
    x = tr.tensors[0]
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3  # train split normalised
    # the fixed split is stratified: every class in both splits, roughly 75/25
    assert torch.bincount(te.tensors[1]).min() >= 40


@needs_fashion
def test_fashion_mnist_real_files():
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    _check(tr, 60000, (1, 28, 28))
    _check(te, 10000, (1, 28, 28))
    assert torch.bincount(tr.tensors[1]).tolist() == [6000] * 10  # the real balanced set
    assert abs(tr.tensors[0].mean().item()) < 1e-4 and abs(tr.tensors[0].std().item() - 1) < 1e-3


def test_missing_dataset_names_dataset_and_places(tmp_path, monkeypatch):
    monkeypatch.setenv("VQLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(vdata, "REPO_DATA_DIR", tmp_path / "repo")
    monkeypatch.setitem(vdata.SYSTEM_DIRS, "fashion-mnist", [tmp_path / "system"])
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", root=tmp_path / "mine", download=False)
    msg = str(err.value)
    assert "'fashion-mnist' not found" in msg
    for place in ("mine", "env", "repo", "system"):
        assert str(tmp_path / place) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "download=True" in msg


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VQLAB_DATA", raising=False)
    monkeypatch.setattr(vdata, "REPO_DATA_DIR", tmp_path / "repo")

    def no_network(key, target):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(vdata, "_torchvision_download", no_network)
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'cifar10' not found(.|\n)*download into .* failed \(OSError") as err:
        load_dataset("cifar10", root=tmp_path / "mine")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no socket traceback chained


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset("digits", "val")


def test_loader_batches_cover_data_and_repeat_under_seed():
    ds = load_dataset("digits", "test")
    a = [y for _, y in loader(ds, 64, shuffle=True, seed=3)]
    b = [y for _, y in loader(ds, 64, shuffle=True, seed=3)]
    c = [y for _, y in loader(ds, 64, shuffle=True, seed=4)]
    assert len(a) == 8 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert sorted(torch.cat(a).tolist()) == sorted(ds.tensors[1].tolist())


def test_bad_name_types_list_the_valid_names():
    for bad in (None, 3, ["digits"]):
        with pytest.raises(TypeError, match=r"dataset name must be a string, one of \['cifar10', 'digits'"):
            load_dataset(bad)


def test_root_that_is_a_file_is_named(tmp_path, monkeypatch):
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(b"not a folder")
    for name in ("digits", "fashion-mnist"):
        with pytest.raises(NotADirectoryError, match=f"root='{f}' is a file, not a folder"):
            load_dataset(name, root=f, download=False)
    monkeypatch.setenv("VQLAB_DATA", str(f))
    with pytest.raises(NotADirectoryError, match=r"\$VQLAB_DATA='.*' is a file"):
        load_dataset("fashion-mnist", download=False)


# ---------------------------------------------------------------- idx files: a tiny valid set, then damage it

def _idx(dims: tuple, payload: bytes, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in dims) + payload


def _write_idx_set(folder, n_train=20, n_test=10, gz=True):
    import gzip

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        labels = (np.arange(n) % 10).astype(np.uint8).tobytes()
        for kind, blob in (("images-idx3", _idx((n, 28, 28), images, 0x803)), ("labels-idx1", _idx((n,), labels, 0x801))):
            path = folder / (f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(blob) if gz else blob)
            files[prefix, kind] = path
    return files


def test_small_valid_idx_set_loads(tmp_path):
    _write_idx_set(tmp_path / "ok")
    tr, te = load_dataset("fashion-mnist", "train", root=tmp_path / "ok", download=False), \
        load_dataset("fashion-mnist", "test", root=tmp_path / "ok", download=False)
    assert tr.tensors[0].shape == (20, 1, 28, 28) and te.tensors[1].tolist() == list(range(10))


@pytest.mark.parametrize("damage, message", [
    ("magic", r"train-images-idx3-ubyte: bad magic number 0x00000802, expected 0x00000803"),
    ("truncated", r"train-images-idx3-ubyte: truncated: header says 20 x 28 x 28 = 15680 bytes of data, the file holds 15000"),
    ("header", r"t10k-labels-idx1-ubyte: truncated: 5 bytes, shorter than the 8-byte idx header"),
    ("gzip", r"train-labels-idx1-ubyte.gz: truncated or damaged gzip file \((EOFError|BadGzipFile)"),
    ("count", r"label-count mismatch: .*t10k-images-idx3-ubyte.gz holds 10 images but .*t10k-labels-idx1-ubyte.gz holds 9 labels"),
    ("size", r"train-images-idx3-ubyte.gz: images are 14 x 56, fashion-mnist has 28 x 28"),
])
def test_damaged_idx_files_name_the_file_and_the_fault(tmp_path, damage, message):
    import gzip

    folder = tmp_path / damage
    files = _write_idx_set(folder, gz=damage not in ("magic", "truncated", "header"))
    if damage == "magic":
        p = files["train", "images-idx3"]
        p.write_bytes(b"\x00\x00\x08\x02" + p.read_bytes()[4:])
    elif damage == "truncated":
        p = files["train", "images-idx3"]
        p.write_bytes(p.read_bytes()[:16 + 15000])
    elif damage == "header":
        p = files["t10k", "labels-idx1"]
        p.write_bytes(p.read_bytes()[:5])
    elif damage == "gzip":
        p = files["train", "labels-idx1"]
        p.write_bytes(p.read_bytes()[:-12])
    elif damage == "count":
        p = files["t10k", "labels-idx1"]
        p.write_bytes(gzip.compress(_idx((9,), bytes(range(9)), 0x801)))
    elif damage == "size":
        p = files["train", "images-idx3"]
        p.write_bytes(gzip.compress(_idx((20, 14, 56), bytes(20 * 14 * 56), 0x803)))
    with pytest.raises(vdata.DatasetCorruptError, match=message) as err:
        load_dataset("fashion-mnist", root=folder, download=False)
    assert str(folder) in str(err.value)


def test_pick_dataset_prefers_what_is_on_disk(tmp_path, monkeypatch):
    monkeypatch.delenv("VQLAB_DATA", raising=False)
    monkeypatch.setattr(vdata, "REPO_DATA_DIR", tmp_path / "repo")
    monkeypatch.setitem(vdata.SYSTEM_DIRS, "fashion-mnist", [tmp_path / "system"])
    monkeypatch.setattr(vdata, "_CACHE", {})          # forget what other tests loaded
    name, note = vdata.pick_dataset()
    assert name == "digits" and "\n" not in note
    assert "fashion-mnist is not on this machine" in note and "sudo apt-get install -y dataset-fashion-mnist" in note
    _write_idx_set(tmp_path / "system")
    assert vdata.pick_dataset() == ("fashion-mnist", "dataset: fashion-mnist")
