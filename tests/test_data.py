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
