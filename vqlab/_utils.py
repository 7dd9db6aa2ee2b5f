"""Small helpers shared by every vqlab module (defined once, imported everywhere)."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "default_device", "index_dtype", "bits_for", "index_bits_per_weight", "fast_mode", "pair",
           "FLOAT_DTYPE_NAMES"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bits_for(k: int) -> int:
    """Bits one index into a K-entry codebook takes: ceil(log2 K), at least 1."""
    if k < 2:
        raise ValueError(f"codebook size K must be >= 2, got K={k}")
    return max(1, math.ceil(math.log2(k)))


def index_dtype(k: int) -> torch.dtype:
    """Smallest torch integer dtype that holds indices 0..K-1 (uint8, int16 or int32)."""
    if k <= 256:
        return torch.uint8
    if k <= 2**15:
        return torch.int16
    return torch.int32


def fast_mode() -> bool:
    """True when notebooks/CI asked for the quick variant (environment VQLAB_FAST=1)."""
    return os.environ.get("VQLAB_FAST") == "1"


# float dtypes by the names configs and files use for them
FLOAT_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                     "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}


def pair(v) -> tuple[int, int]:
    """An int or a pair of ints (nn.Conv2d's kernel_size/stride/padding/dilation style) -> (a, b) ints."""
    return tuple(int(t) for t in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def index_bits_per_weight(k: int, d: int) -> float:
    """Index bits per weight of a K-word codebook over segments of d weights, as stored: ceil(log2 K) / d
    (codebooks not included).  The one definition every report, sweep and widget uses."""
    return bits_for(k) / d
