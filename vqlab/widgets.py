"""ipywidgets panels for the notebooks: sliders over codebook size K and segment length d, and over any
method's knobs (`method_panel`: sub-spaces, stages, lattice, step, coder, ...).

Every panel is a `Panel` (an ipywidgets VBox with CSS class `vqlab-panel`) holding
  - SelectionSliders whose description is the knob's name ("K", "d", "batch", "stages", "step", ...),
  - an HTML readout (class `vqlab-readout`) with the figures for the current values,
  - an Output (class `vqlab-plot`) with the plot as a PNG image,
and redraws both on every slider change: the readout says "computing …" (class `vqlab-computing`) at once, then
shows the answer (`Panel.set` returns once the answer is shown).  When drawing fails, the readout shows the error
and the plot is cleared (no stale picture of other values).  The browser tests (tests/ui) rely on these names.
Panels over a stored sweep answer points the sweep already holds from it instead of computing them again.
Panels only call the library (experiments, codebook, kernels); they hold no logic of their own.
"""
from __future__ import annotations

import inspect
import io
import itertools
import math
from typing import Callable, Sequence

import ipywidgets as W
import torch
import torch.nn as nn

from .bits import index_bits_per_weight
from .checks import check_int, check_number

__all__ = ["COMPUTING", "Panel", "slider", "codebook_panel", "compression_panel", "method_panel", "speed_panel",
           "budget_panel"]


COMPUTING = "computing …"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _check_options(field: str, options: Sequence, low: int) -> None:
    """A slider's integer options: at least one, each an int >= low (ValueError naming the field and the value)."""
    if not len(options):
        raise ValueError(f"{field} is empty: give at least one option")
    for v in options:
        check_int(f"every value of {field}", v, low)


def _check_candidates(candidates) -> None:
    """A `CompressReport.candidates` table: a DataFrame with layer, setting, bytes, float_bytes, predicted_loss
    and at least one row."""
    import pandas as pd

    need = ["layer", "setting", "bytes", "float_bytes", "predicted_loss"]
    if not isinstance(candidates, pd.DataFrame):
        raise TypeError(f"candidates must be a pandas DataFrame (CompressReport.candidates), got "
                        f"{type(candidates).__name__}")
    missing = [c for c in need if c not in candidates]
    if missing or candidates.empty:
        raise ValueError(f"candidates must be a CompressReport.candidates table with columns {need} and at least "
                         f"one row; got {len(candidates)} rows, missing {missing}")


def slider(description: str, options: Sequence, value) -> W.SelectionSlider:
    """A selection slider over `options` starting at `value` (ValueError when it is not one of them); what every
    panel's knobs are."""
    if value not in options:
        raise ValueError(f"start value {description}={value} is not one of the slider options {list(options)}")
    return W.SelectionSlider(options=list(options), value=value, description=description,
                             continuous_update=False, style={"description_width": "initial"},
                             layout=W.Layout(width="420px"))


