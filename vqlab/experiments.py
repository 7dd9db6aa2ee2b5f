"""Studies that return DataFrames: the K x d compression sweep behind notebook 02 (and `python -m vqlab sweep`).

    df = sweep(model, train_ds, test_ds, ks=[16, 64, 256], ds=[2, 4, 8], finetune_epochs=1)
    pareto_plot(df)

Every row is one compressed copy of `model`: method, K, d, bits/weight, whole-model compression ratio
(float32 bytes / stored bytes, `vqlab.compressed_size`), accuracy before and after fine-tuning.
bits/weight is index bits per weight as stored, `bits_for(K) / d` = ceil(log2 K) / d (as `VQConfig`
and `compressed_size` count it).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn as nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .bits import index_bits_per_weight
from .layers import QuantizedLayer
from .methods.uniform import uniform_quantize_
from .methods.vq import VQConfig
from .quantize import quantize_
from .size import compressed_size
from .train import evaluate, fit

__all__ = ["compress_and_evaluate", "sweep", "compare_configs", "check_grid", "lut_flops", "pareto_front", "pareto_plot", "method_styles",
           "layer_sensitivity", "add_sweep_command"]

COLUMNS = ["method", "K", "d", "bits_per_weight", "ratio", "compressed_bytes", "acc", "acc_finetuned",
           "delta_points", "seconds"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of `model` on the CPU that still shares every Codebook with the original (a universal or
    shared codebook stays one object across the copies, so it is counted and stored once)."""
    from .codebook import Codebook

    memo = {id(m): m for m in model.modules() if isinstance(m, Codebook)}
    memo.update({id(m.weight): m.weight for m in list(memo.values())})
    return copy.deepcopy(model, memo).cpu()


def _finetune(model: nn.Module, train_ds, epochs: int, lr: float, max_steps: int | None, seed: int) -> None:
    if epochs > 0:
        fit(model, train_ds, epochs=epochs, lr=lr, seed=seed, max_steps=max_steps, progress=False, distributed=False)


def compress_and_evaluate(model: nn.Module, train_ds: TensorDataset | None, test_ds: TensorDataset, k: int, d: int,
                          finetune_epochs: int = 0, lr: float = 1e-3, max_steps: int | None = None, seed: int = 0,
                          baseline_acc: float | None = None, **config) -> tuple[dict, nn.Module]:
    """Quantize a copy of `model` with VQConfig(k, d, **config), evaluate, optionally fine-tune, evaluate.

    returns (row dict with the COLUMNS of `sweep`, the compressed copy).  `model` is not changed.
    Always this process alone (also under torchrun, where `sweep` hands each rank its own grid points).
    """
    t0 = time.perf_counter()
    q = copy_model(model)
    quantize_(q, VQConfig(k=k, d=d, seed=seed, **config), progress=False)
    size = compressed_size(q)
    acc = evaluate(q, test_ds, distributed=False)
    acc_ft = float("nan")
    if finetune_epochs > 0 and train_ds is not None:
        _finetune(q, train_ds, finetune_epochs, lr, max_steps, seed)
        acc_ft = evaluate(q, test_ds, distributed=False)
    best = acc_ft if finetune_epochs > 0 else acc
    row = {"method": "vq" if d > 1 else "scalar k-means", "K": k, "d": d,
           "bits_per_weight": index_bits_per_weight(k, d), "ratio": size.ratio, "compressed_bytes": size.compressed_bytes,
           "acc": acc, "acc_finetuned": acc_ft,
           "delta_points": 100 * (best - baseline_acc) if baseline_acc is not None else float("nan"),
           "seconds": time.perf_counter() - t0}
    return row, q


def _uniform_row(model: nn.Module, test_ds, bits: int, dense_bytes: int, baseline_acc: float) -> dict:
    q = copy_model(model)
    uniform_quantize_(q, bits)                      # through quantize_: the same layers as the VQ rows
    stored = compressed_size(q).compressed_bytes
    acc = evaluate(q, test_ds, distributed=False)
    return {"method": f"uniform int{bits}", "K": 2 ** bits, "d": 1, "bits_per_weight": float(bits),
            "ratio": dense_bytes / stored, "compressed_bytes": stored, "acc": acc, "acc_finetuned": float("nan"),
            "delta_points": 100 * (acc - baseline_acc), "seconds": float("nan")}


