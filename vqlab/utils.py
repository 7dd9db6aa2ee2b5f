"""Small helpers every part of vqlab uses: seeding, the default device, fast mode, conv argument pairs."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "default_device", "fast_mode", "pair"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_mode() -> bool:
    """True when notebooks/CI asked for the quick variant (environment VQLAB_FAST=1)."""
    return os.environ.get("VQLAB_FAST") == "1"


def pair(v) -> tuple[int, int]:
    """An int or a pair of ints (nn.Conv2d's kernel_size/stride/padding/dilation style) -> (a, b) ints."""
    return tuple(int(t) for t in v) if isinstance(v, (tuple, list)) else (int(v), int(v))