class Panel(W.VBox):
    """Sliders + readout + plot; `render(**values) -> (readout_html, matplotlib Figure)` draws one state, or
    yields several (readout, figure) pairs in turn -- a labelled quick estimate first, the full answer last --
    each shown as it comes (`set` returns once the last is shown).

    `panel.sliders` maps description -> slider; `panel.set(K=64)` moves sliders from code (tests);
    `panel.show()` displays it with a static picture of its first render beside it (for the web view);
    `panel.text` and `panel.png` hold what is shown now; `panel.error` the last exception text (shown
    in the readout instead of raising inside the widget callback).
    """

    def __init__(self, sliders: list[W.SelectionSlider], render: Callable[..., tuple[str, object]], title: str = ""):
        self.sliders = {s.description: s for s in sliders}
        self._render = render
        self.readout = W.HTML()
        self.readout.add_class("vqlab-readout")
        self.plot = W.Output()
        self.plot.add_class("vqlab-plot")
        self.text, self.png, self.error = "", b"", None
        head = [W.HTML(f"<b>{title}</b>")] if title else []
        super().__init__(head + [W.HBox(sliders[:2]), *sliders[2:], self.readout, self.plot])
        self.add_class("vqlab-panel")
        for s in sliders:
            s.observe(lambda change: self.update(), names="value")
        self.update()

    @property
    def values(self) -> dict:
        return {name: s.value for name, s in self.sliders.items()}

    def set(self, **values) -> None:
        """Move sliders from code, e.g. panel.set(K=64, d=2); redraws once per changed slider.

        raises ValueError naming the slider and its options for an unknown slider or a value not offered
        (checked for all values before any slider moves).
        """
        for name, v in values.items():
            if name not in self.sliders:
                raise ValueError(f"no slider {name!r} on this panel; sliders: {list(self.sliders)}")
            if v not in self.sliders[name].options:
                raise ValueError(f"slider {name!r} has no option {v!r}; options: {list(self.sliders[name].options)}")
        for name, v in values.items():
            self.sliders[name].value = v

    def show(self) -> None:
        """Display the panel, then a static picture of what it shows now: its readout (HTML) and its plot (PNG)
        as ordinary outputs.  A stored notebook keeps them, so a reader on the web (GitHub, nbviewer, a closed
        kernel), where the sliders cannot run, still sees the panel's first render; the live panel above redraws
        on every slider move, the picture stays as stored."""
        from IPython.display import HTML, Image, display

        display(self)
        values = ", ".join(f"{k}={v}" for k, v in self.values.items())
        display(HTML(f"<div class='vqlab-static'><i>Static picture of the panel at {values} (kept with the "
                     f"notebook for readers without a running kernel):</i><br>{self.text}</div>"))
        if self.png:
            display(Image(data=self.png))

    def update(self) -> None:
        from IPython.display import Image, clear_output, display

        values = self.values
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        self.readout.value = f"<span class='vqlab-computing' style='color:#777'>{COMPUTING} ({label})</span>"
        try:
            out = self._render(**values)
            # a generator yields stages: a labelled quick estimate first, the full answer last
            for text, fig in (out if inspect.isgenerator(out) else [out]):
                self._show(text, fig, clear_output, display, Image)
            self.error = None
        except Exception as err:  # show the problem where the user looks, keep the panel alive
            self.error = f"{type(err).__name__}: {err}"
            self._show(f"<span style='color:#b00'>{type(err).__name__}: {err}</span>", None, clear_output, display,
                       Image)

    def _show(self, text: str, fig, clear_output, display, Image) -> None:
        self.text = text
        self.readout.value = text
        self.png = _png(fig) if fig is not None else b""
        with self.plot:
            clear_output(wait=fig is not None)
            if fig is not None:
                display(Image(data=self.png))


# ---------------------------------------------------------------- notebook 01: codebook learning

