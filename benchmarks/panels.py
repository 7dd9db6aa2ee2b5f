"""How fast the notebooks' panels answer (issue 23), in full mode: LeNet-5 on Fashion-MNIST, the shipped checkpoint.

    python benchmarks/panels.py                       # every panel but QAF's, quiet then with a competing process
    python benchmarks/panels.py --panels compression speed --no-busy
    python benchmarks/panels.py --panels qaf          # notebook 07's ADMM panel (minutes per move)

Prints, per panel: the first render (building the panel: its baseline evaluation and first answer) and the
median / p90 / max seconds of a move (until the full answer; "first answer": until the readout first shows a result,
a labelled quick estimate where the panel gives one -- QAF's ADMM panel shows CP + PTQ first), moving every slider through every option one at a time (each slider visits
its other options and returns to its start) -- first on the machine as it is ("quiet"), then again on fresh panels
with one competing CPU-bound process this script starts itself (and stops by its process id).  Before the panels:
the first evaluation of a VQ LeNet-5 (K=256, d=4) against the float model's, the k-means sweep the compression
panel draws (notebook 02's grid without fine-tuning: the panel answers swept points from it), and
`vqlab.compress(lenet5, target_ratio=32)` (its candidates feed the budget panel).  The CPU model and flags and the
load average are printed with the table: on a shared machine the figures move with the other work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

PANELS = ("codebook", "compression", "pq", "rvq", "lattice", "speed", "budget", "qaf")
TARGETS = {"median move": 1.0, "worst move": 2.0, "first render": 3.0}


def _cpu() -> str:
    model, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("avx", "sse4", "fma", "f16c"))]
    return f"{model}; {os.cpu_count()} cores; SIMD flags: {' '.join(sorted(simd))}"


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _walk(panel) -> tuple[list[float], list[float]]:
    """Seconds of every move, each slider through its other options and back to its start: until the full answer
    (`set` returned) and until the first answer (the readout's first value after "computing …": a labelled quick
    estimate where the panel gives one, else the full answer)."""
    times, firsts, t0, first = [], [], [0.0], [None]

    def seen(change):
        if first[0] is None and not change["new"].startswith("<span class='vqlab-computing'"):
            first[0] = time.perf_counter() - t0[0]
    panel.readout.observe(seen, names="value")
    for name, s in panel.sliders.items():
        start = s.value
        for option in [o for o in s.options if o != start] + [start]:
            first[0], t0[0] = None, time.perf_counter()
            times.append(_seconds(lambda: panel.set(**{name: option})))
            firsts.append(first[0] if first[0] is not None else times[-1])
            if panel.error:
                raise RuntimeError(f"{name}={option}: {panel.error}")
    return times, firsts


def _builders(model, train, test, grid, candidates, dense_bytes):
    import vqlab.methods.gong as gong
    import vqlab.methods.lattice as lat
    import vqlab.methods.qaf as qaf
    from vqlab.widgets import budget_panel, codebook_panel, compression_panel, method_panel, speed_panel

    return {
        "codebook": lambda: codebook_panel(model.classifier[1], k=16, d=2),                                    # nb01
        "compression": lambda: compression_panel(model, train, test, grid, ks=[4, 16, 64, 256], ds=[1, 2, 4, 8],
                                                 k=256, d=4),                                                   # nb02
        "pq": lambda: method_panel(model, test, grid, {"K": ([4, 16, 64], 16), "subspaces": ([1, 2, 4], 2)},
                                   lambda K, subspaces: gong.PQConfig(k=K, subspaces=subspaces, axis="output")),  # nb04
        "rvq": lambda: method_panel(model, test, grid, {"K": ([4, 16, 64, 256], 16), "d": ([2, 4, 8], 4),
                                                        "stages": ([1, 2, 3, 4], 2)},
                                    lambda K, d, stages: gong.RVQConfig(k=K, d=d, stages=stages)),              # nb04
        "lattice": lambda: method_panel(model, test, grid, {"lattice": (["Z", "D4", "E8"], "E8"),
                                                            "step": ([0.01, 0.02, 0.05, 0.1, 0.2], 0.05),
                                                            "coder": (list(lat.CODERS), "lzma")},
                                        lambda lattice, step, coder: lat.LatticeConfig(lattice=lattice, step=step,
                                                                                       coder=coder, pad=True)),  # nb05
        "speed": lambda: speed_panel(m=1024, n=1024, ks=[16, 64, 256, 1024], ds=[2, 4, 8], batches=[1, 16, 128],
                                     k=256, d=4, batch=1, repeats=15),                                         # nb03
        "budget": lambda: budget_panel(candidates, dense_bytes),                                                # nb09
        "qaf": lambda: method_panel(model, test, grid, {"rank_ratio": ([0.125, 0.25, 0.5, 1.0], 0.25),
                                                        "bits": ([2, 3, 4, 6, 8], 4)},
                                    lambda rank_ratio, bits: qaf.QAFConfig(rank_ratio=rank_ratio, bits=bits,
                                                                           algorithm="admm", iters=10, als_iters=50),
                                    quick=lambda rank_ratio, bits: qaf.QAFConfig(rank_ratio=rank_ratio, bits=bits,
                                                                                 algorithm="ptq", als_iters=50),
                                    quick_label="CP + PTQ"),                                            # nb07
    }


def _measure(names, builders, condition: str) -> list[dict]:
    rows = []
    for name in names:
        first = None
        try:
            holder = {}
            first = _seconds(lambda: holder.setdefault("p", builders[name]()))
            moves, firsts = _walk(holder["p"])
            p90 = statistics.quantiles(moves, n=10, method="inclusive")[-1] if len(moves) > 1 else moves[0]
            rows.append({"condition": condition, "panel": name, "first render s": first, "moves": len(moves),
                         "median s": statistics.median(moves), "p90 s": p90, "max s": max(moves),
                         "first answer median s": statistics.median(firsts), "first answer max s": max(firsts),
                         "load": os.getloadavg()[0]})
        except Exception as err:  # a benchmark reports what failed and goes on
            rows.append({"condition": condition, "panel": name, "first render s": first, "error": str(err)[:120]})
        print(f"  {condition:6s} {name:12s} " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in rows[-1].items() if k not in ("condition", "panel")),
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panels", nargs="+", choices=PANELS, default=[n for n in PANELS if n != "qaf"])
    p.add_argument("--no-busy", action="store_true", help="skip the run with a competing process")
    p.add_argument("--no-compress", action="store_true", help="skip timing vqlab.compress (the budget panel then "
                   "uses a one-candidate-per-layer table)")
    p.add_argument("--compress-epochs", type=float, default=2.0, help="compress's epochs (its default: 2)")
    p.add_argument("--sweep-ks", type=int, nargs="+", default=[4, 16, 64, 256], help="the sweep's K (the panel's)")
    p.add_argument("--sweep-ds", type=int, nargs="+", default=[1, 2, 4, 8], help="the sweep's d (the panel's)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    import pandas as pd
    import torch

    import vqlab
    from vqlab.data import load_dataset
    from vqlab.experiments import copy_model, sweep
    from vqlab.size import compressed_size
    from vqlab.train import evaluate, train_or_load

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, _ = train_or_load("lenet5", "fashion-mnist", epochs=10, progress=False)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    print(f"CPU: {_cpu()}; torch threads {torch.get_num_threads()}; load average at start "
          f"{os.getloadavg()[0]:.2f}; warm-up thread {vqlab.kernels.warm.status()['state']}")

    figures = []

    def note(what: str, value: str) -> None:
        figures.append((what, value))
        print(f"{what}: {value}", flush=True)

    q = copy_model(model)
    vqlab.quantize_(q, vqlab.VQConfig(k=256, d=4), progress=False)
    float_first = _seconds(lambda: evaluate(model, test))
    vq_first = _seconds(lambda: evaluate(q, test))
    float_again = _seconds(lambda: evaluate(model, test))
    vq_again = _seconds(lambda: evaluate(q, test))
    note("float LeNet-5 evaluation (10k images), first / again", f"{float_first:.2f} s / {float_again:.2f} s")
    note("VQ LeNet-5 K=256 d=4 evaluation, first / again", f"{vq_first:.2f} s / {vq_again:.2f} s")
    note("VQ first / float first", f"{vq_first / float_first:.2f}x")
    note("auto's choices", str(sorted(set(vqlab.kernels.auto_choices().values()))))
    grid_holder = {}
    t = _seconds(lambda: grid_holder.setdefault("g", sweep(model, None, test, ks=args.sweep_ks, ds=args.sweep_ds,
                                                           baselines=("float",), progress=False)))
    grid = grid_holder["g"]
    note(f"sweep K {args.sweep_ks} x d {args.sweep_ds}, k-means only (notebook 02's grid without fine-tuning; the "
         f"compression panel answers these points from it)", f"{t:.1f} s")
    dense_bytes = compressed_size(model).dense_bytes
    if args.no_compress:
        candidates = pd.DataFrame([{"layer": n, "setting": s, "bytes": b, "float_bytes": 4 * m.weight.numel(),
                                    "predicted_loss": loss}
                                   for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                                   for s, b, loss in (("float", 4 * m.weight.numel(), 0.0),
                                                      ("vq 2 bit", m.weight.numel() // 4, 0.01),
                                                      ("vq 0.5 bit", m.weight.numel() // 16, 0.05))])
    else:
        holder = {}
        t = _seconds(lambda: holder.setdefault("r", vqlab.compress(model, train, target_ratio=32, val_ds=test,
                                                                   epochs=args.compress_epochs, progress=False)))
        report = holder["r"][1]
        candidates = report.candidates
        s = report.summary().iloc[0]
        note(f"vqlab.compress(lenet5, target_ratio=32, epochs={args.compress_epochs:g})",
             f"{t:.1f} s (ratio {s['ratio']:.1f}x, accuracy {s['accuracy']:.4f}, {len(candidates)} candidate settings)")
    builders = _builders(model, train, test, grid, candidates, dense_bytes)

    rows = _measure(args.panels, builders, "quiet")
    if not args.no_busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            rows += _measure(args.panels, _builders(model, train, test, grid, candidates, dense_bytes), "busy")
        finally:
            hog.terminate()
            hog.wait(10)

    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    for what, value in figures:
        print(f"{what}: {value}")
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(df.to_string(index=False))
    print("targets (issue 23, quiet): median move <= 1 s, worst <= 2 s, first render <= 3 s; busy no more than 2x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
