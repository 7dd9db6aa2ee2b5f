"""The figures a notebook's prose quotes, from the run that produced its outputs.

A markdown cell quotes a measured number by writing it followed by a hidden marker naming it:

    K=256, d=4 gives **7.6<!--{{ratio_k256_d4}}-->×** smaller ...       (rendered: "7.6×"; the marker is invisible)
    ... as notebook 02 measured (12.0<!--{{02:ratio_k16_d2}}-->×)      (another notebook's figure: NN: prefix)

and a code cell near the end states what this run measured, formatted as the prose prints it:

    claims(ratio_k256_d4=f"{qsize.ratio:.1f}", ...)

which displays a small table (the reader sees which number is which) and stores the values as JSON in the
cell's output (`MIME`).  `tests/test_notebook_claims.py` reads the stored notebooks (no execution) and checks
that every marked number in a notebook's markdown, and in the README's notebook table, equals the stored value
it names: a re-run that moves a figure fails the test until the prose follows.  In fast mode the table shows
the fast run's values; only the stored (full-mode) outputs are checked.
"""
from __future__ import annotations

import html
import re

__all__ = ["claims", "Claims", "MIME", "MARKER", "normalize"]

MIME = "application/vnd.vqlab.claims+json"
# a quoted value (a number, 1.7e-03, a layer name, ...) followed by its marker; NN: names another notebook
MARKER = re.compile(r"(?P<value>[+\-−]?[\w.,]*\w(?:[eE][+\-−]\d+)?)(?P<deco>[`*]*)<!--\{\{(?:(?P<nb>\d\d):)?(?P<key>[\w.\-]+)\}\}-->")


def normalize(value: str) -> str:
    """The form two quotes of one figure are compared in: unicode minus as '-', no spaces or decoration."""
    return str(value).replace("−", "-").replace("\u2009", "").replace(" ", "").strip("`*")


class Claims:
    """What `claims(**values)` returns: displays as an HTML table and carries the values under `MIME`."""

    def __init__(self, values: dict[str, str]):
        self.values = {k: str(v) for k, v in values.items()}

    def _repr_mimebundle_(self, include=None, exclude=None):
        rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v)}</td></tr>"
                       for k, v in self.values.items())
        table = ("<table><thead><tr><th>figure quoted in the text</th><th>this run</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table>")
        plain = "\n".join(f"{k}: {v}" for k, v in self.values.items())
        return {"text/html": table, "text/plain": plain, MIME: dict(self.values)}

    def __repr__(self) -> str:
        return f"Claims({self.values})"


def claims(**values) -> Claims:
    """The figures this notebook's prose quotes, by marker name, formatted as the prose writes them
    (strings; a missing figure, e.g. a grid point fast mode skips, as "n/a").  Display it (last line of a cell)."""
    for key in values:
        if not re.fullmatch(r"[\w.\-]+", key):
            raise ValueError(f"claim names are letters, digits, '_', '.', '-': got {key!r}")
    return Claims(values)
