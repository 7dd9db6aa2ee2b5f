"""Datasets as in-memory tensors: `load_dataset(name, split)` and a fast batch `loader`.

Every dataset comes back as a `TensorDataset(images, labels)` with
images: (N, C, H, W) float32, normalised per channel with the training split's mean/std,
labels: (N,) int64 in [0, num_classes).
Keeping one pre-converted tensor and batching by indexing is ~10x faster here than a
DataLoader over PIL images (DEVELOPERS.md / shared notes: ~8 s/epoch of overhead otherwise).
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "DatasetNotFoundError", "DatasetCorruptError", "load_dataset", "pick_dataset", "loader",
           "TensorBatches", "dataset_info"]

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Debian's `apt-get install dataset-fashion-mnist` puts the real idx files here.
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": [Path("/usr/share/datasets/mnist")]}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int  # images are size x size
    num_classes: int
    classes: tuple[str, ...]


_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 10, tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, _FASHION),
    "mnist": DatasetInfo("mnist", 1, 28, 10, tuple(str(i) for i in range(10))),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    "eurosat": DatasetInfo("eurosat", 3, 64, 10, ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message says where we looked and how to get it."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but cannot be read as what it should be; the message names the file and the fault."""


def dataset_info(name: str) -> DatasetInfo:
    """Channels, image size, number and names of classes of a dataset known to vqlab."""
    key = _canonical(name)
    return DATASETS[key]


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, one of {sorted(DATASETS)}; got {name!r}")
    key = name.lower().replace("_", "-")
    key = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return key


# ---------------------------------------------------------------- normalisation

def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both splits with the training split's per-channel mean/std.  x: (N, C, H, W) in [0, 1]."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _to_float_nchw(images: np.ndarray, scale: float) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.require(images, requirements=["C", "W"])).float().div_(scale)
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- sources

def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits (1797 images), fixed stratified 75/25 split (random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    xtr, xte, ytr, yte = train_test_split(x, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target)
    return {"train": (xtr, ytr), "test": (xte, yte)}


_IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, 1 (labels) or 3 (images) dimensions


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (optionally gzip-compressed) with `dims` dimensions.

    Layout (big-endian): magic 0x00000801 (labels) or 0x00000803 (images), then one uint32 per dimension
    (n; or n, rows, cols), then exactly prod(dims) bytes.  returns an array of that shape.
    raises DatasetCorruptError naming the file and what is wrong with it.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DatasetCorruptError(f"{path}: truncated or damaged gzip file ({type(err).__name__}: {err}); "
                                  f"reinstall or re-download it") from None
    kind = "labels (idx1)" if dims == 1 else "images (idx3)"
    head = 4 + 4 * dims
    if len(data) < head:
        raise DatasetCorruptError(f"{path}: truncated: {len(data)} bytes, shorter than the {head}-byte idx header "
                                  f"of an {kind} file")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[dims]:
        raise DatasetCorruptError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[dims]:08x} "
                                  f"for {kind} of unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    need = int(np.prod(shape))
    if len(data) - head != need:
        what = "truncated" if len(data) - head < need else "too long"
        raise DatasetCorruptError(f"{path}: {what}: header says {' x '.join(map(str, shape))} = {need} bytes of "
                                  f"data, the file holds {len(data) - head}")
    return np.frombuffer(data, np.uint8, offset=head).reshape(shape)


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if all(any((folder / (n + ext)).exists() for ext in ("", ".gz")) for n in _IDX_NAMES["train"] + _IDX_NAMES["test"]):
            return folder
    return None


def _load_idx_dir(folder: Path, info: DatasetInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (img_name, lab_name) in _IDX_NAMES.items():
        img = next(folder / (img_name + e) for e in (".gz", "") if (folder / (img_name + e)).exists())
        lab = next(folder / (lab_name + e) for e in (".gz", "") if (folder / (lab_name + e)).exists())
        images, labels = _read_idx(img, 3), _read_idx(lab, 1)
        if images.shape[1:] != (info.size, info.size):
            raise DatasetCorruptError(f"{img}: images are {images.shape[1]} x {images.shape[2]}, "
                                      f"{info.name} has {info.size} x {info.size}")
        if len(labels) != len(images):
            raise DatasetCorruptError(f"label-count mismatch: {img} holds {len(images)} images but "
                                      f"{lab} holds {len(labels)} labels")
        if len(labels) and int(labels.max()) >= info.num_classes:
            raise DatasetCorruptError(f"{lab}: label {int(labels.max())} out of range, {info.name} has "
                                      f"{info.num_classes} classes (0..{info.num_classes - 1})")
        out[split] = (images, labels.astype(np.int64))
    return out


def _check_root(root, what: str) -> Path:
    """root as a Path; a root that exists but is not a folder is an error naming it."""
    try:
        path = Path(root)
    except TypeError:
        raise TypeError(f"{what} must be a folder path (str or os.PathLike), got {root!r}") from None
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}={str(path)!r} is a file, not a folder: point it at the folder that "
                                 f"holds the dataset files")
    return path


