"""Each seed paper's whole pipeline, stage by stage, with what every stage buys (ratio counted and on disk,
accuracy, time): the papers' methods as the papers run them, not only their post-training cores.

    choi(model, train, val)      Choi et al.: magnitude pruning (and retraining with the mask) -> dithered lattice
                                 quantization -> fine-tuning of the shared quantized values -> universal coding
    vqdnn(model, train, val)     VQ-DNN: k-means codebooks at fixed K, d -> codebook fine-tuning
    qaf(model, train, val)       QAF: CP by ADMM on the b-bit grid (or CP-ALS + PTQ) -> fine-tuning on the grid
    gong(model, config, ...)     Gong et al.: scalar / product / residual codes, optionally codeword fine-tuning
    vq4all(models, trains, vals) VQ4ALL: one universal codebook -> progressive construction per network -> plain
                                 VQ; the codebook counted once for all networks

Every function copies the model (the float model is never changed), seeds everything, shows progress bars, and
returns (compressed model, `PipelineReport`): one row per stage with the model's ratio counted by
`compressed_size` (packed indices, ANS-coded, lzma), the ratio of the file `vqlab.save` writes, the accuracy on
val_ds, its change in points from the float model, and the seconds the stage took.  Fine-tuning budgets are given
in optimizer steps.  The notebooks 08 and 10 and `benchmarks/pipelines.py` run them on ResNet-20.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import TensorDataset

from .checks import check_fraction, check_int, check_number
from .codebook import prune_count
from .io import save
from .layers import QuantizedLayer
from .methods import qaf as _qaf, vq4all as _vq4all
from .methods.lattice import LATTICES, LatticeConfig
from .methods.vq import VQCode, VQConfig
from .quantize import keep_first_last, quantize_
from .size import compressed_size, round_to_store_dtype_
from .train import evaluate, fit, recalibrate_batchnorm_

__all__ = ["PipelineReport", "measure", "prune_by_magnitude_", "finish_pruning_", "choi", "vqdnn", "qaf", "gong",
           "vq4all"]


@dataclass
class PipelineReport:
    """stages: one row per stage (stage, what, ratio, ans_ratio, lzma_ratio, file_ratio, file_bytes, accuracy,
    delta_points, seconds, steps); setting: the pipeline's arguments; float_accuracy: the float model's."""

    stages: pd.DataFrame
    setting: dict = field(default_factory=dict)
    float_accuracy: float = float("nan")

    @property
    def final(self) -> pd.Series:
        """The last stage's row."""
        return self.stages.iloc[-1]

    def summary(self) -> pd.DataFrame:
        """The final stage as one row, with the setting."""
        return pd.DataFrame([{**self.setting, **self.final.to_dict()}])


def _file_bytes(model, store_dtype) -> int:
    """Bytes of the file `save(model, ..., store_dtype, index_coding="ans")` writes (into a temporary file)."""
    fd, path = tempfile.mkstemp(suffix=".vqz")
    os.close(fd)
    first = model[0] if isinstance(model, (list, tuple)) else model
    had = first.__dict__.get("vqlab_store_dtype")
    if store_dtype is not None:        # every stage's file carries the dtype, as the returned model's file does
        first.vqlab_store_dtype = str(store_dtype).removeprefix("torch.")
    try:
        return save(model, path, store_dtype=store_dtype, index_coding="ans")
    finally:
        os.unlink(path)
        if had is None:
            first.__dict__.pop("vqlab_store_dtype", None)
        else:
            first.vqlab_store_dtype = had


def measure(model: nn.Module, val_ds: TensorDataset | None, *, stage: str, what: str, float_accuracy: float,
            seconds: float, steps: int = 0, store_dtype=None) -> dict:
    """One stage's row: ratios counted (packed / ANS / lzma) and of the saved file (ANS-coded indices, floats at
    store_dtype), accuracy on val_ds (NaN without it) and its change in points from float_accuracy."""
    size = compressed_size(model, store_dtype=store_dtype)
    nbytes = _file_bytes(model, store_dtype)
    acc = evaluate(model, val_ds, distributed=False) if val_ds is not None else float("nan")
    return {"stage": stage, "what": what, "ratio": size.ratio, "ans_ratio": size.ans_ratio,
            "lzma_ratio": size.lzma_ratio, "file_ratio": size.dense_bytes / nbytes, "file_bytes": nbytes,
            "accuracy": acc, "delta_points": 100 * (acc - float_accuracy), "seconds": seconds, "steps": steps}


