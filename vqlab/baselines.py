"""Non-VQ baselines for the compression studies: uniform (scalar, linear) int-b quantization.

Symmetric, per output channel: w_q = round(w / s) * s with s = max|w_row| / (2^(b-1) - 1).
Weights are fake-quantized in place (kept as float tensors holding the quantized values), so every
vqlab tool (evaluate, fit) runs unchanged; the storage a real int-b file would need is reported.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn as nn

__all__ = ["uniform_quantize_", "fake_quantize_uniform"]


def fake_quantize_uniform(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel uniform quantization.  w: (out, ...) -> same shape and dtype."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    levels = 2 ** (bits - 1) - 1
    flat = w.reshape(len(w), -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels  # (out, 1)
    return (torch.round(flat / scale).clamp(-levels, levels) * scale).reshape(w.shape)


def _eligible(model: nn.Module, quantize_first_last: bool) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not quantize_first_last and layers:  # the same rule as vqlab.quantize_: first and last layer stay float
        layers = layers[1:-1]
    return layers


@torch.no_grad()
def uniform_quantize_(model: nn.Module, bits: int = 8, quantize_first_last: bool = False) -> pd.DataFrame:
    """Fake-quantize every Linear/Conv2d weight to `bits` (the first and last layer kept unless asked).

    returns: per layer: layer, shape, bits, weight_mse, params, bytes (b-bit weights packed + one
        float32 scale per output channel).
    """
    rows = []
    for name, mod in _eligible(model, quantize_first_last):
        w = mod.weight
        q = fake_quantize_uniform(w, bits)
        rows.append({"layer": name, "shape": tuple(w.shape), "bits": bits,
                     "weight_mse": (q - w).pow(2).mean().item(), "params": w.numel(),
                     "bytes": (w.numel() * bits + 7) // 8 + 4 * len(w)})
        w.copy_(q)
    return pd.DataFrame(rows)