def codebook_panel(weight: torch.Tensor | nn.Module, ks: Sequence[int] = (4, 8, 16, 32, 64, 128, 256),
                   ds: Sequence[int] = (1, 2, 4, 8), k: int = 16, d: int = 2, seed: int = 0,
                   max_points: int = 4000) -> Panel:
    """k-means codebook of a layer's weight segments; scatter of segments and codewords (first 2 dims).

    weight: a layer (Linear/Conv2d, segmented along input channels) or a 2-D tensor (m, n).
    """
    from .codebook import kmeans
    from .methods.vq import weight_segments

    def segments(d_: int) -> torch.Tensor:
        if isinstance(weight, nn.Module):
            return weight_segments(weight, d_).float()
        w = weight.detach().float()
        if w.shape[-1] % d_:
            raise ValueError(f"d={d_} does not divide the row length {w.shape[-1]}")
        return w.reshape(-1, d_)

    fitted: dict = {}                                          # (K, d) -> (segments, k-means result): a move back

    def render(K: int, d: int):
        import matplotlib.pyplot as plt

        if (K, d) not in fitted:
            x = segments(d)
            fitted[K, d] = (x, kmeans(x, min(K, len(x)), seed=seed))   # k-means needs K <= segments (said below)
        x, res = fitted[K, d]
        k_used = min(K, len(x))
        var = x.var().item()
        snr = 10 * math.log10(var / max(res.distortion, 1e-30))
        fig, ax = plt.subplots(figsize=(5.2, 4))
        g = torch.Generator().manual_seed(seed)
        sel = torch.randperm(len(x), generator=g)[:max_points]
        if d == 1:
            ax.hist(x[:, 0].numpy(), bins=120, color="0.6")
            for c in res.codebook[:, 0].tolist():
                ax.axvline(c, color="crimson", lw=0.8)
            ax.set_xlabel("weight value")
            ax.set_ylabel("count")
        else:
            ax.scatter(x[sel, 0], x[sel, 1], s=3, c=res.assignments[sel].numpy() % 20, cmap="tab20", alpha=0.5)
            ax.scatter(res.codebook[:, 0], res.codebook[:, 1], marker="x", c="k", s=30, label="codewords")
            ax.set_xlabel("segment[0]")
            ax.set_ylabel("segment[1]")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"{len(x)} segments of length {d}, K={k_used}" + ("" if d <= 2 else " (first 2 of d dims)"), fontsize=9)
        head = f"K={K}, d={d}" if k_used == K else (
            f"K={K} asked, but the layer has only {len(x)} segments of length d={d}: "
            f"<b>k-means used K={k_used}</b> (each segment its own codeword)")
        text = (f"{head}: <b>{index_bits_per_weight(k_used, d):.2f} bits/weight</b>, weight MSE {res.distortion:.3e}, "
                f"SNR {snr:.1f} dB, {res.n_iter} k-means iterations")
        return text, fig

    return Panel([slider("K", ks, k), slider("d", ds, d)], render, "k-means codebook of one layer")


# ---------------------------------------------------------------- notebook 02: compression vs accuracy