def _epochs_for(steps: int, n: int, batch_size: int) -> int:
    return max(1, math.ceil(steps * batch_size / max(n, 1)))


def _finetune(model: nn.Module, train_ds: TensorDataset, steps: int, lr: float, batch_size: int, seed: int,
              progress: bool, teacher: nn.Module | None = None) -> None:
    if steps > 0:
        fit(model, train_ds, epochs=_epochs_for(steps, len(train_ds), batch_size), max_steps=steps, lr=lr,
            batch_size=batch_size, seed=seed, progress=progress, distributed=False, teacher=teacher)


def _teacher(model: nn.Module, distill: bool) -> nn.Module | None:
    """A frozen copy of the float model to distil from (fine-tuning with `distill=True`), or None."""
    if not distill:
        return None
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _finetune_stage(work: nn.Module, train_ds, val_ds, *, steps: int, lr: float, batch_size: int, seed: int,
                    progress: bool, float_acc: float, store_dtype, what: str, after=None,
                    teacher: nn.Module | None = None) -> dict:
    """Fine-tune `work` for `steps` (seed + 1; distilling from `teacher` when given), run `after(work)`
    (training-only state ends), round the floats to store_dtype, and measure the "fine-tuned" stage."""
    t0 = time.perf_counter()
    _finetune(work, train_ds, steps, lr, batch_size, seed + 1, progress, teacher)
    if after is not None:
        after(work)
    if store_dtype is not None:
        round_to_store_dtype_(work, store_dtype)
    return measure(work.eval(), val_ds, stage="fine-tuned", what=what, float_accuracy=float_acc,
                   seconds=time.perf_counter() - t0, steps=steps, store_dtype=store_dtype)