def sweep(model: nn.Module, train_ds: TensorDataset | None, test_ds: TensorDataset, ks=(16, 64, 256), ds=(2, 4, 8),
          finetune_epochs: int = 0, lr: float = 1e-3, max_steps: int | None = None, seed: int = 0,
          baselines: tuple[str, ...] = ("float", "int8", "int4", "scalar"), scalar_ks=(4, 16),
          progress: bool = True, distributed: bool | None = None, **config) -> pd.DataFrame:
    """Compress `model` over the grid ks x ds (VQ, whole model but first/last layer) and baselines.

    model: a trained float model (not changed).  train_ds is used only for fine-tuning.
    finetune_epochs: VQ-DNN fine-tuning of codebooks after k-means (0 = k-means only); max_steps caps it.
    baselines: any of "float" (the model itself), "int8"/"int4"/"int3"/"int2" (uniform per-channel, symmetric:
        int2 is ternary, the scalar baseline at 2 bits/weight), "scalar"
        (d=1 k-means, Deep-Compression style, K in scalar_ks).
    config: more VQConfig fields (segment, codebook, iters, ...).  Combinations a layer cannot take
        (e.g. K above a layer's number of segments) are reported as rows with status in `error`.
    distributed: None = under torchrun (vqlab.distributed) the uniform baselines and grid points are dealt
        round-robin over the ranks, each rank compresses (and fine-tunes) its share alone, and every rank
        returns the whole table, rows in the one-process order (only `seconds` differ); call it on every
        rank.  False = this process does everything.
    returns: DataFrame with columns COLUMNS (+ error), one row per compressed model.
    raises ValueError before any work for K < 2, d < 1 or finetune_epochs < 0 (not grid rows);
        distributed, RuntimeError on every rank when a rank failed (naming the rank and the error).
    """
    from . import distributed as _dist

    check_grid(ks, ds, finetune_epochs, scalar_ks if "scalar" in baselines else ())
    split = False if distributed is False else _dist.init()
    rank, world = (_dist.rank(), _dist.world_size()) if split else (0, 1)
    float_acc = evaluate(model, test_ds, distributed=False)
    dense = compressed_size(model).dense_bytes
    rows: list[dict] = []
    if "float" in baselines:
        rows.append({"method": "float32", "K": pd.NA, "d": pd.NA, "bits_per_weight": 32.0, "ratio": 1.0,
                     "compressed_bytes": dense, "acc": float_acc, "acc_finetuned": float("nan"),
                     "delta_points": 0.0, "seconds": 0.0})
    grid = [(k, d) for k in ks for d in ds] + ([(k, 1) for k in scalar_ks] if "scalar" in baselines else [])
    jobs = [("int", bits, 1) for bits in (8, 4, 3, 2) if f"int{bits}" in baselines] + [("vq", k, d) for k, d in grid]

    def run(kind: str, k: int, d: int) -> dict:
        if kind == "int":
            return _uniform_row(model, test_ds, k, dense, float_acc)
        try:
            row, _ = compress_and_evaluate(model, train_ds, test_ds, k, d, finetune_epochs, lr, max_steps, seed,
                                           baseline_acc=float_acc, **config)
        except ValueError as err:  # a grid point some layer cannot take: keep the reason in the table
            row = {"method": "vq" if d > 1 else "scalar k-means", "K": k, "d": d,
                   "bits_per_weight": index_bits_per_weight(k, d), "error": str(err).splitlines()[0]}
        return row

    done, failure = {}, None
    try:
        for i in tqdm(range(rank, len(jobs), world), desc="sweep", disable=not progress or rank != 0, leave=False):
            done[i] = run(*jobs[i])
    except Exception as err:                       # distributed: tell the other ranks instead of leaving them waiting
        if not split:
            raise
        failure = f"rank {rank}: {type(err).__name__}: {err}"
    if split:
        parts = _dist.all_gather_objects((done, failure))
        failures = [f for _, f in parts if f is not None]
        if failures:
            raise RuntimeError("sweep failed on " + "; ".join(failures))
        done = {i: row for part, _ in parts for i, row in part.items()}
    rows += [done[i] for i in range(len(jobs))]
    df = pd.DataFrame(rows)
    for c in COLUMNS + ["error"]:
        if c not in df:
            df[c] = pd.NA if c == "error" else float("nan")
    return df[COLUMNS + ["error"]].astype({"K": "Int64", "d": "Int64"})