def compression_panel(model: nn.Module, train_ds, test_ds, grid, ks: Sequence[int] = (4, 16, 64, 256),
                      ds: Sequence[int] = (1, 2, 4, 8), k: int = 256, d: int = 4, finetune_steps: int = 0,
                      seed: int = 0, from_grid: bool = True) -> Panel:
    """Compress `model` with the sliders' K and d, evaluate, and place the point on the sweep's Pareto plot.

    grid: the DataFrame from `vqlab.experiments.sweep` (drawn underneath).  finetune_steps > 0 fine-tunes
    the codebooks that many steps before evaluating.  Results are cached per (K, d).
    from_grid: with finetune_steps=0, a (K, d) the grid holds without error is answered from its row (ratio and
    k-means accuracy `acc`, which `sweep` measures before any fine-tuning) instead of compressed again: the grid
    must come from `sweep` of this `model` with this `seed` (and no other VQConfig fields).
    """
    from .experiments import best_accuracy, compress_and_evaluate, pareto_plot
    from .train import evaluate

    best_accuracy(grid)                                         # the grid's columns, before any work
    _check_options("ks", ks, 2)
    _check_options("ds", ds, 1)
    check_int("finetune_steps", finetune_steps, 0)
    base = evaluate(model, test_ds)
    cache: dict = _swept_points(grid, ks, ds) if from_grid and not finetune_steps else {}

    def render(K: int, d: int):
        import matplotlib.pyplot as plt

        if (K, d) not in cache:
            row, _ = compress_and_evaluate(model, train_ds, test_ds, K, d, finetune_epochs=1 if finetune_steps else 0,
                                           max_steps=finetune_steps or None, seed=seed, baseline_acc=base)
            cache[K, d] = row
        row = cache[K, d]
        acc = row["acc_finetuned"] if finetune_steps else row["acc"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        pareto_plot(grid, ax=ax, live={"ratio": row["ratio"], "acc": acc, "label": f"live: K={K}, d={d}"})
        text = (f"K={K}, d={d}: <b>{row['ratio']:.1f}× smaller</b>, accuracy {acc:.3f} "
                f"({100 * (acc - base):+.1f} points vs float {base:.3f})"
                + (" (from the sweep)" if row.get("swept") else ""))
        return text, fig

    return Panel([slider("K", ks, k), slider("d", ds, d)], render, "compress, evaluate, place on the plot")


def _swept_points(grid, ks: Sequence[int], ds: Sequence[int]) -> dict:
    """{(K, d): row} for the VQ / scalar k-means rows of a `sweep` grid at the sliders' values, without error and
    with a finite ratio and accuracy; each row a dict marked swept=True."""
    out = {}
    for row in grid.to_dict("records"):
        k, d, err = row.get("K"), row.get("d"), row.get("error")
        if (row.get("method") not in ("vq", "scalar k-means") or isinstance(err, str) or k not in ks or d not in ds
                or not all(isinstance(row.get(c), (int, float)) and math.isfinite(row[c]) for c in ("ratio", "acc"))):
            continue
        out[int(k), int(d)] = {**row, "swept": True}
    return out


# ---------------------------------------------------------------- notebooks 04, 05: any method's knobs

def method_panel(model: nn.Module, test_ds, grid, knobs: dict[str, tuple[Sequence, object]],
                 make_config: Callable[..., object], title: str = "re-quantize and place the point",
                 stored=None, stored_label: Callable[..., str | None] | None = None,
                 quick: Callable[..., object] | None = None, quick_label: str = "a quick setting",
                 quick_images: int = 1000) -> Panel:
    """Sliders over a method's knobs; each change quantizes a copy of `model` with `make_config(**values)`,
    evaluates it and places the point (red star) on the accuracy-vs-ratio plot of `grid`.

    knobs: {slider name: (options, start value)}, e.g. {"K": ([4, 16, 64], 16), "stages": ([1, 2, 3], 2)};
    make_config(**values) -> a config for `vqlab.quantize_` (any registered method).  grid: a DataFrame from
    `sweep` / `compare_configs` (drawn underneath).  Results are cached per slider state.
    stored: optional `compare_configs` table of this model and test set whose `label`s name slider states the
    way the readout does ("K=16, subspaces=2"), or as `stored_label(**values)` names them (e.g. the notebook's own
    "PQ out K=16 s=2"; None: that state is not in the table): those states answer from their row without
    quantizing again -- the table must come from the same configs `make_config` makes, on the same model and data.
    quick(**values) -> a config that answers fast (e.g. QAF without its ADMM sweeps), for methods whose full
    answer takes longer than a slider move should: a state not answered yet first shows that config's point,
    evaluated on a fixed `quick_images`-image subset of the test set (seeded) against the float model on the
    same subset and labelled "quick estimate (<quick_label>, N test images)", then the full answer replaces it.
    """
    from .experiments import best_accuracy, compare_configs, pareto_plot
    from .train import evaluate

    best_accuracy(grid)                                         # the grid's columns, before any work
    check_int("method_panel quick_images", quick_images, 1)
    if quick is not None and not callable(quick):
        raise TypeError(f"method_panel: quick must be a callable returning a config, got {type(quick).__name__}")
    base = evaluate(model, test_ds)
    sliders = [slider(name, options, start) for name, (options, start) in knobs.items()]
    cache: dict = {}
    if stored is not None:
        by_label = {str(r["label"]): r for _, r in stored.iterrows()} if "label" in stored else {}
        for values in itertools.product(*(list(s.options) for s in sliders)):
            state = tuple(zip(knobs, values))
            name = (stored_label(**dict(state)) if stored_label is not None
                    else ", ".join(f"{k}={v}" for k, v in state))
            row = by_label.get(name) if name is not None else None
            if row is not None:
                cache[state] = row.copy()
                cache[state]["swept"] = True

    subset: list = []                                           # (test subset, float accuracy on it), made once

    def drawn(row, label: str, base_acc: float, note: str):
        import matplotlib.pyplot as plt

        error = row.get("error")                                  # a stored table may come without the column
        if isinstance(error, str):
            raise ValueError(error)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        pareto_plot(grid, ax=ax, live={"ratio": row["ratio"], "acc": row["acc"], "label": f"live: {label}"})
        text = (f"{label}: <b>{row['ratio']:.1f}× smaller</b> ({row['compressed_bytes'] / 1024:.1f} KiB, "
                f"{row['bits_per_weight']:.2f} index bits/weight), accuracy {row['acc']:.3f} "
                f"({100 * (row['acc'] - base_acc):+.1f} points vs float {base_acc:.3f})" + note)
        return text, fig

    def render(**values):
        key = tuple(values.items())
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        if key not in cache:
            if quick is not None:
                if not subset:
                    subset.append(_test_subset(test_ds, quick_images))
                    subset.append(evaluate(model, subset[0]))
                est = compare_configs(model, subset[0], {label: quick(**values)}, baseline_acc=subset[1],
                                      progress=False).iloc[0]
                n = len(subset[0])
                text, fig = drawn(est, label, subset[1], "")
                yield (f"<i>quick estimate ({quick_label}, {n:,} test images)</i> -- {text}; "
                       f"<span class='vqlab-computing' style='color:#777'>{COMPUTING} the full answer</span>", fig)
            df = compare_configs(model, test_ds, {label: make_config(**values)}, baseline_acc=base, progress=False)
            cache[key] = df.iloc[0]
        row = cache[key]
        yield drawn(row, label, base, " (from the stored table)" if row.get("swept", False) is True else "")

    return Panel(sliders, render, title)


def _test_subset(test_ds, n: int):
    """A fixed (seed 0) random subset of n samples of a TensorDataset (all of it when it holds n or fewer)."""
    from torch.utils.data import TensorDataset

    total = len(test_ds)
    if total <= n:
        return test_ds
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values
    return TensorDataset(*(t[keep] for t in test_ds.tensors))


# ---------------------------------------------------------------- notebook 03: FLOPs and wall time

_BACKEND_COLORS = {"dense fp32": "0.5", "int8 dynamic": "tab:green", "vq torch": "tab:orange", "vq dense": "tab:purple",
                   "vq numba": "tab:red", "vq auto": "tab:blue", "vq simd": "tab:brown", "vq simd packed": "tab:olive"}


def speed_panel(m: int = 1024, n: int = 1024, ks: Sequence[int] = (16, 64, 256, 1024), ds: Sequence[int] = (2, 4, 8),
                batches: Sequence[int] = (1, 16, 128), k: int = 256, d: int = 4, batch: int = 1,
                repeats: int = 10) -> Panel:
    """Measured wall time of one m x n layer: dense fp32, int8 dynamic, VQ (torch, dense, numba, auto; for K <= 16
    also the approximate simd kernel on row-major and on packed indices), and the FLOP ratio."""
    from .bench import layer_timings
    from .flops import flop_ratio

    check_int("m", m, 1)
    check_int("n", n, 1)
    check_int("repeats", repeats, 1)
    _check_options("ks", ks, 2)
    _check_options("ds", ds, 1)
    _check_options("batches", batches, 1)

    def render(K: int, d: int, batch: int):
        import matplotlib.pyplot as plt

        df = layer_timings(m, n, K, d, batch, repeats=repeats)
        t = dict(zip(df["backend"], df["seconds"]))
        ratio = flop_ratio(K, d, m)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(df["backend"], 1e3 * df["seconds"], color=[_BACKEND_COLORS[b] for b in df["backend"]])
        ax.set_xlabel("milliseconds per call (median)")
        ax.set_title(f"{m}×{n} layer, batch {batch}, K={K}, d={d}", fontsize=9)
        ax.invert_yaxis()
        text = (f"K={K}, d={d}, batch={batch}: FLOP ratio VQ/dense = K/m + 1/(2d) = <b>{ratio:.3f}</b>; "
                f"measured: VQ auto {1e3 * t['vq auto']:.3f} ms vs dense {1e3 * t['dense fp32']:.3f} ms "
                f"(<b>{t['dense fp32'] / t['vq auto']:.2f}×</b>), int8 {1e3 * t['int8 dynamic']:.3f} ms")
        if "vq simd packed" in t:
            text += (f"; simd packed (approximate) {1e3 * t['vq simd packed']:.3f} ms "
                     f"(<b>{t['int8 dynamic'] / t['vq simd packed']:.2f}×</b> int8)")
        return text, fig

    return Panel([slider("K", ks, k), slider("d", ds, d), slider("batch", batches, batch)], render,
                 f"wall time of one {m}×{n} layer")


# ---------------------------------------------------------------- notebook 09: compress to a size budget

def budget_panel(candidates, dense_bytes: int, fixed_bytes: int = 0, targets: Sequence[float] = (8, 16, 24, 32, 40),
                 target: float = 32, measured=None, byte_unit: int = 1) -> Panel:
    """A target-ratio slider over `vqlab.recipes.allocate`: the per-layer allocation for that budget (index
    bits per weight and bytes per layer, as bars), its predicted loss, and — where `compress` was run for
    that target — the measured accuracy.

    candidates: the `CompressReport.candidates` table (layer, setting, bytes, predicted_loss, ...);
    dense_bytes: the float32 model's bytes; fixed_bytes: bytes outside the Linear/Conv2d layers;
    measured: optional DataFrame with columns target_ratio, ratio, accuracy, float_accuracy.
    """
    from .recipes import allocate

    _check_candidates(candidates)
    check_int("dense_bytes", dense_bytes, 1)
    check_int("fixed_bytes", fixed_bytes, 0)
    check_int("byte_unit", byte_unit, 1)
    if not len(targets):
        raise ValueError("targets is empty: give at least one target ratio")
    for t in targets:
        check_number("every value of targets", t, 0, low_open=True)
    by_target = {} if measured is None else {float(r.target_ratio): r for r in measured.itertuples()}

    def render(target: float):
        import matplotlib.pyplot as plt

        budget = int(dense_bytes // target)
        chosen = allocate(candidates, budget, fixed_bytes, byte_unit)
        total = int(chosen["bytes"].sum()) + fixed_bytes
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        names = list(chosen["layer"])
        bits = [8 * b / max(1, w) for b, w in zip(chosen["bytes"], chosen["float_bytes"] / 4)]
        a1.barh(names, bits, color=["0.6" if s == "float" else "tab:blue" for s in chosen["setting"]])
        a1.set_xlabel("stored bits per weight (code + bias)")
        a1.invert_yaxis()
        for y, s in enumerate(chosen["setting"]):
            a1.text(0.05, y, s, va="center", fontsize=7, color="white" if s != "float" else "black")
        a2.barh(names, chosen["bytes"], color="tab:orange")
        a2.set_xlabel("bytes")
        a2.set_yticks([])
        a2.invert_yaxis()
        fig.suptitle(f"allocation for target={target:g}x: {total} of {budget} bytes", fontsize=9)
        text = (f"target={target:g}: budget {budget} bytes, allocated <b>{total}</b> bytes "
                f"(<b>{dense_bytes / total:.1f}×</b>), predicted loss increase {chosen['predicted_loss'].sum():.3f}")
        row = by_target.get(float(target))
        if row is not None:
            text += (f"; compress() measured <b>{row.ratio:.1f}×</b> at accuracy {row.accuracy:.4f} "
                     f"({100 * (row.accuracy - row.float_accuracy):+.2f} points)")
        return text, fig

    return Panel([slider("target", list(targets), target)], render, "allocation for a size budget")
