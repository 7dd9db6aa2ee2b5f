"""The notebooks teach what they show (issue 28): read the stored notebooks as JSON -- nothing is executed.

- Every figure a notebook's markdown quotes with a marker (`7.6<!--{{key}}-->`, see `vqlab.claims`) equals the
  value the notebook's `claims(...)` output stored under that key; `<!--{{02:key}}-->` names notebook 02's value.
  The README's notebook table is held to the same rule (its markers always name the notebook).
- Markdown states measured figures only through markers: a number with a decimal point followed by "×", "%" or
  "points" must carry a marker, or `<!--cited-->` when it is a paper's figure or a formula's, not this run's.
- Nothing links outside the repository; every paper a notebook names is linked where its method appears.
- Every notebook in scope has a fill-in exercise: a cell tagged `fill-in` whose stub raises NotImplementedError,
  followed by a cell tagged `check` calling `vqlab.exercises.check`, a stated laptop runtime, and a solution
  notebook in notebooks/solutions/ holding the same check cells, without the stub.
- Slider panels are stored with a static picture of their first render (`Panel.show()`), so the web view shows
  them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vqlab.claims import MARKER, MIME, normalize

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
IN_SCOPE = ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]
# Notebooks whose prose is marked but whose full-mode outputs have not been re-run on the current code yet (issue 28,
# left for a longer run): their markers cannot be checked -- their stored outputs hold no claims(...) table.
# test_pending_notebooks_are_really_pending fails as soon as one is re-run, so this list cannot go stale.
PENDING_RERUN = set()
UNMARKED = re.compile(r"(?<![\w.])[+\-−]?\d+\.\d+\s?(?:×|%|points?\b)")


def _nb(prefix: str, folder: Path = NOTEBOOKS) -> dict:
    paths = sorted(folder.glob(f"{prefix}_*.ipynb"))
    assert len(paths) == 1, f"one notebook {prefix}_*.ipynb in {folder}, found {paths}"
    return json.loads(paths[0].read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _markdown(nb: dict) -> list[tuple[int, str]]:
    return [(i, _source(c)) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"]


def _stored_claims(nb: dict) -> dict[str, str]:
    out = {}
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            out.update(o.get("data", {}).get(MIME, {}))
    return out


def _all_claims() -> dict[str, dict[str, str]]:
    return {p.name[:2]: _stored_claims(json.loads(p.read_text())) for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def _check_markers(text: str, where: str, own: str | None, stored: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    for m in MARKER.finditer(text):
        nb = m["nb"] or own
        if nb is None:
            problems.append(f"{where}: marker {m['key']!r} must name its notebook (<!--{{{{NN:key}}}}-->)")
            continue
        if nb in PENDING_RERUN:
            continue
        values = stored.get(nb, {})
        if m["key"] not in values:
            problems.append(f"{where}: {m['value']!r} quotes {nb}:{m['key']}, which notebook {nb}'s stored claims "
                            f"output does not hold (it has {sorted(values)})")
        elif normalize(m["value"]) != normalize(values[m["key"]]):
            problems.append(f"{where}: the text says {m['value']} for {nb}:{m['key']}, the stored output "
                            f"{values[m['key']]}")
    return problems


def test_pending_notebooks_are_really_pending():
    stored = _all_claims()
    rerun = sorted(nb for nb in PENDING_RERUN if stored.get(nb))
    assert not rerun, f"notebooks {rerun} store a claims(...) output now: remove them from PENDING_RERUN"


@pytest.mark.parametrize("prefix", sorted(set(IN_SCOPE) - PENDING_RERUN))
def test_every_marked_figure_equals_its_stored_output(prefix):
    nb, stored = _nb(prefix), _all_claims()
    assert stored[prefix], f"notebook {prefix} stores no claims(...) output"
    problems = [p for i, text in _markdown(nb) for p in _check_markers(text, f"{prefix} cell {i}", prefix, stored)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("prefix", IN_SCOPE)
def test_measured_figures_in_markdown_carry_a_marker(prefix):
    problems = []
    for i, text in _markdown(_nb(prefix)):
        for line in text.splitlines():
            for m in UNMARKED.finditer(line):
                rest = line[m.end():m.end() + 16]
                # a marked figure has its marker right after the number, before the unit
                if "<!--" not in line[m.start():m.end() + 2] and not rest.lstrip().startswith("<!--cited-->"):
                    problems.append(f"{prefix} cell {i}: {m.group(0)!r} in {line.strip()[:120]!r}")
    assert not problems, ("figures without a marker (add <!--{{key}}--> after the number and the key to the "
                          "notebook's claims(...), or <!--cited--> after a paper's figure):\n" + "\n".join(problems))


def test_readme_notebook_table_equals_the_notebooks():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## The notebooks"):readme.index("### The methods on one baseline")]
    stored = _all_claims()
    problems = _check_markers(readme.replace(table, ""), "README (outside the table)", None, stored)
    for line in table.splitlines():
        m = re.match(r"\| `(\d\d)_", line)
        if not m or m.group(1) not in IN_SCOPE or m.group(1) in PENDING_RERUN:
            continue
        headline = line.rsplit("|", 2)[-2]
        problems += _check_markers(headline, f"README row {m.group(1)}", None, stored)
        for u in UNMARKED.finditer(headline):
            if "<!--" not in headline[u.start():u.end() + 2]:
                problems.append(f"README row {m.group(1)}: {u.group(0)!r} has no marker")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("prefix", IN_SCOPE)
def test_no_link_leaves_the_repository(prefix):
    nb = _nb(prefix)
    for i, text in _markdown(nb):
        for target in re.findall(r"\]\(([^)\s]+)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            resolved = (NOTEBOOKS / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{prefix} cell {i} links {target}"


PAPERS = {"01": ["1412.6115", "NmaXXAiJJC"], "02": ["NmaXXAiJJC"], "04": ["1412.6115"], "05": ["1802.02271"],
          "06": ["2412.06875"], "07": ["2308.04595"],
          "08": ["NmaXXAiJJC", "1412.6115", "1802.02271", "2412.06875", "2308.04595"], "09": ["1811.08886", "1905.03696", "1503.02531"], "10": ["1802.02271"]}


@pytest.mark.parametrize("prefix", sorted(PAPERS))
def test_papers_are_linked_where_their_method_appears(prefix):
    text = "\n".join(t for _, t in _markdown(_nb(prefix)))
    missing = [p for p in PAPERS[prefix] if p not in text]
    assert not missing, f"notebook {prefix} does not link {missing}"


def _tagged(nb: dict, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb["cells"]) if tag in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("prefix", IN_SCOPE)
def test_fill_in_exercises_have_a_check_a_runtime_and_a_solution(prefix):
    nb, sol = _nb(prefix), _nb(prefix, SOLUTIONS)
    fills, checks = _tagged(nb, "fill-in"), _tagged(nb, "check")
    assert fills, f"notebook {prefix} has no cell tagged fill-in"
    assert [i + 1 for i in fills] == checks, f"{prefix}: every fill-in cell is followed by its check cell"
    for i in fills:
        src = _source(nb["cells"][i])
        assert "raise NotImplementedError" in src, f"{prefix} cell {i}: the stub raises NotImplementedError"
        runtime = _source(nb["cells"][i - 1])
        assert nb["cells"][i - 1]["cell_type"] == "markdown" and "laptop CPU" in runtime, \
            f"{prefix} cell {i - 1}: the exercise states its runtime on a laptop CPU"
    for i in checks:
        assert "check(" in _source(nb["cells"][i])
    nb_checks = [_source(nb["cells"][i]) for i in checks]
    sol_checks = [_source(sol["cells"][i]) for i in _tagged(sol, "check")]
    assert nb_checks == sol_checks, f"{prefix}: the solution notebook holds the same check cells"
    for i in _tagged(sol, "fill-in"):
        assert "raise NotImplementedError" not in _source(sol["cells"][i]), f"solution {prefix} cell {i} is a stub"
    exercises = [t for _, t in _markdown(nb) if t.lstrip().startswith("### Exercises") or "## Exercises" in t]
    assert exercises, f"{prefix}: an Exercises section"
    for text in exercises:
        items = re.findall(r"^\d+\. .*(?:\n(?!\d+\. ).*)*", text, re.M)
        for item in items:
            assert "laptop CPU" in item, f"{prefix}: exercise without a runtime: {item[:100]!r}"


@pytest.mark.parametrize("prefix", IN_SCOPE)
def test_slider_panels_store_a_static_picture(prefix):
    nb = _nb(prefix)
    for i, c in enumerate(nb["cells"]):
        outs = c.get("outputs", [])
        if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs):
            assert any("image/png" in o.get("data", {}) for o in outs), \
                f"{prefix} cell {i}: a widget without a static picture beside it (Panel.show())"
