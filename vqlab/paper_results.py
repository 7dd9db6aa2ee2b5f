"""The papers' whole pipelines on ResNet-20, as stored full-mode runs, beside each paper's own claim.

`benchmarks/pipelines.py` appends every stage of every run to `data/tables/pipelines_resnet20.csv` and each
run's final stage to `pipelines_resnet20_final.csv`; this module reads them for the README, notebook 08 and 10:

    results_table()      one row per run: pipeline, setting, ratio counted and by file, Δ points, minutes,
                         the issue's target, whether it is met (`verdict`), the paper's claim
    to_markdown(df)      that table as markdown (what README.md holds between its markers)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .data import REPO_DATA_DIR

TABLES = REPO_DATA_DIR / "tables"
STAGES_CSV = TABLES / "pipelines_resnet20.csv"
FINAL_CSV = TABLES / "pipelines_resnet20_final.csv"

CLAIMS = {
    "choi": "47.1×, ResNet-32 / CIFAR-10 (pruning, dithered lattice, fine-tuning, universal coding)",
    "vqdnn": "> 20× (model size −95 %), VGG16 / ResNet / ViT on CIFAR-10, ImageNet, EuroSAT",
    "qaf": "lower error than CP + PTQ at the same rate",
    "gong": "16–24× at 1 % top-5 loss, ImageNet CNN (dense layers)",
    "vq4all": "> 16× with one universal codebook, ImageNet CNNs",
    "compress": "(vqlab's own recipe; Deep Compression 39× on MNIST)",
}
TARGETS = {"choi": "≥ 40×", "vqdnn": "≥ 20×", "qaf": "≥ 8×, ahead of CP + PTQ", "gong": "—",
           "vq4all": "≥ 16× over three networks", "compress": "≥ 64× counted, ≥ 56× by file"}
FILE_TARGET = {"choi": 40.0, "vqdnn": 20.0, "qaf": 8.0, "vq4all": 16.0, "compress": 56.0}   # by file, ≤ 1 point


def verdict(pipeline: str, file_ratio: float, delta_points: float) -> str:
    """'met', or by how much a run misses the target (its file ratio, and at most 1 point below float);
    '—' for a pipeline without a target."""
    goal = FILE_TARGET.get(pipeline)
    if goal is None:
        return "—"
    misses = []
    if file_ratio < goal:
        misses.append(f"ratio {goal / file_ratio:.1f}× short")
    if delta_points < -1.0:
        misses.append(f"{-1.0 - delta_points:.2f} points too low")
    return "met" if not misses else "missed: " + ", ".join(misses)


def describe(setting: dict, run: str = "") -> tuple[str, str]:
    """(pipeline, a one-line setting) from a run's stored setting (the JSON `benchmarks/pipelines.py` writes)."""
    p, text = _describe(setting, run)
    return p, text + (", distilled from the float model" if setting.get("distill") else "") + (
        f", {setting['store']} storage" if setting.get("store") else "") + (
        f", seed {setting['seed']}" if setting.get("seed") not in (None, 0) and p != "compress" else "")


def _describe(setting: dict, run: str) -> tuple[str, str]:
    s = setting
    p = s.get("pipeline", run.split("-")[0])
    if p == "choi":
        return p, f"{s['lattice']} Δ={s['step']:g}, prune {s['prune']:.0%}, {s['coder']}, " \
                  f"{s['prune_steps']} + {s['finetune_steps']} steps"
    if p == "vqdnn":
        return p, f"K={s['k']} d={s['d']} ({s['codebook']} codebook), {s['finetune_steps']} steps"
    if p == "qaf":
        return p, f"{s['algorithm']}, rank ratio {s['rank_ratio']:g}, {s['bits']} bits, {s['finetune_steps']} steps"
    if p == "gong":
        knobs = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("k", "d", "stages", "subspaces"))
        return p, f"{s['method']} {knobs}, {s['finetune_steps']} steps"
    if p == "vq4all":
        return p, f"K={s['k']} d={s['d']}, {s['rounds']} rounds × {s['steps_per_round']} steps" + (
            f", BatchNorm statistics re-estimated ({s['recalibrate_bn']} batches)" if s.get("recalibrate_bn") else "")
    grid = (f", K in {{{', '.join(map(str, s['ks']))}}}, d in {{{', '.join(map(str, s['ds']))}}}, "
            f"scan on {s['calib_size']} images" if s.get("ks") else "")
    seeds = s.get("seeds", [s.get("seed", "?")])
    return p, f"target {s.get('target', float('nan')):g}×, {s.get('epochs', '?')} epochs{grid}, " \
              f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def results_table(path: str | Path = FINAL_CSV) -> pd.DataFrame:
    """One row per stored run (its final stage): pipeline, setting, ratio (counted, ANS-coded indices and float16
    storage, as the file holds them), file_ratio, delta_points, accuracy, minutes (the whole run), target,
    verdict, claim."""
    rows = []
    for _, r in pd.read_csv(path).iterrows():
        p, setting = describe(json.loads(r["setting"]), r["run"])
        rows.append({"pipeline": p, "setting": setting, "ratio": r["ans_ratio"], "file_ratio": r["file_ratio"],
                     "delta_points": r["delta_points"], "accuracy": r["accuracy"],
                     "minutes": r["total_seconds"] / 60, "target": TARGETS.get(p, ""),
                     "verdict": verdict(p, r["file_ratio"], r["delta_points"]), "claim": CLAIMS.get(p, "")})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """`results_table()` as a markdown table."""
    lines = ["| pipeline | setting | ratio (counted) | ratio (file) | Δ points | minutes | target | vs target "
             "| the paper's claim |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['pipeline']} | {r['setting']} | {r['ratio']:.1f}× | {r['file_ratio']:.1f}× | "
                     f"{r['delta_points']:+.2f} | {r['minutes']:.0f} | {r['target']} | {r['verdict']} | {r['claim']} |")
    return "\n".join(lines)