def compare_configs(model: nn.Module, test_ds: TensorDataset, configs: dict, *, train_ds: TensorDataset | None = None,
                    finetune_epochs: int = 0, lr: float = 1e-3, max_steps: int | None = None, seed: int = 0,
                    baseline_acc: float | None = None, flops_input_shape: tuple[int, ...] | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Compress a copy of `model` with each config (any registered method: VQConfig, gong.PQConfig,
    lattice.LatticeConfig, ...), evaluate, optionally fine-tune (finetune_epochs > 0 with train_ds), evaluate.

    configs: {label: config}.  returns one row per label with sweep's COLUMNS plus label, huffman_ratio,
    lzma_ratio and error (a config some layer cannot take keeps its reason there).  method is what the
    quantize_ report names; K and d come from the config where it has them; bits_per_weight is the stored
    index bits per quantized weight (index_bytes * 8 / weights of the quantized layers).
    flops_input_shape: e.g. (1, 1, 28, 28): also `count_flops` of each compressed model on that input, as
    columns flops (the quantized model's total) and flop_ratio (over the dense model's), counted with a
    lookup-table backend pinned (`lut_flops`), so every method that has a lookup-table product counts it in its
    linear and convolution layers alike (VQ's convolutions always run `vq_conv2d`; Gong's PQ / RVQ convolve
    through their tables only when such a backend is pinned) -- one footing for every method.
    """
    from . import distributed as _dist
    from .flops import count_flops

    base = evaluate(model, test_ds) if baseline_acc is None else baseline_acc
    rows = []
    for label, config in tqdm(configs.items(), desc="methods", disable=not _dist.show_progress(progress), leave=False):
        t0 = time.perf_counter()
        q = copy_model(model)
        row = {"label": label, "K": getattr(config, "k", pd.NA), "d": getattr(config, "d", pd.NA)}
        try:
            report = quantize_(q, config, progress=False)
        except ValueError as err:
            rows.append({**row, "method": type(config).__name__, "error": str(err).splitlines()[0]})
            continue
        methods = [m for m in report["method"].dropna().unique() if m != "float"]
        size = compressed_size(q)
        weights = sum(m.weight_numel for m in q.modules() if isinstance(m, QuantizedLayer))
        acc = evaluate(q, test_ds)
        acc_ft = float("nan")
        if finetune_epochs > 0 and train_ds is not None:
            _finetune(q, train_ds, finetune_epochs, lr, max_steps, seed)
            size = compressed_size(q)                  # fine-tuning may change what is stored (e.g. lattice)
            acc_ft = evaluate(q, test_ds)
        best = acc_ft if finetune_epochs > 0 and train_ds is not None else acc
        if flops_input_shape is not None:
            df = lut_flops(q, tuple(flops_input_shape))
            row.update(flops=int(df["vq_flops"].sum()), flop_ratio=df["vq_flops"].sum() / df["dense_flops"].sum())
        rows.append({**row, "method": ", ".join(map(str, methods)) or "float32",
                     "bits_per_weight": 8 * size.index_bytes / weights if weights else float("nan"),
                     "ratio": size.ratio, "huffman_ratio": size.huffman_ratio, "lzma_ratio": size.lzma_ratio,
                     "compressed_bytes": size.compressed_bytes, "acc": acc, "acc_finetuned": acc_ft,
                     "delta_points": 100 * (best - base), "seconds": time.perf_counter() - t0})
    cols = ["label"] + COLUMNS + ["huffman_ratio", "lzma_ratio"] + (
        ["flops", "flop_ratio"] if flops_input_shape is not None else []) + ["error"]
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df:
            df[c] = pd.NA if c == "error" else float("nan")
    return df[cols].astype({"K": "Int64", "d": "Int64"})


def lut_flops(model: nn.Module, input_shape: tuple[int, ...]) -> pd.DataFrame:
    """`count_flops` with a lookup-table backend (numba, else simd) pinned for the count: every quantized layer
    whose code has a lookup-table product counts that product (convolutions on im2col rows included), whatever
    backend the caller pinned; the caller's pin is restored.  Without such a backend: plain `count_flops`."""
    from .flops import count_flops
    from .kernels.registry import available_backends, pinned_backend, set_backend

    lut = next((b for b in ("numba", "simd") if b in available_backends(approximate=True)), None)
    if lut is None:
        return count_flops(model, input_shape)
    before = pinned_backend()
    set_backend(lut)
    try:
        return count_flops(model, input_shape)
    finally:
        set_backend(before)


def check_grid(ks, ds, finetune_epochs: int = 0, scalar_ks=()) -> None:
    """ValueError naming the first bad value: every K an integer >= 2, every d >= 1, finetune_epochs >= 0."""
    def ints(name, values, low):
        values = list(values)
        if not values and name in ("ks", "ds"):
            raise ValueError(f"{name} is empty: give at least one value")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"every value of {name} must be an integer >= {low}, got {v!r} in {values}")

    ints("ks", ks, 2)
    ints("ds", ds, 1)
    ints("scalar_ks", scalar_ks, 2)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, (int, np.integer)) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")