def _search_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = [_check_root(root, "root")] if root is not None else []
    if os.environ.get("VQLAB_DATA"):
        roots.append(_check_root(os.environ["VQLAB_DATA"], "$VQLAB_DATA"))
    roots.append(REPO_DATA_DIR)
    return roots


def _idx_candidates(key: str, roots: list[Path]) -> list[Path]:
    """Folders that may hold the four idx files: each root, its <name>/ and torchvision's <Class>/raw/."""
    tv = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[key]
    out = []
    for r in roots:
        out += [r, r / key, r / tv / "raw"]
    return out + SYSTEM_DIRS.get(key, [])


def _download_hint(key: str) -> str:
    apt = "  sudo apt-get install -y dataset-fashion-mnist   (Debian/Ubuntu, offline-friendly)\n" if key == "fashion-mnist" else ""
    return (f"How to get it:\n{apt}"
            f"  with a network: vqlab.load_dataset({key!r}, download=True) fetches it with torchvision into {REPO_DATA_DIR}\n"
            f"  or put the files under a folder and pass root=... or set VQLAB_DATA.")


def _not_found(key: str, looked: list[Path], reason: str) -> DatasetNotFoundError:
    places = "\n".join(f"  - {p}" for p in looked)
    return DatasetNotFoundError(f"dataset {key!r} not found. Looked in:\n{places}\n"
                                f"Download: {reason}\n{_download_hint(key)}")


