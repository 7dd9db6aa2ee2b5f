"""Compress to a size budget: `vqlab.compress(model, train_ds, target_ratio=32) -> (model, CompressReport)`.

The recipe (the steps that took LeNet-5 from 12x to ~31x at about one point, ../shared/notes/fidelity.md):

1. **Candidates.**  For every nn.Linear / nn.Conv2d layer, a list of settings: the layer kept float, or one
   quantizer config (`methods`, default a VQ grid over K and d, segments along the flattened kernel for
   convolutions with one input channel per group).  Each candidate's bytes are what `compressed_size`
   counts for that layer alone (weight code and bias, floats at `store_dtype`).
2. **Sensitivity.**  Each candidate is applied to its layer alone, in the float model, without fine-tuning,
   and the mean KL divergence from the float model's predictions on a calibration set (the last
   `calib_size` training images) is the candidate's predicted loss.
3. **Allocation.**  A multiple-choice knapsack: one candidate per layer, least total predicted loss, total
   bytes (plus the bytes of everything else, e.g. BatchNorm) within dense_bytes / target_ratio.  Solved
   exactly by dynamic programming over bytes in units of `byte_unit` (a fixed unit, so a larger budget
   never yields a smaller model; each candidate's bytes are rounded up to whole units, so the budget holds).
   The same idea as mixed-precision allocators (HAQ, HAWQ) for bit widths.
4. **Layer by layer.**  The chosen layers are quantized one at a time, most sensitive first; after each,
   the rest of the model (float layers, biases, the codebooks so far and their latent weights) is
   fine-tuned with distillation from the float model (`fit(teacher=...)`); VQ layers may also re-assign
   their indices to the nearest codeword every `reassign_every` steps (off by default: on LeNet-5 at 32x it
   cost 0.6 points, -1.44 vs -0.86, seed 0).  Then a final fine-tuning pass.
5. **Storage.**  Floats (codebooks, biases, float layers) are rounded to `store_dtype` so that the
   returned model computes exactly what `vqlab.save(model, path, store_dtype=...)` stores.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from . import distributed as _dist
from .checks import check_choice, check_instance, check_int, check_number
from .layers import QuantizedLayer
from .methods.vq import VQCode, VQConfig
from .quantize import quantize_layer, set_submodule
from .size import SizeReport, compressed_size, round_to_store_dtype_
from .train import evaluate, fit

__all__ = ["compress", "CompressReport", "layer_candidates", "measure_sensitivity", "allocate", "default_methods"]

DEFAULT_K = (2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_D = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


@dataclass
class CompressReport:
    """What `compress` did.

    layers: one row per Linear/Conv2d layer in model order: layer, type, weights, setting (label), method,
        K, d, bits_per_weight, bytes (the layer's stored bytes: code + bias), float_bytes (the layer at
        float32), predicted_loss (calibration KL divergence with this setting alone), order (stage
        at which it was quantized; 0 = kept float), acc_after (accuracy after its stage's fine-tuning).
    stages: one row per stage: stage, layer, setting, steps, accuracy (val), ratio (packed, so far).
    candidates: every (layer, setting) measured: config, bytes, float_bytes, loss, accuracy (calibration),
        predicted_loss, chosen; pass it as `compress(..., sensitivity=)` to try another target.
    size: `compressed_size(model, store_dtype=...)` of the result.
    """

    target_ratio: float
    budget_bytes: int
    store_dtype: str | None
    float_accuracy: float
    accuracy: float
    layers: pd.DataFrame
    stages: pd.DataFrame
    candidates: pd.DataFrame
    size: SizeReport = field(repr=False)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Packed whole-model ratio (float32 bytes / stored bytes)."""
        return self.size.ratio

    def summary(self) -> pd.DataFrame:
        """One row: target, reached ratios (packed, Huffman, ANS when counted, lzma), bytes, accuracies."""
        row = {"target_ratio": self.target_ratio, "budget_bytes": self.budget_bytes,
               "bytes": self.size.compressed_bytes, "ratio": self.size.ratio,
               "huffman_ratio": self.size.huffman_ratio}
        if hasattr(self.size, "ans_ratio"):
            row["ans_ratio"] = self.size.ans_ratio
        row.update(lzma_ratio=self.size.lzma_ratio, float_accuracy=self.float_accuracy, accuracy=self.accuracy,
                   delta_points=100 * (self.accuracy - self.float_accuracy), seconds=self.seconds)
        return pd.DataFrame([row])


# ---------------------------------------------------------------- candidates

def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Linear/Conv2d layers in registration order, each module once (its first name)."""
    seen, out = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in seen:
            seen.add(id(m))
            out.append((name, m))
    return out


def default_methods(module: nn.Module, ks: Sequence[int] = DEFAULT_K, ds: Sequence[int] = DEFAULT_D,
                    max_bits: float = 4.0) -> list[VQConfig]:
    """The default VQ grid for one layer: every K in `ks`, d in `ds` that fits the layer, with
    ceil(log2 K) / d <= max_bits index bits per weight.  Convolutions with one input channel per group
    (LeNet's first conv) or a d not dividing the channels use segments along the flattened kernel."""
    out = []
    conv = isinstance(module, nn.Conv2d)
    for d in ds:
        for k in ks:
            if math.ceil(math.log2(k)) / d > max_bits:
                continue
            cin = module.in_channels // module.groups if conv else 0
            segments = ["input"] if not conv else ["kernel"] if cin == 1 else ["input", "kernel"]
            for seg in segments:                              # the first layout that fits (input before kernel)
                cfg = VQConfig(k=k, d=d, segment=seg)
                try:
                    cfg.check(module, "layer")
                except (ValueError, TypeError):
                    continue
                out.append(cfg)
                break
    return out


def _label(cfg) -> str:
    if cfg is None:
        return "float"
    if isinstance(cfg, VQConfig):
        return f"vq K={cfg.k} d={cfg.d}" + (" kernel" if cfg.segment == "kernel" else "")
    fields = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.name != "seed" and getattr(cfg, f.name) != f.default][:3]
    return f"{type(cfg).__name__.removesuffix('Config').lower()} " + " ".join(fields)


def layer_candidates(model: nn.Module, methods: Sequence | Callable | None = None) -> dict[str, list]:
    """{layer name: [None (float), config, ...]}: the settings `compress` may choose per layer.
    methods: configs to try on every layer (those whose `check` refuses a layer are left out for it), or a
    function layer -> configs (e.g. `lambda m: default_methods(m, ks=(4, 16))`); None = `default_methods`."""
    out = {}
    for name, m in _layers(model):
        if methods is None or callable(methods):
            cands = (methods or default_methods)(m)
        else:
            cands = []
            for cfg in methods:
                check = getattr(cfg, "check", None)
                try:
                    if check is not None:
                        check(m, name)
                except (ValueError, TypeError):
                    continue
                cands.append(cfg)
        out[name] = [None, *cands]
    return out


# ---------------------------------------------------------------- measuring

def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _quantized_copy(layer: nn.Module, cfg) -> nn.Module:
    """A quantized copy of one float layer (the layer itself is untouched)."""
    return quantize_layer(copy.deepcopy(layer), cfg)


def _stored_bytes(module: nn.Module, store_dtype) -> int:
    return compressed_size(nn.Sequential(module), store_dtype=store_dtype).compressed_bytes


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The model's logits (N, classes) in eval mode, float32 on CPU."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.cat([model(x[i:i + batch].to(dev)).float().cpu() for i in range(0, len(x), batch)])


def _scores(logits: torch.Tensor, y: torch.Tensor, ref_logp: torch.Tensor) -> tuple[float, float, float]:
    """(mean KL(reference || model) in nats, mean cross-entropy, accuracy) of logits against labels y."""
    logp = F.log_softmax(logits, 1)
    kl = F.kl_div(logp, ref_logp, reduction="batchmean", log_target=True).item()
    return kl, F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def measure_sensitivity(model: nn.Module, calib: TensorDataset, candidates: dict[str, list],
                        store_dtype=torch.float16, progress: bool = True) -> pd.DataFrame:
    """Bytes and predicted loss of every candidate: each is applied to its layer alone in `model` (restored
    afterwards), without fine-tuning.  calib: TensorDataset(x, y), a few thousand images.
    returns: one row per (layer, setting): layer, setting, config, method, K, d, bits_per_weight, bytes,
        float_bytes, loss (cross-entropy), accuracy (on calib), predicted_loss = the mean KL divergence
        (nats) from the float model's predictions to the model with this one layer quantized (0 for float;
        unlike a cross-entropy difference it is never negative and sees changes that keep the argmax)."""
    x, y = calib.tensors[0], calib.tensors[1]
    ref = F.log_softmax(_outputs(model, x), 1)
    rows = []
    total = sum(len(c) for c in candidates.values())
    with tqdm(total=total, desc="sensitivity", unit="setting", disable=not _dist.show_progress(progress), leave=False) as bar:
        for name, cands in candidates.items():
            layer = _get(model, name)
            float_bytes = sum(t.numel() * 4 for t in layer.parameters() if t.is_floating_point())
            for cfg in cands:
                if cfg is None:
                    q = layer
                    kl, loss, acc = _scores(ref, y, ref)
                else:
                    q = _quantized_copy(layer, cfg)
                    set_submodule(model, name, q)
                    try:
                        kl, loss, acc = _scores(_outputs(model, x), y, ref)
                    finally:
                        set_submodule(model, name, layer)
                k = getattr(cfg, "k", None)
                d = getattr(cfg, "d", None)
                code = getattr(q, "code", None)
                desc = code.describe() if code is not None else {}
                rows.append({"layer": name, "setting": _label(cfg), "config": cfg,
                             "method": desc.get("method", "float"), "K": k, "d": d,
                             "bits_per_weight": desc.get("bits_per_weight", 32.0 if cfg is None else np.nan),
                             "bytes": _stored_bytes(q, store_dtype), "float_bytes": float_bytes,
                             "loss": loss, "accuracy": acc, "predicted_loss": kl})
                bar.update(1)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- allocation

def allocate(table: pd.DataFrame, budget_bytes: int, fixed_bytes: int = 0, byte_unit: int = 1) -> pd.DataFrame:
    """Pick one row per layer of `table` (columns layer, bytes, predicted_loss): least total predicted loss
    with fixed_bytes + sum(bytes) <= budget_bytes.  Exact over bytes counted in whole `byte_unit`s (each
    row's bytes rounded up, the budget down, so the budget always holds); among equal losses the larger
    model wins, so a larger budget never gives a smaller model.
    returns the chosen rows (table's columns), in the order the layers first appear.
    raises ValueError when even the smallest setting of every layer exceeds the budget (naming the
    smallest reachable size)."""
    if byte_unit < 1:
        raise ValueError(f"byte_unit must be >= 1, got {byte_unit}")
    layers = list(dict.fromkeys(table["layer"]))
    cap = (budget_bytes - fixed_bytes) // byte_unit
    smallest = fixed_bytes + sum(int(table.loc[table["layer"] == n, "bytes"].min()) for n in layers)
    if cap < 0 or smallest > budget_bytes:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot be met: the smallest setting of every layer "
                         f"gives {smallest} bytes; allow smaller settings (methods=) or a lower target_ratio")
    inf = float("inf")
    best = np.zeros(cap + 1)                     # best[b]: least loss of the layers so far within b units
    size = np.zeros(cap + 1)                     # bytes of that choice (tie-break: larger)
    picks = []
    for n in layers:
        rows = table[table["layer"] == n]
        units = [-(-int(b) // byte_unit) for b in rows["bytes"]]
        new_best = np.full(cap + 1, inf)
        new_size = np.zeros(cap + 1)
        choice = np.full(cap + 1, -1, dtype=np.int64)
        for j, (u, loss, b) in enumerate(zip(units, rows["predicted_loss"], rows["bytes"])):
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + float(loss)
            csize = np.zeros(cap + 1)
            csize[u:] = size[: cap + 1 - u] + float(b)
            with np.errstate(invalid="ignore"):               # inf - inf where neither fits
                better = (cand < new_best - 1e-12) | ((np.abs(cand - new_best) <= 1e-12) & (csize > new_size))
            new_best = np.where(better, cand, new_best)
            new_size = np.where(better, csize, new_size)
            choice = np.where(better, j, choice)
        picks.append((rows, choice, units))
        best, size = new_best, new_size
    b = int(np.argmin(np.where(np.isfinite(best), best - 1e-9 * size / max(1, size.max()), inf)))
    chosen = []
    for rows, choice, units in reversed(picks):
        j = int(choice[b])
        chosen.append(rows.iloc[j])
        b -= units[j]
    return pd.DataFrame(list(reversed(chosen))).reset_index(drop=True)


# ---------------------------------------------------------------- the recipe

def _reuse(table: pd.DataFrame, model: nn.Module) -> pd.DataFrame:
    need = {"layer", "setting", "config", "bytes", "float_bytes", "predicted_loss"}
    if not isinstance(table, pd.DataFrame) or not need <= set(table.columns):
        raise ValueError(f"sensitivity must be a CompressReport.candidates table with columns {sorted(need)}")
    names = [n for n, _ in _layers(model)]
    if sorted(set(table["layer"])) != sorted(names):
        raise ValueError(f"sensitivity table is for layers {sorted(set(table['layer']))}, this model has {names}")
    return table.drop(columns="chosen", errors="ignore").copy()


def _with_reassign(cfg, reassign_every: int):
    if reassign_every and isinstance(cfg, VQConfig):
        return dataclasses.replace(cfg, reassign_every=reassign_every)
    return cfg


def _drop_latents(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, VQCode) and m.latent is not None:
            m.reassign()
            m.reassign_every = 0
            m.latent = None


_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without the forward / backward hooks the user put on `model`'s modules (a copy
    shares them, so they fired on every internal forward of the recipe)."""
    out = copy.deepcopy(model).eval()
    for m in out.modules():
        for attr in _HOOKS:
            if isinstance(getattr(m, attr, None), dict):
                setattr(m, attr, type(getattr(m, attr))())
    return out


def _restore_modes(work: nn.Module, modes: dict[str, bool]) -> nn.Module:
    """Give `work`'s modules the train / eval flags the input model's modules had under the same names (a module
    without a counterpart, e.g. a quantized layer's code, takes its parent's)."""
    for name, m in work.named_modules():
        parent = name.rpartition(".")[0] if name else None
        m.training = modes.get(name, modes.get(parent, m.training) if parent is not None else m.training)
        modes.setdefault(name, m.training)
    return work


def _check_dataset(field: str, ds, required: bool = True) -> None:
    """A TensorDataset(x, y) with N >= 1 samples, float x and integer labels y (N,); TypeError / ValueError naming
    `field` otherwise (None is allowed when not required)."""
    if ds is None and not required:
        return
    if not isinstance(ds, TensorDataset):
        hint = (" (a list of (x, y) pairs: TensorDataset(torch.stack(xs), torch.tensor(ys)))"
                if isinstance(ds, (list, tuple)) else "")
        raise TypeError(f"{field} must be a torch.utils.data.TensorDataset(x, y), got {type(ds).__name__}{hint}")
    if len(ds.tensors) < 2:
        raise ValueError(f"{field} must hold two tensors (x, y), got {len(ds.tensors)}")
    x, y = ds.tensors[0], ds.tensors[1]
    if len(x) == 0:
        raise ValueError(f"{field} is empty (0 samples)")
    if not x.is_floating_point() or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{field} must hold float inputs x (N, ...) and integer class labels y (N,), got x "
                         f"{x.dtype} {tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}")


def _check_labels(field: str, ds: TensorDataset | None, classes: int) -> None:
    """Every label of `ds` in [0, classes) (classes: the model's output width)."""
    if ds is None:
        return
    y = ds.tensors[1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"{field} has labels in [{lo}, {hi}] but the model predicts {classes} classes: every label "
                         f"must lie in [0, {classes - 1}]")


def _check_args(model, target_ratio, epochs, stage_steps, final_steps, lr, batch_size, temperature, distill_weight,
                reassign_every, calib_size, byte_unit, order, seed) -> None:
    """compress's arguments, each by the one error policy (`vqlab.checks`)."""
    check_instance("model", model, nn.Module, "torch.nn.Module")
    check_choice("order", order, ("sensitive-first", "robust-first", "model"))
    check_number("target_ratio", target_ratio, 0, low_open=True)
    check_number("epochs", epochs, 0)
    for name, v in (("stage_steps", stage_steps), ("final_steps", final_steps)):
        if v is not None:
            check_int(name, v, 0)
    check_number("lr", lr, 0, low_open=True)
    check_int("batch_size", batch_size, 1)
    check_number("temperature", temperature, 0, low_open=True)
    check_number("distill_weight", distill_weight, 0, 1)
    check_int("reassign_every", reassign_every, 0)
    check_int("calib_size", calib_size, 1)
    if byte_unit is not None:
        check_int("byte_unit", byte_unit, 1)
    check_int("seed", seed, 0)


def compress(model: nn.Module, train_ds: TensorDataset, target_ratio: float = 32.0, *,
             val_ds: TensorDataset | None = None, methods: Sequence | None = None, epochs: float = 2.0,
             stage_steps: int | None = None, final_steps: int | None = None, lr: float = 1e-3,
             batch_size: int = 128, temperature: float = 4.0, distill_weight: float = 0.9,
             reassign_every: int = 0, store_dtype: torch.dtype | str | None = torch.float16,
             calib_size: int = 2048, byte_unit: int | None = None, order: str = "sensitive-first",
             sensitivity: pd.DataFrame | None = None, seed: int = 0, progress: bool = True) -> tuple[nn.Module, CompressReport]:
    """Compress a trained float model to at most dense_bytes / target_ratio stored bytes with the least
    accuracy loss the recipe finds (module docstring).  The model is copied, never changed.

    train_ds, val_ds: TensorDatasets (x (N, C, H, W), y (N,)); the last `calib_size` training images
        calibrate the sensitivities; val_ds only scores the float model, each stage and the result (nothing
        is decided on it); without it those accuracies are NaN.
    target_ratio: float32 bytes / stored bytes, counted by `compressed_size(model, store_dtype=...)`
        (packed indices); <= 1 returns an unchanged copy.
    methods: configs each layer may take (any registered quantizer config; one that refuses a layer is
        skipped for it), or a function layer -> configs; None = `default_methods` (VQ, K in 2..256, d in
        1..16, <= 4 index bits/weight).
        Every layer may also stay float.
    epochs: fine-tuning budget in passes over train_ds, split evenly over the stages (one per quantized
        layer) and a final pass of the same length; or give stage_steps / final_steps directly.
    lr, batch_size, temperature, distill_weight: fine-tuning (Adam, cosine decay per stage) with
        distillation from the float model; reassign_every: VQ index re-assignment period (0 = never, the
        default: measured worse on LeNet-5, module docstring).
    sensitivity: the `candidates` table of an earlier report on the same float model and store_dtype (it
        does not depend on the target): reused instead of measuring again (methods and calib_size are then
        ignored).
    order: which chosen layer is quantized first: "sensitive-first" (largest predicted loss first, while the
        most of the model can still compensate), "robust-first", or "model" (registration order).
    store_dtype: dtype floats are stored at (None = as they are).  seed: k-means, batch order, all of it.
    returns (compressed model, CompressReport).  The returned model's modules have the train / eval modes the
    input's had; forward hooks on the input model are not copied (they never see the recipe's internal passes).
    raises ValueError when the budget is out of reach even with the smallest settings, when the model has no
    Linear / Conv2d layer to quantize, for an empty dataset or labels outside the model's classes, and for a bad
    argument (batch_size 0, epochs < 0, calib_size 0, ...), naming it; TypeError for a dataset that is not a
    TensorDataset(x, y) (e.g. a list of (x, y) pairs).
    """
    _check_args(model, target_ratio, epochs, stage_steps, final_steps, lr, batch_size, temperature, distill_weight,
                reassign_every, calib_size, byte_unit, order, seed)
    _check_dataset("train_ds", train_ds)
    _check_dataset("val_ds", val_ds, required=False)
    t0 = time.perf_counter()
    modes = {name: m.training for name, m in model.named_modules()}
    teacher = _private_copy(model)
    work = _private_copy(model)
    float_size = compressed_size(work)
    budget = int(math.floor(float_size.dense_bytes / target_ratio))
    calib = TensorDataset(*(t[-calib_size:] for t in train_ds.tensors))    # decisions never see val_ds
    classes = _outputs(work, calib.tensors[0][:1]).shape[-1]
    _check_labels("train_ds", train_ds, classes)
    _check_labels("val_ds", val_ds, classes)
    float_acc = evaluate(work, val_ds, distributed=False) if val_ds is not None else float("nan")
    if float_size.compressed_bytes <= budget:
        return _restore_modes(work, modes), _report(work, target_ratio, budget, None, float_acc, float_acc,
                                                    pd.DataFrame(), [], None, t0)
    if not _layers(work):
        raise ValueError(f"compress: the model ({type(model).__name__}) has no nn.Linear or nn.Conv2d layer to "
                         f"quantize, and at {float_size.compressed_bytes} bytes it exceeds the budget of {budget} "
                         f"bytes (target_ratio={target_ratio!r})")

    if sensitivity is None:
        table = measure_sensitivity(work, calib, layer_candidates(work, methods), store_dtype, progress)
    else:
        table = _reuse(sensitivity, work)
    layer_bytes = table[table["setting"] == "float"]["bytes"].sum()
    fixed = compressed_size(work, store_dtype=store_dtype).compressed_bytes - int(layer_bytes)
    unit = byte_unit or max(1, float_size.dense_bytes // 100_000)
    chosen = allocate(table, budget, fixed, unit)
    table["chosen"] = False
    for _, r in chosen.iterrows():
        table.loc[(table["layer"] == r["layer"]) & (table["setting"] == r["setting"]), "chosen"] = True

    todo = chosen[chosen["config"].notna()]
    if order == "sensitive-first":
        todo = todo.sort_values("predicted_loss", ascending=False, kind="stable")
    elif order == "robust-first":
        todo = todo.sort_values("predicted_loss", ascending=True, kind="stable")
    steps_total = int(epochs * math.ceil(len(train_ds) / batch_size))
    per = max(1, steps_total // (len(todo) + 1))
    stage_steps = per if stage_steps is None else stage_steps
    final_steps = per if final_steps is None else final_steps
    stages = []
    for i, (_, r) in enumerate(todo.iterrows(), start=1):
        cfg = _with_reassign(r["config"], reassign_every)
        set_submodule(work, r["layer"], quantize_layer(work.get_submodule(r["layer"]), cfg, r["layer"]))
        if stage_steps > 0:
            fit(work, train_ds, epochs=1, lr=lr, batch_size=batch_size, seed=seed + i, max_steps=stage_steps,
                teacher=teacher, temperature=temperature, distill_weight=distill_weight, progress=progress,
                distributed=False)
        acc = evaluate(work, val_ds, distributed=False) if val_ds is not None else float("nan")
        stages.append({"stage": i, "layer": r["layer"], "setting": r["setting"], "steps": stage_steps,
                       "accuracy": acc, "ratio": compressed_size(work, store_dtype=store_dtype).ratio})
    if final_steps > 0 and len(todo):
        fit(work, train_ds, epochs=1, lr=lr * 0.5, batch_size=batch_size, seed=seed + len(todo) + 1,
            max_steps=final_steps, teacher=teacher, temperature=temperature, distill_weight=distill_weight,
            progress=progress, distributed=False)
    _drop_latents(work)
    if store_dtype is not None:
        round_to_store_dtype_(work, store_dtype)
    acc = evaluate(work, val_ds, distributed=False) if val_ds is not None else float("nan")
    stages.append({"stage": len(todo) + 1, "layer": "(final)", "setting": f"fine-tune, store {store_dtype}",
                   "steps": final_steps if len(todo) else 0, "accuracy": acc,
                   "ratio": compressed_size(work, store_dtype=store_dtype).ratio})
    report = _report(work, target_ratio, budget, store_dtype, float_acc, acc, table, stages, chosen, t0,
                     order={r["layer"]: i for i, (_, r) in enumerate(todo.iterrows(), start=1)})
    return _restore_modes(work, modes), report


def _report(work, target_ratio, budget, store_dtype, float_acc, acc, table, stages, chosen, t0,
            order=None) -> CompressReport:
    size = compressed_size(work, store_dtype=store_dtype)
    order = order or {}
    by_stage = {s["layer"]: s["accuracy"] for s in stages}
    rows = []
    pick = {r["layer"]: r for _, r in chosen.iterrows()} if chosen is not None else {}
    for name, m in work.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, QuantizedLayer)) or name not in pick and chosen is not None:
            continue
        r = pick.get(name)
        code = getattr(m, "code", None)
        desc = code.describe() if code is not None else {}
        rows.append({"layer": name, "type": type(m).__name__,
                     "weights": int(getattr(m, "weight_numel", 0) or m.weight.numel()),
                     "setting": r["setting"] if r is not None else "float",
                     "method": desc.get("method", "float"), "K": desc.get("K"), "d": desc.get("d"),
                     "bits_per_weight": desc.get("bits_per_weight", 32.0),
                     "bytes": _stored_bytes(m, store_dtype),
                     "float_bytes": int(r["float_bytes"]) if r is not None else _stored_bytes(m, None),
                     "predicted_loss": float(r["predicted_loss"]) if r is not None else 0.0,
                     "order": order.get(name, 0), "acc_after": by_stage.get(name, float("nan"))})
    name = None if store_dtype is None else str(store_dtype).removeprefix("torch.")
    return CompressReport(target_ratio=float(target_ratio), budget_bytes=budget, store_dtype=name,
                          float_accuracy=float_acc, accuracy=float(acc), layers=pd.DataFrame(rows),
                          stages=pd.DataFrame(stages), candidates=table,
                          size=size, seconds=time.perf_counter() - t0)