def best_accuracy(df: pd.DataFrame) -> pd.Series:
    """Per row the fine-tuned accuracy where there is one, else the accuracy (a grid may lack the column
    acc_finetuned, e.g. one from `compare_configs` or written by hand).  ValueError naming the missing columns of
    a grid that has no ratio / acc / method."""
    missing = [c for c in ("method", "ratio", "acc") if not isinstance(df, pd.DataFrame) or c not in df]
    if missing:
        got = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"grid must be a DataFrame with columns method, ratio, acc (and optionally acc_finetuned), "
                         f"as sweep / compare_configs return; missing {missing}, got {got}")
    return df["acc_finetuned"].fillna(df["acc"]) if "acc_finetuned" in df else df["acc"]


def pareto_front(df: pd.DataFrame, acc_col: str | None = None) -> pd.DataFrame:
    """Rows not dominated in (higher ratio, higher accuracy), sorted by ratio."""
    acc = df[acc_col] if acc_col else best_accuracy(df)
    pts = df.assign(_acc=acc).dropna(subset=["ratio", "_acc"]).sort_values("ratio", ascending=False)
    keep, best = [], -np.inf
    for i, r in pts.iterrows():
        if r["_acc"] > best:
            keep.append(i)
            best = r["_acc"]
    return df.loc[keep].sort_values("ratio")


