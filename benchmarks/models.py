"""End to end: does a compressed network run faster than its float self?  (issue 25)

    python benchmarks/models.py                                  # every model, batch 1 and 256, 1 and 2 threads
    python benchmarks/models.py --models lenet5 resnet20 --batches 1 --threads 1 --rounds 5

Models: LeNet-5, the small CNN ("cnn"), ResNet-20 (Fashion-MNIST shape, 1x28x28, freshly initialised: speed does
not depend on the weights' values) and a 4-layer 4096-wide MLP (ReLU between).  Variants of each, all built
before timing and timed in one process, alternating block after block (order shuffled each round, as in
benchmarks/simd.py), so a busy neighbour slows them alike:

    float              the model as torch runs it
    int8 dynamic       torch.ao's dynamic int8 quantization (nn.Linear only: convolutions stay float)
    VQ K=256 d=4       vqlab.quantize_(model, VQConfig(k=256, d=4), filter) in eval mode, backend "auto"; the filter
                       takes every layer but a convolution over one input channel (the CNNs' first) and a layer
                       with fewer than K segments, so VQ covers the layers int8 dynamic does (the last linear too,
                       where K allows) plus the other convolutions
    VQ K=16 d=2        the same at K=16, d=2 (2 bits/weight)
    VQ K=16 d=2 packed + vqlab.pack_simd_ (the approximate register-table kernels: linears get a SimdCode, the
                       convolutions a SimdConvCode, the lookup-table convolution with one table per input pixel)

The MLP's codebooks come from 2 iterations of randomly initialised k-means (its 67 M weights would take minutes of
k-means; the time of a call does not depend on how good the codebook is).  Printed: per-call ms (median
[min, max] over rounds) and each variant's speed relative to float (> 1: faster), per model, batch and thread
count; then the per-call overhead of a small layer's eval call (a VQ nn.Linear(120, 84) against the float layer,
microseconds: the issue's target is within 20 us); the CPU and its flags head the output.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before numba / torch start their OpenMP runtimes

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simd import cpu_line, fmt, timings  # noqa: E402  the alternating timer of benchmarks/simd.py

import vqlab  # noqa: E402
import vqlab.train  # noqa: E402
from vqlab import VQConfig  # noqa: E402

MODELS = ("lenet5", "cnn", "resnet20", "mlp4096")
VARIANTS = ("float", "int8 dynamic", "VQ K=256 d=4", "VQ K=16 d=2", "VQ K=16 d=2 packed")


CHECKPOINTS = {"lenet5": 10, "cnn": 2, "resnet20": 30}      # epochs of the shipped Fashion-MNIST baselines


def build(name: str, trained: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """A float model in eval mode and its input shape without the batch; trained=True loads the shipped
    Fashion-MNIST checkpoint (data/checkpoints) where there is one."""
    torch.manual_seed(0)
    if name == "mlp4096":
        layers = []
        for i in range(4):
            layers += [nn.Linear(4096, 4096)] + ([nn.ReLU()] if i < 3 else [])
        return nn.Sequential(*layers).eval(), (4096,)
    model = vqlab.get_model(name, in_channels=1)
    path = vqlab.train.checkpoint_path(name, "fashion-mnist", CHECKPOINTS[name])
    if trained and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval(), (1, 28, 28)


def file_bytes(variant: str, model: nn.Module) -> int:
    """Bytes on disk: vqlab.save's .vqz for the VQ variants, torch.save of the state_dict for float and int8."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        if variant.startswith("VQ"):
            return vqlab.save(model, path + ".vqz")
        torch.save(model.state_dict(), path + ".pt")
        return os.path.getsize(path + ".pt")


def _layers_for(k: int, d: int):
    """Every layer but a convolution over one input channel (the CNNs' first: no d > 1 divides it) and a layer with
    fewer than K segments (LeNet-5's last, 840 weights, at K=256, d=4), so that VQ covers what int8 dynamic does
    (every nn.Linear, the last one included where K allows) and the convolutions."""
    def take(module: nn.Module, name: str) -> bool:
        one_channel = isinstance(module, nn.Conv2d) and module.in_channels // module.groups == 1
        return not one_channel and module.weight.numel() // d >= k
    return take