def _targets(model: nn.Module, filter_fn) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d layers a pipeline quantizes (filter_fn as quantize_'s; None = keep_first_last)."""
    keep = filter_fn or keep_first_last(model)
    seen, out = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in seen and keep(m, name):
            seen.add(id(m))
            out.append((name, m))
    return out


def _segment_mask(weight: torch.Tensor, fraction: float, dim: int) -> torch.Tensor:
    """The keep-mask (weight's shape) of magnitude pruning by segments of `dim` consecutive weights of each row
    (the lattice's segments): the prune_count(N, fraction) segments of smallest L2 norm are 0, the rest 1."""
    rows = weight.detach().reshape(len(weight), -1)
    n_pad = -(-rows.shape[1] // dim) * dim
    segs = nn.functional.pad(rows, (0, n_pad - rows.shape[1])).reshape(-1, dim)
    keep = torch.ones(len(segs), dtype=weight.dtype, device=weight.device)
    keep[segs.double().pow(2).sum(1).argsort(stable=True)[:prune_count(len(segs), fraction)]] = 0
    return keep[:, None].expand(-1, dim).reshape(len(rows), n_pad)[:, :rows.shape[1]].reshape(weight.shape)


def prune_by_magnitude_(model: nn.Module, fraction: float, *, dim: int = 1, filter_fn=None) -> list[str]:
    """Magnitude pruning, in place: in every targeted layer (filter_fn as quantize_'s; default keep_first_last) the
    smallest-L2-norm `fraction` of its segments of `dim` consecutive weights (dim 1: single weights) is masked to
    zero with torch.nn.utils.prune, so training keeps them zero; `finish_pruning_` makes it permanent.  returns the
    names of the pruned layers."""
    fraction = check_fraction("fraction", fraction)
    names = []
    for name, m in _targets(model, filter_fn):
        torch_prune.custom_from_mask(m, "weight", _segment_mask(m.weight, fraction, dim))
        names.append(name)
    return names


def finish_pruning_(model: nn.Module) -> None:
    """Fold every torch.nn.utils.prune mask into its weight (weight = weight_orig * mask; the hooks removed)."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")


def _float_accuracy(model: nn.Module, val_ds: TensorDataset | None) -> float:
    return evaluate(model, val_ds, distributed=False) if val_ds is not None else float("nan")


def _start(model: nn.Module, val_ds, store_dtype) -> tuple[nn.Module, float, list[dict]]:
    """(a copy of model in eval mode, its accuracy, [its "float" stage row]): how every pipeline begins."""
    work = copy.deepcopy(model).eval()
    float_acc = _float_accuracy(work, val_ds)
    return work, float_acc, [measure(work, val_ds, stage="float", what="the trained model", float_accuracy=float_acc,
                                     seconds=0.0, store_dtype=store_dtype)]


def _check_budget(steps: int, lr: float, batch_size: int) -> None:
    check_int("steps", steps, 0)
    check_number("lr", lr, 0, low_open=True)
    check_int("batch_size", batch_size, 1)


# ---------------------------------------------------------------- Choi et al.

def choi(model: nn.Module, train_ds: TensorDataset, val_ds: TensorDataset | None = None, *, lattice: str = "Z",
         step: float = 0.02, prune: float = 0.5, coder: str = "lzma", prune_steps: int = 500,
         finetune_steps: int = 500, lr: float = 1e-3, batch_size: int = 128, seed: int = 0, filter_fn=None,
         store_dtype="float16", progress: bool = True) -> tuple[nn.Module, PipelineReport]:
    """Choi et al.'s universal DNN compression, whole: (1) magnitude pruning of `prune` of every targeted layer's
    segments, retrained for `prune_steps` with the mask; (2) dithered lattice quantization (`lattice`, `step`,
    `seed`) of what is left, pruned positions coded in the same stream; (3) fine-tuning of the shared quantized
    values (`LatticeConfig(finetune="values")`: a few dozen floats per layer, so the coded size does not change)
    for `finetune_steps`, biases, BatchNorm and the float first/last layers too; (4) universal coding: the stream
    is lzma/bz2/Huffman-coded (`coder`) from the start, floats stored at `store_dtype`.  Targets: filter_fn as
    quantize_'s (default: all but the first conv and the last linear).
    returns (model, PipelineReport) with stages float, pruned, pruned+retrained, lattice, fine-tuned."""
    check_fraction("prune", prune)
    _check_budget(prune_steps, lr, batch_size)
    _check_budget(finetune_steps, lr, batch_size)
    config = LatticeConfig(lattice=lattice, step=step, seed=seed, coder=coder, pad=True, prune=prune,
                           finetune="values")
    work, float_acc, rows = _start(model, val_ds, store_dtype)
    names = [n for n, _ in _targets(work, filter_fn)]
    keep = lambda m, n: n in names                                                      # noqa: E731
    t0 = time.perf_counter()
    prune_by_magnitude_(work, prune, dim=LATTICES[lattice], filter_fn=keep)
    finish_pruning_(work)
    rows.append(measure(work.eval(), val_ds, stage="pruned", what=f"{prune:.0%} of the segments zeroed",
                        float_accuracy=float_acc, seconds=time.perf_counter() - t0, store_dtype=store_dtype))
    t0 = time.perf_counter()
    if prune_steps:
        prune_by_magnitude_(work, prune, dim=LATTICES[lattice], filter_fn=keep)   # the same mask: zeros stay smallest
        _finetune(work, train_ds, prune_steps, lr, batch_size, seed, progress)
        finish_pruning_(work)
        rows.append(measure(work.eval(), val_ds, stage="pruned + retrained", what=f"{prune_steps} steps, mask fixed",
                            float_accuracy=float_acc, seconds=time.perf_counter() - t0, steps=prune_steps,
                            store_dtype=store_dtype))
    t0 = time.perf_counter()
    quantize_(work, config, filter_fn=keep, progress=False)
    rows.append(measure(work.eval(), val_ds, stage="lattice", what=f"{lattice}, step {step:g}, {coder}",
                        float_accuracy=float_acc, seconds=time.perf_counter() - t0, store_dtype=store_dtype))
    rows.append(_finetune_stage(work, train_ds, val_ds, steps=finetune_steps, lr=lr, batch_size=batch_size, seed=seed,
                                progress=progress, float_acc=float_acc, store_dtype=store_dtype,
                                what=f"shared values, {finetune_steps} steps"))
    setting = {"pipeline": "choi", "lattice": lattice, "step": step, "prune": prune, "coder": coder,
               "prune_steps": prune_steps, "finetune_steps": finetune_steps, "seed": seed}
    return work, PipelineReport(pd.DataFrame(rows), setting, float_acc)


# ---------------------------------------------------------------- VQ-DNN

def vqdnn(model: nn.Module, train_ds: TensorDataset, val_ds: TensorDataset | None = None, *, k: int = 256,
          d: int = 8, codebook: str = "shared", finetune_steps: int = 500, reassign_every: int = 0,
          lr: float = 1e-3, batch_size: int = 128, seed: int = 0, filter_fn=None, store_dtype="float16",
          distill: bool = False, progress: bool = True) -> tuple[nn.Module, PipelineReport]:
    """VQ-DNN at fixed K, d: k-means codebooks (`codebook` "layer" or "shared" across the model), then
    `finetune_steps` of codebook fine-tuning with the indices re-assigned every `reassign_every` steps (0, the
    default: fixed indices; re-assignment from Adam-trained latent weights measured much worse on LeNet-5 and in
    `vqlab.compress`), then floats at `store_dtype`.  distill=True: the fine-tuning learns the float model's soft
    targets too (`fit(teacher=)`; not in the paper, reported in the setting).  returns (model, PipelineReport) with stages float, k-means,
    fine-tuned."""
    _check_budget(finetune_steps, lr, batch_size)
    config = VQConfig(k=k, d=d, codebook=codebook, seed=seed, reassign_every=reassign_every, pad=True)
    work, float_acc, rows = _start(model, val_ds, store_dtype)
    t0 = time.perf_counter()
    quantize_(work, config, filter_fn=filter_fn, progress=progress)
    rows.append(measure(work.eval(), val_ds, stage="k-means", what=f"K={k}, d={d}, codebook {codebook}",
                        float_accuracy=float_acc, seconds=time.perf_counter() - t0, store_dtype=store_dtype))
    def end_training(model: nn.Module) -> None:                  # training-only state ends with training
        for m in model.modules():
            if isinstance(m, VQCode) and m.latent is not None:
                m.reassign()
                m.reassign_every, m.latent = 0, None

    what = f"codebooks, {finetune_steps} steps" + (f", re-assigned every {reassign_every}" if reassign_every else "")
    what += ", distilled" if distill else ""
    rows.append(_finetune_stage(work, train_ds, val_ds, steps=finetune_steps, lr=lr, batch_size=batch_size, seed=seed,
                                progress=progress, float_acc=float_acc, store_dtype=store_dtype, what=what,
                                after=end_training, teacher=_teacher(model, distill)))
    setting = {"pipeline": "vqdnn", "k": k, "d": d, "codebook": codebook, "finetune_steps": finetune_steps,
               "reassign_every": reassign_every, "seed": seed, **({"distill": True} if distill else {})}
    return work, PipelineReport(pd.DataFrame(rows), setting, float_acc)


# ---------------------------------------------------------------- QAF and Gong et al.: quantize, then fine-tune

def _quantize_then_finetune(name: str, model, train_ds, val_ds, config, what: str, finetune_steps: int, lr: float,
                            batch_size: int, seed: int, filter_fn, store_dtype, progress: bool,
                            setting: dict, distill: bool = False) -> tuple[nn.Module, PipelineReport]:
    _check_budget(finetune_steps, lr, batch_size)
    work, float_acc, rows = _start(model, val_ds, store_dtype)
    t0 = time.perf_counter()
    quantize_(work, config, filter_fn=filter_fn, progress=progress)
    rows.append(measure(work.eval(), val_ds, stage="quantized", what=what, float_accuracy=float_acc,
                        seconds=time.perf_counter() - t0, store_dtype=store_dtype))
    if finetune_steps:
        rows.append(_finetune_stage(work, train_ds, val_ds, steps=finetune_steps, lr=lr, batch_size=batch_size,
                                    seed=seed, progress=progress, float_acc=float_acc, store_dtype=store_dtype,
                                    what=f"{finetune_steps} steps" + (", distilled" if distill else ""),
                                    teacher=_teacher(model, distill)))
    return work, PipelineReport(pd.DataFrame(rows), {"pipeline": name, **setting, "finetune_steps": finetune_steps,
                                                     "seed": seed, **({"distill": True} if distill else {})},
                                float_acc)


def qaf(model: nn.Module, train_ds: TensorDataset, val_ds: TensorDataset | None = None, *, rank_ratio: float = 0.25,
        bits: int = 4, algorithm: str = "admm", iters: int = 30, finetune_steps: int = 500, lr: float = 1e-3,
        batch_size: int = 128, seed: int = 0, filter_fn=None, store_dtype="float16", distill: bool = False,
        progress: bool = True) -> tuple[nn.Module, PipelineReport]:
    """Quantization-aware CP factorization: every targeted layer factorized with its factors on the `bits` grid
    (`algorithm` "admm", or "ptq" for the baseline CP-ALS + post-training quantization), then `finetune_steps` of
    fine-tuning with the factors kept on their grid (`QAFConfig(finetune=True)`: straight-through rounding of float
    copies, scales trained; distill=True: from the float model's soft targets too).  Run it with both algorithms and
    the same budget for a fair comparison."""
    config = _qaf.QAFConfig(rank_ratio=rank_ratio, bits=bits, algorithm=algorithm, iters=iters, seed=seed,
                            finetune=finetune_steps > 0)
    return _quantize_then_finetune("qaf", model, train_ds, val_ds, config,
                                   f"{algorithm}, rank ratio {rank_ratio:g}, {bits} bits", finetune_steps, lr,
                                   batch_size, seed, filter_fn, store_dtype, progress,
                                   {"algorithm": algorithm, "rank_ratio": rank_ratio, "bits": bits}, distill)


def gong(model: nn.Module, config, train_ds: TensorDataset | None = None, val_ds: TensorDataset | None = None, *,
         finetune_steps: int = 0, lr: float = 1e-3, batch_size: int = 128, seed: int = 0, filter_fn=None,
         store_dtype="float16", distill: bool = False, progress: bool = True) -> tuple[nn.Module, PipelineReport]:
    """Gong et al.'s post-training codes (`vqlab.methods.gong` ScalarConfig / PQConfig / RVQConfig / BinaryConfig);
    with finetune_steps > 0 the config's codebooks are made trainable (`finetune=True`) and fine-tuned — an
    option the paper does not have, reported as a separate stage (distill=True: from the float model's soft targets
    too)."""
    import dataclasses

    if finetune_steps and hasattr(config, "finetune"):
        config = dataclasses.replace(config, finetune=True)
    if finetune_steps and train_ds is None:
        raise ValueError("gong: finetune_steps > 0 needs train_ds")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("finetune",)}
    return _quantize_then_finetune("gong", model, train_ds, val_ds, config, f"{config.name} {fields}",
                                   finetune_steps, lr, batch_size, seed, filter_fn, store_dtype, progress,
                                   {"method": config.name, **fields}, distill)


# ---------------------------------------------------------------- VQ4ALL

def vq4all(models: list[nn.Module], train_sets: list[TensorDataset], val_sets: list[TensorDataset | None], *,
           k: int = 256, d: int = 4, candidates: int = 4, alpha: float = 0.9, rounds: int = 10,
           steps_per_round: int = 200, lr: float = 0.05, batch_size: int = 128, seed: int = 0, filter_fn=None,
           store_dtype="float16", progress: bool = True, distill: bool = False,
           recalibrate_bn: int = 0) -> tuple[list[nn.Module], PipelineReport]:
    """VQ4ALL: one frozen universal codebook (K codewords of length d) sampled from the KDE of all the networks'
    sub-vectors; per network the differentiable candidate assignments trained by progressive construction
    (`progressive_fit`: `rounds` of `steps_per_round` steps, sub-vectors whose largest ratio passes alpha fixed
    after each, the rest forced in the last round), then plain VQ layers sharing the codebook (`finalize`).
    Stages per network (stage "<i>: ..."), then "all" with the three counted together (the codebook once) and
    "all, codebook in ROM".  The report's rows also carry fixed_before_last: the fraction of sub-vectors that fixed
    on their own before the forced last round.
    distill: the candidate training also learns from each float network's soft targets (not in the paper).
    recalibrate_bn: after the last round, re-estimate every BatchNorm's statistics from this many training batches
        of 256 (`vqlab.train.recalibrate_batchnorm_`; 0 = off, as the paper): the forced last round hard-fixes the
        remaining sub-vectors after the statistics were gathered under their soft mixture.  Each network then gets
        a second row "<i>: <name>, BN re-estimated", and "all" takes the networks' last rows."""
    if not (len(models) == len(train_sets) == len(val_sets)) or not models:
        raise ValueError(f"vq4all needs as many train and val sets as models, got {len(models)} models, "
                         f"{len(train_sets)} train and {len(val_sets)} val sets")
    works = [copy.deepcopy(m).eval() for m in models]
    floats = [_float_accuracy(w, v) for w, v in zip(works, val_sets)]
    t0 = time.perf_counter()
    book = _vq4all.universal_codebook(works, k=k, d=d, seed=seed)
    rows, accs = [], []
    for i, (w, tr, va) in enumerate(zip(works, train_sets, val_sets)):
        t1 = time.perf_counter()
        teacher = _teacher(w, distill)
        quantize_(w, _vq4all.VQ4ALLConfig(codebook=book, candidates=candidates, alpha=alpha), filter_fn=filter_fn,
                  progress=False)
        hist = _vq4all.progressive_fit(w, tr, rounds=rounds, steps_per_round=steps_per_round, lr=lr,
                                       batch_size=batch_size, seed=seed, progress=progress, teacher=teacher)
        before = float(hist["fixed_fraction"].iloc[-2]) if len(hist) > 1 else 0.0
        forced = len(hist) == rounds
        _vq4all.finalize(w)
        if store_dtype is not None:
            round_to_store_dtype_(w, store_dtype)
        row = measure(w.eval(), va, stage=f"{i}: {type(models[i]).__name__}",
                      what=f"{len(hist)} rounds x {steps_per_round} steps", float_accuracy=floats[i],
                      seconds=time.perf_counter() - t1, steps=int(hist["steps"].sum()), store_dtype=store_dtype)
        row["fixed_before_last"] = before if forced else 1.0
        rows.append(row)
        if recalibrate_bn:
            t2 = time.perf_counter()
            recalibrate_batchnorm_(w, tr, batches=recalibrate_bn, seed=seed)
            if store_dtype is not None:
                round_to_store_dtype_(w, store_dtype)
            row = measure(w.eval(), va, stage=f"{i}: {type(models[i]).__name__}, BN re-estimated",
                          what=f"{recalibrate_bn} batches", float_accuracy=floats[i],
                          seconds=time.perf_counter() - t2, store_dtype=store_dtype)
            row["fixed_before_last"] = rows[-1]["fixed_before_last"]
            rows.append(row)
        accs.append(row["accuracy"])
    for rom in (False, True):
        size = compressed_size(works, codebook_in_rom=rom, store_dtype=store_dtype)
        rows.append({"stage": "all, codebook in ROM" if rom else "all", "what": f"{len(works)} networks, one codebook",
                     "ratio": size.ratio, "ans_ratio": size.ans_ratio, "lzma_ratio": size.lzma_ratio,
                     "file_ratio": float("nan"), "file_bytes": pd.NA, "accuracy": float("nan"),
                     "delta_points": min(100 * (a - f) for a, f in zip(accs, floats)),
                     "seconds": time.perf_counter() - t0, "steps": 0})
    nbytes = _file_bytes(works, store_dtype)                      # the networks in one file, the codebook once
    rows[-2]["file_bytes"], rows[-2]["file_ratio"] = nbytes, compressed_size(works).dense_bytes / nbytes
    setting = {"pipeline": "vq4all", "k": k, "d": d, "candidates": candidates, "alpha": alpha, "rounds": rounds,
               "steps_per_round": steps_per_round, "seed": seed}
    if distill:
        setting["distill"] = True
    if recalibrate_bn:
        setting["recalibrate_bn"] = recalibrate_bn
    return works, PipelineReport(pd.DataFrame(rows), setting, float("nan"))


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the quantized layers of a model (for reports)."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