# one (marker, colour) per method, none repeated: a reader tells the methods apart without the colour cycle
METHOD_STYLES = {
    "float32": ("s", "black"), "uniform int8": ("D", "#7f7f7f"), "uniform int4": ("d", "#8c564b"),
    "uniform int3": ("d", "#c49c94"), "uniform int2": ("d", "#e377c2"), "scalar k-means": ("^", "#ff7f0e"),
    "vq": ("o", "#1f77b4"), "vq shared": ("o", "#aec7e8"), "gong binary": ("x", "#d62728"),
    "gong scalar k-means": ("<", "#ffbb78"), "gong pq": ("v", "#2ca02c"), "gong rvq": ("P", "#9467bd"),
    "lattice Z": ("h", "#17becf"), "lattice D4": ("H", "#9edae5"), "lattice E8": ("p", "#bcbd22"),
    "vq4all": ("8", "#dbdb8d"), "qaf": ("X", "#98df8a"),
}
_SPARE = [(m, c) for m in ("*", ">", "1", "2", "3", "4", "+", "|") for c in
          ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")]


def method_styles(methods) -> dict[str, tuple[str, str]]:
    """(marker, colour) for each method name: METHOD_STYLES where known, else the next unused pair, so no two
    methods of one plot share both marker and colour."""
    out, used = {}, set()
    for m in methods:
        if m in METHOD_STYLES and METHOD_STYLES[m] not in used:
            out[m] = METHOD_STYLES[m]
            used.add(out[m])
    spare = (pair for pair in _SPARE if pair not in used)
    for m in methods:
        if m not in out:
            out[m] = next(spare)
            used.add(out[m])
    return out


def _point_label(r) -> str:
    label = r.get("label")
    if isinstance(label, str) and label:
        return label
    if r.get("method") in ("vq", "scalar k-means") and not pd.isna(r.get("K")):
        return f"K{int(r['K'])},d{int(r['d'])}"
    return str(r.get("method"))


def _place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Annotate points, each at the first of a few offsets whose text box (estimated in display pixels) overlaps
    neither an earlier label nor another labelled point: a small greedy placement instead of a dependency."""
    fig = ax.figure
    px = fontsize * fig.dpi / 72                         # one character's height in pixels
    boxes, xy = [], [ax.transData.transform((x, y)) for x, y, _ in points]
    offsets = [(5, 4), (5, -4 - px), (-5, 4), (-5, -4 - px), (5, 4 + px), (-5, -4 - 2 * px), (5, -4 - 2 * px)]
    for (x, y, text), (X, Y) in zip(points, xy):
        w, h = 0.55 * px * len(text), px
        choice = offsets[0]
        for dx, dy in offsets:
            x0 = X + dx if dx > 0 else X + dx - w
            box = (x0, Y + dy, x0 + w, Y + dy + h)
            hits = any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes)
            hits = hits or any(box[0] - 3 <= P < box[2] + 3 and box[1] - 3 <= Q < box[3] + 3
                               for (P, Q) in xy if (P, Q) != (X, Y))
            if not hits:
                choice = (dx, dy)
                break
        dx, dy = choice
        x0 = X + dx if dx > 0 else X + dx - w
        boxes.append((x0, Y + dy, x0 + w, Y + dy + h))
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="left" if dx > 0 else "right", va="bottom",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7), zorder=5)


def pareto_plot(df: pd.DataFrame, ax=None, live: dict | None = None, title: str | None = None,
                before_after: bool = False, zoom: float | None = None, extra_fronts: dict | None = None,
                label: str = "front"):
    """Accuracy vs whole-model compression ratio (log x): one marker + colour per method (`method_styles`), the
    Pareto front as a dashed line, labels on the front's points only.

    live: an extra point {"ratio", "acc", "label"} drawn as a star (the widget's current K, d).
    before_after: rows that were fine-tuned also show their accuracy before fine-tuning (`acc`) as a hollow
        marker joined to the fine-tuned one (`acc_finetuned`) by a thin line -- both sides of the claim.
    zoom: show only `zoom` points of accuracy below the best point (the informative range); when some points
        fall below it, an inset in the lower left shows every point and the zoomed window.
    extra_fronts: {name: boolean mask over df's rows, or (mask, accuracy column)}: more fronts, each over its
        subset and by that column (default: fine-tuned where there is one), drawn dotted -- e.g.
        {"post-training": (all rows, "acc")}, every method's accuracy before any fine-tuning.
    label: "front" (the front's points), "all" or "none".
    returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    acc = best_accuracy(df)                      # (names the missing columns of a grid that is not one)
    if "acc_finetuned" not in df:                 # a grid from compare_configs or written by hand
        df = df.assign(acc_finetuned=float("nan"))
    data = df.assign(_acc=acc).dropna(subset=["ratio", "_acc"])
    styles = method_styles(list(dict.fromkeys(data["method"])))

    def draw(a, small: bool = False) -> None:
        for method, sub in data.groupby("method", sort=False):
            marker, colour = styles[method]
            if before_after and not small:
                tuned = sub[sub["acc_finetuned"].notna() & sub["acc"].notna()]
                for _, r in tuned.iterrows():
                    a.plot([r["ratio"]] * 2, [100 * r["acc"], 100 * r["acc_finetuned"]], "-", color=colour, lw=0.7,
                           alpha=0.6, zorder=2)
                if len(tuned):
                    a.scatter(tuned["ratio"], 100 * tuned["acc"], marker=marker, s=35, facecolors="none",
                              edgecolors=colour, linewidths=0.9, zorder=3)
            filled = marker not in ("x", "+", "1", "2", "3", "4", "|")
            a.scatter(sub["ratio"], 100 * sub["_acc"], marker=marker, s=20 if small else 45, zorder=4,
                      c=colour, edgecolors="white" if filled else None, linewidths=0.5 if filled else 1.5,
                      label=None if small else method)
        front = pareto_front(df)
        a.plot(front["ratio"], 100 * front["acc_finetuned"].fillna(front["acc"]), "k--", lw=0.8,
               label=None if small else "Pareto front")
        for i, (name, spec) in enumerate((extra_fronts or {}).items()):
            mask, col = spec if isinstance(spec, tuple) else (spec, None)
            f = pareto_front(df[mask], acc_col=col)
            y = f[col] if col else f["acc_finetuned"].fillna(f["acc"])
            a.plot(f["ratio"], 100 * y, ls=(0, (1, 1 + i)), c="0.35", lw=1.2, label=None if small else f"front: {name}")
        a.set_xscale("log")

    draw(ax)
    if before_after and data["acc_finetuned"].notna().any():
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.3", label="hollow: before fine-tuning")
    floats = data[data["method"] == "float32"]
    if len(floats):
        ax.axhline(100 * floats["_acc"].iloc[0], color="0.5", lw=0.7, ls=":", zorder=1)
    if live is not None:
        ax.scatter([live["ratio"]], [100 * live["acc"]], marker="*", s=250, c="crimson", zorder=6,
                   label=live.get("label", "live"))
    points = data if label == "all" else pareto_front(df) if label == "front" else data.iloc[:0]
    top = 100 * data["_acc"].max()
    if zoom is not None:
        lo = top - zoom
        points = points[100 * points["acc_finetuned"].fillna(points["acc"]) >= lo]
    ax.set_xlabel("whole-model compression ratio (float32 bytes / stored bytes, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.autoscale_view()
    if zoom is not None:
        ax.set_ylim(top - zoom, top + 0.08 * zoom)
    _place_labels(ax, [(r["ratio"], 100 * (r["acc_finetuned"] if pd.notna(r["acc_finetuned"]) else r["acc"]),
                        _point_label(r)) for _, r in points.iterrows()])
    if zoom is not None:
        low = 100 * data["_acc"].min()
        if low < top - zoom:                          # an inset keeps the points the zoom leaves out
            ins = ax.inset_axes([0.02, 0.04, 0.3, 0.34])
            draw(ins, small=True)
            ins.axhspan(top - zoom, top + 0.08 * zoom, color="gold", alpha=0.25, zorder=0)
            ins.set_title("all points (shaded: main view)", fontsize=6)
            ins.tick_params(labelsize=6)
            ins.xaxis.set_minor_formatter(plt.NullFormatter())
            ins.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title)
    return ax


def layer_sensitivity(model: nn.Module, test_ds: TensorDataset, k: int = 16, d: int = 4, **config) -> pd.DataFrame:
    """Quantize one layer at a time (all others float) and measure the accuracy drop.

    returns: layer, params, weight_mse, acc, drop_points (float accuracy minus this), sorted by drop.
    """
    base = evaluate(model, test_ds)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    rows = []
    for name in names:
        q = copy_model(model)
        cfg = VQConfig(k=k, d=d, **config)
        try:
            rep = quantize_(q, cfg, filter_fn=lambda m, n, name=name: n == name, progress=False)
        except ValueError as err:
            rows.append({"layer": name, "error": str(err).splitlines()[0]})
            continue
        r = rep[rep["layer"] == name].iloc[0]
        acc = evaluate(q, test_ds)
        rows.append({"layer": name, "params": int(r["params_before"]), "weight_mse": float(r["weight_mse"]),
                     "acc": acc, "drop_points": 100 * (base - acc)})
    return pd.DataFrame(rows).sort_values("drop_points", ascending=False, na_position="last").reset_index(drop=True)


# ---------------------------------------------------------------- command line

def add_sweep_command(sub) -> None:
    """Register `python -m vqlab sweep` on an argparse sub-parser collection."""
    s = sub.add_parser("sweep", help="compress a trained baseline over a K x d grid; write CSV + PNG")
    s.add_argument("--dataset", default="fashion-mnist")
    s.add_argument("--model", default="lenet5")
    s.add_argument("--epochs", type=int, default=10, help="epochs of the float baseline (trained if missing)")
    s.add_argument("-k", "--k", type=int, nargs="+", default=[16, 64, 256])
    s.add_argument("-d", "--d", type=int, nargs="+", default=[2, 4, 8], help="under torchrun write -d (torchrun "
                   "reads --d as its own --duplicate-* option)")
    s.add_argument("--finetune-epochs", type=int, default=1)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/", help="folder for the CSV and PNG (created; checked before any work)")
    s.add_argument("--baseline", default=None, help="float baseline checkpoint (default "
                                                    "data/checkpoints/<model>_<dataset>_e<epochs>_s<seed>.pt)")
    s.add_argument("--workers", type=int, default=1, help="local processes that share the grid (torch's elastic "
                   "launcher, as torchrun --nproc_per_node N); under torchrun the ranks share it anyway")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_run_sweep, check=_check_sweep_args)


def _check_sweep_args(args) -> None:
    """Everything `_run_sweep` needs, checked before training or compressing anything (ValueError)."""
    for flag, values, low in (("--k", args.k, 2), ("--d", args.d, 1)):
        bad = [v for v in values if v < low]
        if bad:
            raise ValueError(f"{flag} values must be >= {low}, got {bad[0]}")
    for flag, value, low in (("--finetune-epochs", args.finetune_epochs, 0), ("--epochs", args.epochs, 1),
                             ("--max-steps", args.max_steps, 1), ("--workers", getattr(args, "workers", 1), 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; give a folder for the CSV and PNG")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: folder is not writable")


def _sweep_rank(args) -> int:
    """One process of `sweep --workers N` (module level, so the launcher can start it)."""
    args.workers = 1
    return _run_sweep(args)


def _run_sweep(args) -> int:
    from . import distributed as _dist

    if getattr(args, "workers", 1) > 1 and not _dist.active():
        _dist.launch_local(_sweep_rank, args.workers, args)      # N local ranks; rank 0 writes and prints
        return 0
    joined = _dist.init()
    try:
        return _sweep_and_write(args)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _sweep_and_write(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import distributed as _dist
    from .data import load_dataset
    from .train import train_or_load

    out = Path(args.out)
    main_rank = _dist.is_main()
    model, meta = train_or_load(args.model, args.dataset, epochs=args.epochs, seed=args.seed,
                                path=getattr(args, "baseline", None), progress=not args.quiet and main_rank)
    df = sweep(model, load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test"), ks=args.k, ds=args.d,
               finetune_epochs=args.finetune_epochs, lr=args.lr, max_steps=args.max_steps, seed=args.seed,
               progress=not args.quiet)
    if not main_rank:                                              # torchrun: rank 0 writes the combined table
        return 0
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{args.model}_{args.dataset}"
    df.to_csv(out / f"{stem}.csv", index=False)
    ax = pareto_plot(df, title=f"{args.model} on {args.dataset}")
    ax.figure.tight_layout()
    ax.figure.savefig(out / f"{stem}.png", dpi=110)
    plt.close(ax.figure)
    print(df.to_string(index=False))
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.png')}")
    return 0