def variants(name: str, model: nn.Module) -> dict[str, nn.Module]:
    """Every variant of `model` (module docstring), in eval mode."""
    fast = {"init": "random", "iters": 2} if name == "mlp4096" else {}
    out = {"float": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["int8 dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                                      dtype=torch.qint8)
    for k, d in ((256, 4), (16, 2)):
        q = copy.deepcopy(model)
        vqlab.quantize_(q, VQConfig(k=k, d=d, seed=0, **fast), _layers_for(k, d), progress=False)
        out[f"VQ K={k} d={d}"] = q.eval()
    packed = copy.deepcopy(out["VQ K=16 d=2"])
    vqlab.pack_simd_(packed)
    out["VQ K=16 d=2 packed"] = packed.eval()
    return out


def overhead(rounds: int) -> dict[str, float]:
    """Microseconds per eval call of a small linear layer (120 -> 84, batch 1): float, VQ (auto), VQ packed."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(120, 84)).eval()
    vq = copy.deepcopy(lin)
    vqlab.quantize_(vq, VQConfig(k=16, d=2, seed=0), vqlab.all_layers, progress=False)
    packed = copy.deepcopy(vq)
    vqlab.pack_simd_(packed)
    x = torch.randn(1, 120)
    mods = {"float": lin, "VQ K=16 d=2": vq.eval(), "VQ K=16 d=2 packed": packed.eval()}
    with torch.no_grad():
        t = timings({n: (lambda m=m: m(x)) for n, m in mods.items()}, rounds, 0.2)
    return {n: statistics.median(v) * 1e6 for n, v in t.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=float, default=0.3, help="seconds per block of calls (default 0.3)")
    ap.add_argument("--accuracy", action="store_true",
                    help="load the shipped Fashion-MNIST checkpoints and add each variant's test accuracy "
                         "(post-training: k-means only, no fine-tuning) and file bytes")
    ap.add_argument("--csv", help="also write every row (and the CPU line) to this CSV file")
    args = ap.parse_args(argv)
    rows = []

    torch.set_num_threads(args.threads[0])
    print(cpu_line().replace(f"{args.threads[0]} torch threads of ", ""))
    print(f"vqlab {vqlab.__version__}, torch {torch.__version__}; rounds={args.rounds}, block={args.block}s; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("\n| model | batch | threads | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | "
          + " | ".join(f"{v} ×" for v in VARIANTS[1:]) + " |")
    print("|---|---|---|" + "---|" * (2 * len(VARIANTS) - 1))
    extra = {}
    for name in args.models:
        model, shape = build(name, args.accuracy)
        mods = variants(name, model)
        if args.accuracy and name != "mlp4096":
            test = vqlab.load_dataset("fashion-mnist", "test")
            torch.set_num_threads(max(args.threads))
            extra[name] = {v: (vqlab.evaluate(m, test), file_bytes(v, m)) for v, m in mods.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
                with torch.no_grad():
                    t = timings({v: (lambda m=mods[v]: m(x)) for v in VARIANTS}, args.rounds, args.block)
                base = statistics.median(t["float"])
                print(f"| {name} | {batch} | {threads} | " + " | ".join(fmt(t[v]).strip() for v in VARIANTS) + " | "
                      + " | ".join(f"{base / statistics.median(t[v]):.2f}" for v in VARIANTS[1:]) + " |",
                      flush=True)
                for v in VARIANTS:
                    acc, nbytes = extra.get(name, {}).get(v, (float("nan"), None))
                    rows.append({"model": name, "batch": batch, "threads": threads, "variant": v,
                                 "ms": statistics.median(t[v]) * 1e3, "ms_min": min(t[v]) * 1e3,
                                 "ms_max": max(t[v]) * 1e3, "speed_vs_float": base / statistics.median(t[v]),
                                 "accuracy": acc, "file_bytes": nbytes})
    if extra:
        print("\naccuracy (Fashion-MNIST test set, post-training) and file bytes:")
        for name, per in extra.items():
            print(f"  {name}: " + "; ".join(f"{v} {acc:.4f} / {nbytes:,} B" for v, (acc, nbytes) in per.items()))
    torch.set_num_threads(1)
    us = overhead(max(args.rounds, 5))
    print(f"\nper-call overhead, nn.Linear(120, 84) at batch 1, 1 thread: float {us['float']:.1f} us; "
          + "; ".join(f"{n} {us[n]:.1f} us (+{us[n] - us['float']:.1f})" for n in us if n != "float")
          + "  [target: within 20 us of float]")
    print(f"load average at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if args.csv:
        import pandas as pd
        df = pd.DataFrame(rows)
        for n, v in us.items():
            df.loc[len(df)] = {"model": "linear120x84", "batch": 1, "threads": 1, "variant": n, "ms": v / 1e3}
        df["cpu"] = cpu_line().split(",")[0]
        df["flags"] = cpu_line().split("vector flags: ")[-1]
        tmp = args.csv + ".tmp"
        df.to_csv(tmp, index=False)
        os.replace(tmp, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
