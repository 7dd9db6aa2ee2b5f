"""FLOP accounting, dense vs VQ, per layer: `count_flops(model, input_shape) -> DataFrame`.

Convention (as torch.utils.flop_counter): a multiply-add is 2 FLOPs, biases are not counted.
For a layer with m outputs and n inputs, applied to `rows` input vectors (batch x positions):
    dense            2 * rows * m * n
    VQ table         2 * rows * T * n * K        (each input segment against all K codewords; T tables per row:
                                                  G codebook groups and c conv groups give T = c + G - gcd(c, G))
    VQ accumulate        rows * m * n / d        (one add per table entry read)
Quantized layers are counted by their layer and code (`QuantizedLinear.flops` / `QuantizedConv2d.flops`, which
ask `WeightCode.flops` / `conv_flops`): for VQ that is `vqlab.kernels.flops.lut_flops`, the formula the custom
ops register with FlopCounterMode, so the two counts agree by construction; a code without a product of its own
counts the dense product it runs.
Convolutions count rows = batch * output positions (im2col, which is what vqlab's kernel runs; a
kernel that shares each input pixel's table across the kh*kw positions would need less).
One convention everywhere (notebook 03's prose, heat map and tables, the speed panel): the FLOPs above, so the
VQ / dense ratio of one layer is `flop_ratio` = (2nK + mn/d) / (2mn) = K/m + 1/(2d) -- the table's
multiply-adds are 2 FLOPs each like the dense product's, the accumulation's adds 1 FLOP each.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn as nn

from .layers import QuantizedLayer

__all__ = ["count_flops", "flop_ratio"]


def flop_ratio(k: int, d: int, m: int) -> float:
    """VQ / dense FLOPs of one layer with m outputs (torch's convention, module docstring): K/m (the table,
    2nK FLOPs) + 1/(2d) (the accumulation, mn/d adds) over the dense product's 2mn FLOPs.  It equals
    `count_flops(...)["ratio"]` of a linear VQ layer, e.g. flop_ratio(256, 4, 120) = 2.258 for LeNet-5's
    classifier.1."""
    return k / m + 1 / (2 * d)


def _geometry(mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """(rows, m, n): input vectors, outputs, inputs per output of one call."""
    if isinstance(mod, nn.Conv2d) or hasattr(mod, "in_channels"):
        kh, kw = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
        rows = y.shape[0] * y.shape[2] * y.shape[3]
        return rows, mod.out_channels, mod.in_channels // mod.groups * kh * kw
    return x.numel() // x.shape[-1], mod.out_features, mod.in_features


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> pd.DataFrame:
    """Run one forward pass on zeros of `input_shape` (batch included) and count FLOPs per layer.

    returns: layer, type, rows, m, n, K, d, dense_flops, vq_table_flops, vq_accum_flops, vq_flops, ratio
    (vq_flops / dense_flops; for float layers vq_* equal the dense count and ratio is 1).
    Sums over the rows give the model: dense totals agree with FlopCounterMode on the float model.
    """
    rows, hooks = [], []

    def hook(name):
        def fn(mod, inputs, output):
            r, m, n = _geometry(mod, inputs[0], output)
            dense = 2 * r * m * n
            if isinstance(mod, QuantizedLayer):          # the layer's code counts (VQ: the kernels' own formula)
                table, accum = mod.flops(r, tuple(inputs[0].shape))
                info = mod.code.describe()
                k, d = info["K"] if info["K"] is not None else pd.NA, info["d"] if info["d"] is not None else pd.NA
            else:
                k = d = pd.NA
                table, accum = 0, dense
            rows.append({"layer": name, "type": type(mod).__name__, "rows": r, "m": m, "n": n, "K": k, "d": d,
                         "dense_flops": dense, "vq_table_flops": table, "vq_accum_flops": accum,
                         "vq_flops": table + accum})
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, QuantizedLayer)):
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        model(torch.zeros(input_shape, device=p.device if p is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    df = pd.DataFrame(rows, columns=["layer", "type", "rows", "m", "n", "K", "d", "dense_flops", "vq_table_flops",
                                     "vq_accum_flops", "vq_flops"])
    df["ratio"] = df["vq_flops"] / df["dense_flops"]
    return df.astype({"K": "Int64", "d": "Int64"})
