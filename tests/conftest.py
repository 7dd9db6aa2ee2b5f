"""Shared test set-up: two threads like CI, and skip markers that say how to enable what is skipped."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _have_fashion() -> bool:
    """Fashion-MNIST on disk?  Missing -> the tests that need it skip; damaged files are not hidden:
    those tests then fail with the DatasetCorruptError that names the file."""
    from vqlab.data import DatasetCorruptError, DatasetNotFoundError, load_dataset

    try:
        load_dataset("fashion-mnist", "test", download=False)
        return True
    except DatasetNotFoundError:
        return False
    except DatasetCorruptError:
        return True


needs_fashion = pytest.mark.skipif(
    not _have_fashion(),
    reason="Fashion-MNIST not on disk: `sudo apt-get install -y dataset-fashion-mnist` (CI does) or set VQLAB_DATA",
)