def _torchvision_download(key: str, target: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fetch with torchvision's real loaders into `target` (needs a network)."""
    import torchvision.datasets as tvd

    target.mkdir(parents=True, exist_ok=True)
    if key in ("fashion-mnist", "mnist"):
        cls = tvd.FashionMNIST if key == "fashion-mnist" else tvd.MNIST
        return {s: ((d := cls(str(target), train=s == "train", download=True)).data.numpy(), d.targets.numpy())
                for s in ("train", "test")}
    if key == "cifar10":
        return {s: ((d := tvd.CIFAR10(str(target), train=s == "train", download=True)).data, np.asarray(d.targets))
                for s in ("train", "test")}
    if key == "eurosat":
        ds = tvd.EuroSAT(str(target), download=True)
        images = np.stack([np.asarray(ds[i][0], dtype=np.uint8) for i in range(len(ds))])  # (27000, 64, 64, 3)
        labels = np.asarray(ds.targets)
        order = np.random.default_rng(0).permutation(len(labels))  # fixed 80/20 split
        cut = int(0.8 * len(labels))
        return {"train": (images[order[:cut]], labels[order[:cut]]), "test": (images[order[cut:]], labels[order[cut:]])}
    raise AssertionError(key)


def _cached_download(key: str, roots: list[Path]) -> dict | None:
    """Datasets torchvision already downloaded under a root (cifar10/eurosat), loaded without network."""
    import torchvision.datasets as tvd

    for r in roots:
        try:
            if key == "cifar10" and (r / "cifar-10-batches-py").exists():
                return {s: ((d := tvd.CIFAR10(str(r), train=s == "train", download=False)).data, np.asarray(d.targets))
                        for s in ("train", "test")}
            if key == "eurosat" and (r / "eurosat").exists():
                return _torchvision_download(key, r)  # torchvision skips the download when files are intact
        except (RuntimeError, OSError):
            continue
    return None


_CACHE: dict[str, tuple[TensorDataset, TensorDataset]] = {}


def load_dataset(name: str = "digits", split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = True) -> TensorDataset:
    """Load a dataset as in-memory tensors.

    name: "digits" (embedded, needs nothing), "fashion-mnist", "mnist", "cifar10", "eurosat".
    split: "train" or "test".
    root: a folder to look in first; then $VQLAB_DATA, the repo's data/, and system folders
        (Debian's /usr/share/datasets/fashion-mnist/).  Missing datasets are downloaded with
        torchvision into data/ when `download` is true and a network exists.
    returns: TensorDataset(images (N, C, H, W) float32 normalised, labels (N,) int64).
    raises: DatasetNotFoundError naming the dataset, every place looked and how to get it;
        DatasetCorruptError naming a damaged file and what is wrong (bad magic number, truncated,
        label-count mismatch); TypeError/ValueError for an unknown name or split;
        NotADirectoryError when `root` (or $VQLAB_DATA) is a file.
    """
    key = _canonical(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None:
        _check_root(root, "root")  # also when the data is cached, and for digits (which needs no root)
    cache_key = f"{key}|{root}|{os.environ.get('VQLAB_DATA')}"
    if cache_key not in _CACHE:
        _CACHE[cache_key] = _load_both(key, root, download)
    return _CACHE[cache_key][0 if split == "train" else 1]


def _load_both(key: str, root, download: bool) -> tuple[TensorDataset, TensorDataset]:
    if key == "digits":
        raw, scale = _digits(), 16.0
    else:
        roots = _search_roots(root)
        raw, scale = None, 255.0
        looked: list[Path] = []
        if key in ("fashion-mnist", "mnist"):
            looked = _idx_candidates(key, roots)
            folder = _find_idx_dir(looked)
            raw = _load_idx_dir(folder, DATASETS[key]) if folder is not None else None
        else:
            looked = list(roots)
            raw = _cached_download(key, roots)
        if raw is None:
            if not download:
                raise _not_found(key, looked, "not attempted (download=False)")
            target = Path(root) if root is not None else REPO_DATA_DIR
            try:
                raw = _torchvision_download(key, target)
            except Exception as err:  # network errors come in many types; report one clear message
                raise _not_found(key, looked + [target], f"torchvision download into {target} failed "
                                 f"({type(err).__name__}: {str(err)[:200]})") from None
    train = _to_float_nchw(raw["train"][0], scale)
    test = _to_float_nchw(raw["test"][0], scale)
    train, test = _normalise(train, test)
    return (TensorDataset(train, torch.as_tensor(raw["train"][1], dtype=torch.int64)),
            TensorDataset(test, torch.as_tensor(raw["test"][1], dtype=torch.int64)))


def pick_dataset(preferred: str = "fashion-mnist", fallback: str = "digits",
                 root: str | os.PathLike | None = None) -> tuple[str, str]:
    """The dataset to run on: `preferred` when it is on disk, else `fallback`; never downloads.

    returns (name, note): the canonical name to pass to `load_dataset` / `train_or_load`, and one line
    to print that says which dataset was chosen and, on the fallback, how to get the preferred one.
    Only a missing dataset falls back; a damaged one raises DatasetCorruptError naming the file.

    Example (what the notebooks do):
        >>> DATASET, note = vqlab.data.pick_dataset()
        >>> print(note)
    """
    want, other = _canonical(preferred), _canonical(fallback)
    try:
        load_dataset(want, "test", root=root, download=False)   # loads and caches both splits
    except DatasetNotFoundError:
        how = ("sudo apt-get install -y dataset-fashion-mnist" if want == "fashion-mnist"
               else f"vqlab.load_dataset({want!r}, download=True) with a network")
        info = DATASETS[other]
        return other, (f"{want} is not on this machine, so this runs on {other} ({info.size}x{info.size} images) "
                       f"instead; to use {want}: {how}")
    return want, f"dataset: {want}"


# ---------------------------------------------------------------- batching

class TensorBatches:
    """Iterate (x, y) batches of a TensorDataset by indexing its tensors (no per-item collate).

    A fresh permutation is drawn each epoch from a generator seeded with `seed`, so two loaders with
    the same seed yield the same batches in the same order.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = dataset.tensors
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield tuple(t[idx] for t in self.tensors)


def loader(dataset: TensorDataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> TensorBatches:
    """Batches of (x, y) from an in-memory dataset, reproducible under `seed` (see TensorBatches)."""
    return TensorBatches(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)
