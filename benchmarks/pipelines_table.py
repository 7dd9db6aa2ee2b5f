"""The ResNet-20 pipeline results beside the papers' claims, as a markdown table (for README.md and notebook 08).

    python benchmarks/pipelines_table.py            # reads data/tables/pipelines_resnet20_final.csv

Each row: the pipeline and its setting, the whole-model ratio counted by `compressed_size` (ANS-coded indices and
floats stored as float16, as the file holds them) and of the saved file, the accuracy change on the full test set,
the wall time of the run, and the seed paper's own claim and setting.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FINAL = ROOT / "data" / "tables" / "pipelines_resnet20_final.csv"

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


def _setting(row: pd.Series) -> tuple[str, str]:
    s = json.loads(row["setting"])
    p = s.get("pipeline", row["run"].split("-")[0])
    if p == "choi":
        return p, f"{s['lattice']} Δ={s['step']:g}, prune {s['prune']:.0%}, {s['coder']}, {s['finetune_steps']} steps"
    if p == "vqdnn":
        return p, f"K={s['k']} d={s['d']} ({s['codebook']} codebook), {s['finetune_steps']} steps"
    if p == "qaf":
        return p, f"{s['algorithm']}, rank ratio {s['rank_ratio']:g}, {s['bits']} bits, {s['finetune_steps']} steps"
    if p == "gong":
        return p, f"{s['method']} {', '.join(f'{k}={v}' for k, v in s.items() if k in ('k', 'd', 'stages', 'subspaces'))}" \
                  f", {s['finetune_steps']} steps"
    if p == "vq4all":
        return p, f"K={s['k']} d={s['d']}, {s['rounds']} rounds × {s['steps_per_round']} steps"
    return p, f"target {s.get('target', '?'):g}×, {s.get('epochs', '?')} epochs"


def table(path: Path = FINAL) -> pd.DataFrame:
    df = pd.read_csv(path)
    rows = []
    for _, r in df.iterrows():
        p, setting = _setting(r)
        rows.append({"pipeline": p, "setting": setting, "stage": r["stage"], "ratio": r["ans_ratio"],
                     "file_ratio": r["file_ratio"], "delta_points": r["delta_points"], "accuracy": r["accuracy"],
                     "minutes": r["total_seconds"] / 60, "target": TARGETS.get(p, ""), "claim": CLAIMS.get(p, "")})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    lines = ["| pipeline | setting | ratio (counted) | ratio (file) | Δ points | minutes | target | the paper's claim |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['pipeline']} | {r['setting']} | {r['ratio']:.1f}× | {r['file_ratio']:.1f}× | "
                     f"{r['delta_points']:+.2f} | {r['minutes']:.0f} | {r['target']} | {r['claim']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table(Path(sys.argv[1]) if len(sys.argv) > 1 else FINAL)))
