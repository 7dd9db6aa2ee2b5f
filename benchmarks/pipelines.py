"""Run the papers' pipelines (`vqlab.pipelines`) on the ResNet-20 / Fashion-MNIST baseline and record every run.

    python benchmarks/pipelines.py choi --lattice Z --step 0.02 --prune 0.6 --seed 0
    python benchmarks/pipelines.py vqdnn --k 256 --d 8 --codebook shared --seed 0
    python benchmarks/pipelines.py compress --target 64 --seed 0
    python benchmarks/pipelines.py qaf --algorithm admm --rank-ratio 0.25 --bits 4
    python benchmarks/pipelines.py gong --method rvq --k 16 -d 4 --stages 2 --finetune-steps 500
    python benchmarks/pipelines.py vq4all --k 256 -d 4 --rounds 10 --steps-per-round 200   # ResNet-20 + CNN + LeNet-5

Each run appends its stages (one row per stage, with the setting and the wall time) to
data/tables/pipelines_resnet20.csv and its final row to data/tables/pipelines_resnet20_final.csv, and saves the
compressed model under runs/ (not committed).  Long: minutes to an hour on 2 CPU cores; CI never runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

import vqlab
from vqlab import pipelines
from vqlab.recipes import DEFAULT_D, DEFAULT_K, default_methods

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "data" / "tables"
MODEL, DATASET, EPOCHS = "resnet20", "fashion-mnist", 30


def baseline():
    model, meta = vqlab.train_or_load(MODEL, DATASET, epochs=EPOCHS, progress=False)
    return model.eval(), meta


def _append(df: pd.DataFrame, path: Path) -> None:
    """Add df's rows to the CSV at path, its columns in the file's order (a new column: the file rewritten with it
    at the end), through a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = pd.read_csv(path)
        df = pd.concat([old, df[[c for c in old.columns if c in df.columns] + [c for c in df.columns
                                                                               if c not in old.columns]]])
    tmp = path.with_suffix(".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", choices=["choi", "vqdnn", "compress", "qaf", "gong", "vq4all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lattice", default="Z")
    p.add_argument("--step", type=float, default=0.02)
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--coder", default="lzma")
    p.add_argument("--prune-steps", type=int, default=1000)
    p.add_argument("--finetune-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("-d", type=int, default=8)
    p.add_argument("--codebook", default="shared")
    p.add_argument("--reassign-every", type=int, default=0)
    p.add_argument("--target", type=float, default=64.0)
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="compress: several seeds in one process, the sensitivity table measured once")
    p.add_argument("--algorithm", default="admm")
    p.add_argument("--rank-ratio", type=float, default=0.25)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--method", default="rvq", choices=["scalar", "pq", "rvq", "binary"])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--subspaces", type=int, default=4)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--ks", type=int, nargs="*", default=None,
                   help="compress: the codebook sizes each layer may take (default: recipes.DEFAULT_K)")
    p.add_argument("--ds", type=int, nargs="*", default=None,
                   help="compress: the segment lengths each layer may take (default: recipes.DEFAULT_D)")
    p.add_argument("--calib-size", type=int, default=2048, help="compress: training images the scan scores on")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--distill", action="store_true", help="fine-tune from the float model's soft targets too")
    p.add_argument("--recalibrate-bn", type=int, default=0,
                   help="vq4all: re-estimate BatchNorm statistics from this many batches after the last round")
    p.add_argument("--store", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="the float dtype files store (bfloat16: float16's size with float32's range)")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train, test = vqlab.load_dataset(DATASET, "train"), vqlab.load_dataset(DATASET, "test")
    model, meta = baseline()
    t0 = time.perf_counter()
    if a.pipeline == "choi":
        q, rep = pipelines.choi(model, train, test, lattice=a.lattice, step=a.step, prune=a.prune, coder=a.coder,
                                prune_steps=a.prune_steps, finetune_steps=a.finetune_steps, lr=a.lr, seed=a.seed)
        stages, setting = rep.stages, rep.setting
    elif a.pipeline == "vqdnn":
        q, rep = pipelines.vqdnn(model, train, test, k=a.k, d=a.d, codebook=a.codebook,
                                 finetune_steps=a.finetune_steps, reassign_every=a.reassign_every, lr=a.lr,
                                 seed=a.seed, distill=a.distill)
        stages, setting = rep.stages, rep.setting
    elif a.pipeline == "qaf":
        q, rep = pipelines.qaf(model, train, test, rank_ratio=a.rank_ratio, bits=a.bits, algorithm=a.algorithm,
                               iters=a.iters, finetune_steps=a.finetune_steps, lr=a.lr, seed=a.seed,
                               distill=a.distill, store_dtype=a.store)
        stages, setting = rep.stages, rep.setting
    elif a.pipeline == "gong":
        import vqlab.methods.gong as gong
        config = {"scalar": lambda: gong.ScalarConfig(k=a.k, seed=a.seed),
                  "pq": lambda: gong.PQConfig(k=a.k, subspaces=a.subspaces, seed=a.seed),
                  "rvq": lambda: gong.RVQConfig(k=a.k, stages=a.stages, d=a.d, seed=a.seed),
                  "binary": gong.BinaryConfig}[a.method]()
        q, rep = pipelines.gong(model, config, train, test, finetune_steps=a.finetune_steps, lr=a.lr, seed=a.seed,
                                distill=a.distill)
        stages, setting = rep.stages, rep.setting
    elif a.pipeline == "vq4all":
        cnn, _ = vqlab.train_or_load("cnn", DATASET, epochs=2, progress=False)
        lenet, _ = vqlab.train_or_load("lenet5", DATASET, epochs=10, progress=False)
        nets, rep = pipelines.vq4all([model, cnn.eval(), lenet.eval()], [train] * 3, [test] * 3, k=a.k, d=a.d,
                                     candidates=a.candidates, alpha=a.alpha, rounds=a.rounds,
                                     steps_per_round=a.steps_per_round, seed=a.seed, distill=a.distill,
                                     recalibrate_bn=a.recalibrate_bn)
        q, stages, setting = nets, rep.stages, rep.setting
    else:
        rows, sens = [], None
        grid = {"ks": tuple(a.ks or DEFAULT_K), "ds": tuple(a.ds or DEFAULT_D)}
        methods = None if not (a.ks or a.ds) else lambda layer: default_methods(layer, **grid)
        for seed in a.seeds or [a.seed]:
            t1 = time.perf_counter()
            q, report = vqlab.compress(model, train, target_ratio=a.target, val_ds=test, epochs=a.epochs, seed=seed,
                                       sensitivity=sens, methods=methods, calib_size=a.calib_size)
            sens = report.candidates
            row = pipelines.measure(q, test, stage=f"compress seed {seed}", what=f"target {a.target:g}x",
                                    float_accuracy=report.float_accuracy, seconds=time.perf_counter() - t1)
            assert abs(row["accuracy"] - report.accuracy) < 1e-6
            rows.append(row)
        stages = pd.DataFrame(rows)
        setting = {"pipeline": "compress", "target": a.target, "epochs": a.epochs, "seeds": a.seeds or [a.seed]}
        if methods is not None or a.calib_size != 2048:
            setting.update(ks=list(grid["ks"]), ds=list(grid["ds"]), calib_size=a.calib_size)
    seconds = time.perf_counter() - t0
    run = f"{a.pipeline}-{a.tag or int(time.time())}"
    if a.store != "float16":
        setting = {**setting, "store": a.store}
    stages = stages.assign(run=run, setting=json.dumps(setting), total_seconds=seconds,
                           float_acc=meta["test_acc"])
    if a.pipeline == "compress":                  # one row per seed, each naming its own
        stages["setting"] = [json.dumps({**setting, "seeds": [seed]}) for seed in setting["seeds"]]
    _append(stages, RESULTS / "pipelines_resnet20.csv")
    final = (stages if a.pipeline == "compress" else
             stages[stages["stage"] == "all"] if a.pipeline == "vq4all" else stages.tail(1))   # vq4all: the file
    _append(final, RESULTS / "pipelines_resnet20_final.csv")
    os.makedirs(ROOT / "runs", exist_ok=True)
    vqlab.save(q, ROOT / "runs" / f"{run}.vqz", store_dtype=a.store, index_coding="ans")
    print(stages.drop(columns=["setting"]).round(4).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
