"""The ResNet-20 pipeline results beside the papers' claims, as a markdown table (`vqlab.paper_results`).

    python benchmarks/pipelines_table.py            # prints the table of data/tables/pipelines_resnet20_final.csv
    python benchmarks/pipelines_table.py --readme   # rewrites it between README.md's markers
    python benchmarks/pipelines_table.py --resave   # re-saves each run's model (runs/<run>.vqz, kept by
                                                    # benchmarks/pipelines.py) in today's file format and stores
                                                    # the new file sizes in both tables
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

import vqlab
from vqlab.paper_results import FINAL_CSV, STAGES_CSV, results_table, to_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- pipelines-table: benchmarks/pipelines_table.py --readme -->", "<!-- /pipelines-table -->"


def readme_block(text: str) -> str:
    """The table between README.md's markers (ValueError when they are missing)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write_readme(path: Path = README) -> None:
    """Replace README.md's table block by today's table (a temp file, then os.replace)."""
    text = path.read_text()
    readme_block(text)
    head, rest = text.split(BEGIN, 1)
    new = f"{head}{BEGIN}\n{to_markdown(results_table())}\n{END}{rest.split(END, 1)[1]}"
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv")
    os.close(fd)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def resave(runs: Path = README.parent / "runs") -> list[tuple[str, int, int]]:
    """Every run whose model file is in `runs/`: load it, save it again (float16, or bfloat16 where a value
    exceeds float16's range; ANS-coded indices; today's format) into a temporary file and put that file's size and ratio into its final rows of both tables.
    returns [(run, old bytes, new bytes)]."""
    final, stages = pd.read_csv(FINAL_CSV), pd.read_csv(STAGES_CSV)
    done = []
    for i, r in final.iterrows():
        path = runs / f"{r['run']}.vqz"
        if not path.exists() or pd.isna(r["file_bytes"]):
            continue
        model = vqlab.load(path)
        with tempfile.TemporaryDirectory() as d:
            try:
                new = vqlab.save(model, os.path.join(d, "m.vqz"), store_dtype="float16", index_coding="ans")
            except ValueError:           # beyond float16's range: the run stored bfloat16 (same size), as here
                new = vqlab.save(model, os.path.join(d, "m.vqz"), store_dtype="bfloat16", index_coding="ans")
        dense = r["file_ratio"] * r["file_bytes"]
        for df, rows in ((final, [i]), (stages, stages.index[(stages["run"] == r["run"]) & (stages["stage"] == r["stage"])
                                                              & (stages["file_bytes"] == r["file_bytes"])])):
            df.loc[rows, "file_ratio"] = dense / new
            df.loc[rows, "file_bytes"] = new
        done.append((r["run"], int(r["file_bytes"]), new))
    _write_csv(final, FINAL_CSV)
    _write_csv(stages, STAGES_CSV)
    return done


if __name__ == "__main__":
    if sys.argv[1:] == ["--resave"]:
        for run, old, new in resave():
            print(f"{run}: {old} -> {new} bytes")
    elif sys.argv[1:] == ["--readme"]:
        write_readme()
    else:
        print(to_markdown(results_table(*sys.argv[1:2])))
