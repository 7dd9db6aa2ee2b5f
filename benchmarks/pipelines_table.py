"""The ResNet-20 pipeline results beside the papers' claims, as a markdown table (`vqlab.paper_results`).

    python benchmarks/pipelines_table.py            # prints the table of data/tables/pipelines_resnet20_final.csv
    python benchmarks/pipelines_table.py --readme   # rewrites it between README.md's markers
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from vqlab.paper_results import results_table, to_markdown

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


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        write_readme()
    else:
        print(to_markdown(results_table(*sys.argv[1:2])))
