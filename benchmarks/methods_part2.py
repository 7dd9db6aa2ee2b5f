"""Measure VQ4ALL and QAF on Fashion-MNIST (CPU, one thread); prints tables.

    python benchmarks/methods_part2.py [--part vq4all|qaf|all] [--rounds 4] [--steps 75] [--alpha 0.6]

VQ4ALL: LeNet-5 (10-epoch baseline), the small CNN and the tiny ViT (2-epoch baselines, trained on first use by
`vqlab.train_or_load`), one universal codebook (K=256, d=4: 2 index bits per weight) sampled from the KDE of all
three networks' sub-vectors; per network: float accuracy, nearest-codeword accuracy (alpha -> 0, no training),
accuracy after progressive network construction, and compressed_size of the three together (codebook once) and
with the codebook in ROM.  First conv / last linear stay float (quantize_'s default).
QAF: LeNet-5's conv2, fc1 and fc2 factorized at rank_ratio x bits, ADMM vs CP-ALS + PTQ, no fine-tuning:
mean relative reconstruction error of the factorized layers, accuracy, whole-model ratio, FLOPs.

Measured 2026-11-27 (CPU, 1 thread, shared machine; defaults):
VQ4ALL, K=256 d=4, candidates=4, alpha=0.6, 4 rounds x 75 steps of 64, lr 0.1 (ratios only trained):
       network  float_acc  nearest_acc  vq4all_acc  dense_bytes  bytes   ratio  bytes_rom  ratio_rom
        lenet5     0.9084       0.8373      0.8890       250232  24528 10.2019      20432    12.2471
           cnn     0.9208       0.8230      0.9085      1067976  73416 14.5469      73416    14.5469
      vit_tiny     0.8412       0.7865      0.8243       556072  64552  8.6143      64552     8.6143
total (3 nets)                                          1874280 162496 11.5343     158400    11.8326
(fixed fraction per round: lenet5 .136 .272 .385 1; cnn .025 .091 .168 1; vit_tiny .023 .119 .25 1)
QAF on LeNet-5 (iters 30):
  method  rank_ratio  bits  rel_error    acc  bytes   ratio   flops    ranks
   float              32     0.0000 0.9084 250232  1.0000 1071440
 qaf ptq      0.2500     3     0.9675 0.1240  11057 22.6311  553760 24/23/12
qaf admm      0.2500     3     0.6426 0.7535  11057 22.6311  553760 24/23/12
 qaf ptq      0.2500     4     0.6830 0.4576  12960 19.3080  553760 24/23/12
qaf admm      0.2500     4     0.5940 0.8418  12960 19.3080  553760 24/23/12
 qaf ptq      0.5000     3     0.8125 0.2674  17068 14.6609  783912 47/46/25
qaf admm      0.5000     3     0.4968 0.8006  17068 14.6609  783912 47/46/25
 qaf ptq      0.5000     4     0.5372 0.5004  20894 11.9763  783912 47/46/25
qaf admm      0.5000     4     0.4207 0.8578  20894 11.9763  783912 47/46/25
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

import vqlab
from vqlab.data import load_dataset
from vqlab.methods import qaf, vq4all
from vqlab.train import evaluate, train_or_load

NETS = [("lenet5", 10), ("cnn", 2), ("vit_tiny", 2)]


def _flops(model: torch.nn.Module) -> tuple[int, int]:
    df = vqlab.count_flops(model, (1, 1, 28, 28))
    return int(df["dense_flops"].sum()), int(df["vq_flops"].sum())


def run_vq4all(train, test, k: int, d: int, candidates: int, alpha: float, rounds: int, steps: int, lr: float,
               batch_size: int) -> None:
    floats = {name: train_or_load(name, "fashion-mnist", epochs=e, progress=False)[0] for name, e in NETS}
    t0 = time.perf_counter()
    book = vq4all.universal_codebook(list(floats.values()), k=k, d=d, seed=0)
    print(f"universal codebook K={k} d={d}: {len(vq4all.pooled_subvectors(list(floats.values()), d))} pooled "
          f"sub-vectors, Scott bandwidth {vq4all.kde_bandwidth(len(vq4all.pooled_subvectors(list(floats.values()), d)), d):.3f}")
    rows, built = [], []
    for name, model in floats.items():
        acc_float = evaluate(model, test)
        nearest = copy.deepcopy(model)
        vqlab.quantize_(nearest, vq4all.VQ4ALLConfig(codebook=book, candidates=candidates, alpha=alpha), progress=False)
        vq4all.fix_assignments(nearest, alpha=0.0)
        vq4all.finalize(nearest)
        acc_nearest = evaluate(nearest, test)
        m = copy.deepcopy(model)
        vqlab.quantize_(m, vq4all.VQ4ALLConfig(codebook=book, candidates=candidates, alpha=alpha), progress=False)
        t = time.perf_counter()
        hist = vq4all.progressive_fit(m, train, rounds=rounds, steps_per_round=steps, lr=lr,
                                       batch_size=batch_size, progress=False)
        vq4all.finalize(m)
        acc = evaluate(m, test)
        built.append(m)
        print(f"  {name}: rounds {len(hist)}, fixed fraction per round {hist['fixed_fraction'].round(3).tolist()}, "
              f"{time.perf_counter() - t:.0f}s")
        rows.append({"network": name, "float_acc": acc_float, "nearest_acc": acc_nearest, "vq4all_acc": acc})
    size = vqlab.compressed_size(built)
    rom = vqlab.compressed_size(built, codebook_in_rom=True)
    per, per_rom = size.per_model, rom.per_model
    for i, r in enumerate(rows):
        r.update(dense_bytes=int(per.loc[i, "dense_bytes"]), bytes=int(per.loc[i, "compressed_bytes"]),
                 ratio=float(per.loc[i, "ratio"]), bytes_rom=int(per_rom.loc[i, "compressed_bytes"]),
                 ratio_rom=float(per_rom.loc[i, "ratio"]))
    rows.append({"network": "total (3 nets)", "dense_bytes": size.dense_bytes, "bytes": size.compressed_bytes,
                 "ratio": size.ratio, "bytes_rom": rom.compressed_bytes, "ratio_rom": rom.ratio})
    print(f"\nVQ4ALL, candidates={candidates}, alpha={alpha}, {rounds} rounds x {steps} steps of {batch_size}, lr {lr} "
          f"(codebook {size.codebook_bytes} B counted once; in ROM: not counted); {time.perf_counter() - t0:.0f}s")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def run_qaf(test, ratios: list[float], bits_list: list[int], iters: int) -> None:
    base, _ = train_or_load("lenet5", "fashion-mnist", epochs=10, progress=False)
    dense_flops, _ = _flops(base)
    rows = [{"method": "float", "rank_ratio": None, "bits": 32, "rel_error": 0.0, "acc": evaluate(base, test),
             "bytes": vqlab.compressed_size(base).compressed_bytes, "ratio": 1.0, "flops": dense_flops}]
    for ratio in ratios:
        for bits in bits_list:
            for method in ("ptq", "admm"):
                m = copy.deepcopy(base)
                t = time.perf_counter()
                vqlab.quantize_(m, qaf.QAFConfig(rank_ratio=ratio, bits=bits, method=method, iters=iters), progress=False)
                codes = [mod for mod in m.modules() if isinstance(mod, qaf.QAFCode)]
                size = vqlab.compressed_size(m)
                rows.append({"method": f"qaf {method}", "rank_ratio": ratio, "bits": bits,
                             "ranks": "/".join(str(c.rank) for c in codes),
                             "rel_error": sum(c.rel_error for c in codes) / len(codes), "acc": evaluate(m, test),
                             "bytes": size.compressed_bytes, "ratio": size.ratio, "flops": _flops(m)[1],
                             "seconds": time.perf_counter() - t})
    print("\nQAF on LeNet-5 / Fashion-MNIST (conv2, fc1, fc2 factorized; no fine-tuning; rel_error = mean over them)")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["vq4all", "qaf", "all"], default="all")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--admm-iters", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    if args.part in ("qaf", "all"):
        run_qaf(test, [0.25, 0.5], [3, 4], args.admm_iters)
    if args.part in ("vq4all", "all"):
        run_vq4all(train, test, 256, 4, args.candidates, args.alpha, args.rounds, args.steps, args.lr,
                   args.batch)


if __name__ == "__main__":
    main()
