"""Every notebook runs cleanly in JupyterLab in a real browser, and its vqlab widget panels respond.

For each notebook in notebooks/ (or $VQLAB_UI_NOTEBOOKS): open it in JupyterLab, run all cells, wait for
every code cell to have run and the kernel to be idle, then assert no error output (cell output models
and page text) and that every widget rendered. For each vqlab widget panel, move every slider (the K/d panels:
"K" and then "d"; the method panels: each knob) one step and assert that its readout text and its plot image both change and that the readout
names the new value. Screenshots go to test-artifacts/ui/.

Widget panel contract (what vqlab.widgets builds and this test drives):
  - an ipywidgets VBox with CSS class `vqlab-panel`, containing
  - sliders (IntSlider or SelectionSlider), each described by its knob's name ("K", "d", "stages", ...),
  - an HTML widget with class `vqlab-readout` whose text names every slider's value as `<name>=<value>`
    and holds the figures (e.g. "K=256, d=4: 15.8× smaller, acc 0.897"),
  - an Output widget with class `vqlab-plot` that shows one matplotlib PNG (an `<img>`), redrawn when
    K or d change.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from ui_paths import ARTIFACTS, NOTEBOOK_DIR

pytestmark = pytest.mark.ui

NOTEBOOK_TIMEOUT_S = 600          # run all cells of one notebook (02 in fast mode took > 300 s in the browser once)
WIDGET_RENDER_TIMEOUT_S = 60      # widget views appear after the kernel went idle
SLIDER_TIMEOUT_S = 120            # kernel recomputes after one slider move
IDLE_GRACE_S = 10                 # after a slider move, kernel idle this long with no change = failure
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
BAD_WIDGET_TEXT = (
    "Error displaying widget",
    "Loading widget...",
    "model not found",
    "Failed to load model class",
    "A Jupyter widget could not be displayed",
    "No renderer could be found",
)


def _notebook_params() -> list:
    found = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not found:
        return [pytest.param(None, id="no-notebooks",
                             marks=pytest.mark.skip(reason=f"no notebooks in {NOTEBOOK_DIR}"))]
    return [pytest.param(p, id=p.name) for p in found]


def _uses_widgets(path: Path) -> bool:
    """True when a code cell of the notebook mentions vqlab.widgets."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    return any(c.cell_type == "code" and "vqlab.widgets" in c.source for c in nb.cells)


# --- JupyterLab, driven through window.jupyterapp (server runs with expose_app_in_browser) -------------

_JS_PANEL = "window.jupyterapp.shell.currentWidget"

_JS_OPEN_READY = """async (path) => {
  const app = window.jupyterapp;
  await app.started; await app.restored;
  const panel = app.shell.currentWidget;
  if (!panel || !panel.context || panel.context.path !== path) return 'current widget is ' + (panel && panel.title.label);
  await panel.context.ready; await panel.sessionContext.ready;
  if (app.shell.collapseLeft) app.shell.collapseLeft();  // more room for the notebook in screenshots
  return 'ok';
}"""

# Record every error the kernel publishes, also those outside a cell (an exception in a widget callback
# is published with the comm message as parent; JupyterLab only shows it in its log console).
_JS_HOOK_IOPUB = f"""() => {{
  window.__vqlabKernelErrors = [];
  {_JS_PANEL}.sessionContext.iopubMessage.connect((_, msg) => {{
    if (msg.header.msg_type !== 'error') return;
    const tb = (msg.content.traceback || []).join('\\n').replace(/\\x1b\\[[0-9;]*m/g, '');
    window.__vqlabKernelErrors.push({{ename: msg.content.ename, evalue: msg.content.evalue,
      parent: msg.parent_header?.msg_type ?? '', traceback: tb.split('\\n').slice(-12).join('\\n')}});
  }});
}}"""

_JS_KERNEL_ERRORS = "() => window.__vqlabKernelErrors || []"

_JS_KERNEL_STATUS = f"""() => {{
  const k = {_JS_PANEL}.sessionContext.session?.kernel;
  return k ? k.status : 'no kernel';
}}"""

_JS_RUN_ALL = f"""async () => {{
  const app = window.jupyterapp;
  await app.commands.execute('notebook:clear-all-cell-outputs');
  window.__vqlabRunAll = {{done: false, result: null, error: null}};
  app.commands.execute('notebook:run-all-cells').then(
    r => {{ window.__vqlabRunAll.done = true; window.__vqlabRunAll.result = r; }},
    e => {{ window.__vqlabRunAll.done = true; window.__vqlabRunAll.error = String(e); }});
}}"""

# Finished when run-all resolved (JupyterLab resolves it after the last reply; it stops at the first error
# outside a `raises-exception` cell) and the kernel is idle, or dead.
_JS_RUN_FINISHED = f"""() => {{
  const status = ({_JS_KERNEL_STATUS})();
  return !!window.__vqlabRunAll?.done && ['idle', 'dead', 'no kernel'].includes(status);
}}"""

_JS_CELLS = f"""() => {{
  const panel = {_JS_PANEL};
  const cells = panel.content.model.cells;
  const nodes = panel.content.widgets;
  const out = [];
  for (let i = 0; i < cells.length; i++) {{
    const c = cells.get(i);
    const node = nodes[i].node;
    out.push({{
      index: i, type: c.type, source: c.sharedModel.getSource(),
      tags: c.sharedModel.getMetadata()?.tags ?? [],
      executionCount: c.type === 'code' ? c.executionCount : null,
      outputs: c.type === 'code' ? c.outputs.toJSON() : [],
      renderedWidgets: node.querySelectorAll('.jp-OutputArea .jupyter-widgets').length,
      text: node.querySelector('.jp-Cell-outputWrapper')?.textContent ?? '',
    }});
  }}
  return {{cells: out, runAll: window.__vqlabRunAll, kernel: ({_JS_KERNEL_STATUS})()}};
}}"""


def open_notebook(page, lab_server, path: Path) -> None:
    """Open `path` in a fresh workspace and wait until its kernel is idle."""
    rel = path.relative_to(lab_server.root).as_posix()
    page.goto(lab_server.notebook_url(rel), wait_until="domcontentloaded")
    page.wait_for_function(
        f"() => window.jupyterapp && {_JS_PANEL}?.context?.path === {rel!r} && {_JS_PANEL}.sessionContext",
        timeout=90_000)
    state = page.evaluate(_JS_OPEN_READY, rel)
    assert state == "ok", f"{rel}: notebook did not open ({state})"
    page.evaluate(_JS_HOOK_IOPUB)
    page.wait_for_function(f"() => ({_JS_KERNEL_STATUS})() === 'idle'", timeout=90_000)


def run_all(page, name: str) -> dict:
    """Clear outputs, run all cells, wait until done; return the cells' models and rendered state."""
    page.evaluate(_JS_RUN_ALL)
    try:
        page.wait_for_function(_JS_RUN_FINISHED, timeout=NOTEBOOK_TIMEOUT_S * 1000, polling=250)
    except Exception as exc:  # playwright TimeoutError: report where it hung
        state = page.evaluate(_JS_CELLS)
        pending = [c["index"] for c in state["cells"] if c["type"] == "code" and c["source"].strip()
                   and c["executionCount"] is None]
        raise AssertionError(f"{name}: run all not finished after {NOTEBOOK_TIMEOUT_S} s "
                             f"(kernel {page.evaluate(_JS_KERNEL_STATUS)}, cells not run: {pending})") from exc
    return page.evaluate(_JS_CELLS)


def wait_widgets_rendered(page, state: dict, name: str) -> None:
    """Every cell that output a widget view shows a rendered widget, and no placeholder or error text."""
    want = [c["index"] for c in state["cells"] if any(WIDGET_MIME in o.get("data", {}) for o in c["outputs"])]
    js = f"""(want) => {{
      const nodes = {_JS_PANEL}.content.widgets;
      const bad = {list(BAD_WIDGET_TEXT)!r};
      const text = document.querySelector('.jp-Notebook')?.textContent ?? '';
      return want.every(i => nodes[i].node.querySelector('.jp-OutputArea .jupyter-widgets'))
          && !bad.some(b => text.includes(b));
    }}"""
    try:
        page.wait_for_function(js, arg=want, timeout=WIDGET_RENDER_TIMEOUT_S * 1000, polling=250)
    except Exception as exc:
        text = page.evaluate("() => document.querySelector('.jp-Notebook')?.textContent ?? ''")
        bad = [b for b in BAD_WIDGET_TEXT if b in text]
        cells = page.evaluate(_JS_CELLS)["cells"]
        unrendered = [i for i in want if cells[i]["renderedWidgets"] == 0]
        raise AssertionError(f"{name}: widgets not rendered after {WIDGET_RENDER_TIMEOUT_S} s: "
                             f"cells without a widget view {unrendered}, page shows {bad}") from exc


def assert_no_errors(page, state: dict, name: str) -> None:
    """No error output (cell models and rendered text, also inside Output widgets), no widget error text,
    no kernel error outside a cell. Cells tagged `raises-exception` may hold an error (as under nbval)."""
    problems = []
    for c in state["cells"]:
        if "raises-exception" in c["tags"]:
            continue
        for o in c["outputs"]:
            if o.get("output_type") == "error":
                problems.append(f"cell {c['index']}: {o.get('ename')}: {o.get('evalue')}\n"
                                f"  source: {c['source'][:200]!r}")
        for marker in ("Traceback (most recent call last)", *BAD_WIDGET_TEXT):
            if marker in c["text"]:
                i = c["text"].index(marker)
                problems.append(f"cell {c['index']} shows {marker!r}: ...{c['text'][max(0, i - 150):i + 300]!r}")
    not_run = [c["index"] for c in state["cells"]
               if c["type"] == "code" and c["source"].strip() and c["executionCount"] is None]
    if not_run:
        problems.append(f"code cells not run: {not_run} (the run stopped early: an error above, or the kernel "
                        "died; see test-artifacts/ui/jupyter-lab.log)")
    dialog = page.evaluate("() => document.querySelector('.jp-Dialog')?.textContent ?? null")
    if dialog is not None:
        problems.append(f"JupyterLab shows a dialog: {dialog[:300]!r}")
    for e in page.evaluate(_JS_KERNEL_ERRORS):
        if e["parent"] != "execute_request":  # errors of cells are listed above
            problems.append(f"kernel error outside a cell (in reply to {e['parent']}): "
                            f"{e['ename']}: {e['evalue']}\n{e['traceback']}")
    if state["kernel"] in ("dead", "no kernel", "unknown"):
        problems.append(f"kernel is {state['kernel']}")
    if state["runAll"].get("error"):
        problems.append(f"run-all command failed: {state['runAll']['error']}")
    assert not problems, f"{name}: errors in the notebook:\n" + "\n".join(problems)


# --- sliders ---------------------------------------------------------------------------------------

_JS_SLIDER_INFO = """(el) => {
  const s = el.querySelector('.slider').noUiSlider;
  const [down, up] = s.steps()[0];
  const r = s.options.range;
  const readout = el.querySelector('.widget-readout');
  return {now: Number(s.get()), min: Number(r.min), max: Number(r.max), down, up,
          readout: readout ? readout.textContent.trim() : null,
          editable: !!readout && readout.isContentEditable && readout.offsetParent !== null};
}"""


def find_slider(panel, description: str):
    """The slider widget in `panel` whose description label is exactly `description`."""
    sliders = panel.locator(".widget-slider").filter(
        has=panel.page.locator("label.widget-label", has_text=re.compile(rf"^\s*{re.escape(description)}\s*$")))
    n = sliders.count()
    assert n == 1, f"expected one slider with description {description!r} in the panel, found {n}"
    return sliders.first


def slider_kind(info: dict) -> str:
    """'int' for a numeric slider whose readout shows its value (IntSlider/FloatSlider), else 'selection'
    (SelectionSlider: the noUiSlider value is the option index and the readout is the option label)."""
    try:
        return "int" if info["editable"] and float(info["readout"]) == info["now"] else "selection"
    except (TypeError, ValueError):
        return "selection"


def set_slider(page, panel, description: str, target) -> str:
    """Move the slider labelled `description` inside `panel`; return its readout text afterwards.

    target: "right" / "left" (one step), "end" / "home", or a value. On an IntSlider a step or a value is
    typed into its editable readout and confirmed with Enter (one update to the kernel); on a
    SelectionSlider the handle is focused and driven with ArrowRight / ArrowLeft / End / Home (a value is
    reached from Home one ArrowRight at a time). Waits until the slider shows the new value.
    """
    slider = find_slider(panel, description)
    info = slider.evaluate(_JS_SLIDER_INFO)
    kind = slider_kind(info)
    handle = slider.locator(".noUi-handle")
    keys = {"right": "ArrowRight", "left": "ArrowLeft", "end": "End", "home": "Home"}
    if kind == "int" and target in keys:
        step_to = {"right": info["now"] + (info["up"] or 0), "left": info["now"] - (info["down"] or 0),
                   "end": info["max"], "home": info["min"]}[target]
        target = int(step_to) if float(step_to).is_integer() else step_to
    if target in keys:
        handle.focus()
        handle.press(keys[target])
    elif kind == "int":
        readout = slider.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(str(target))
        page.keyboard.press("Enter")
        page.wait_for_function("([el, t]) => Number(el.querySelector('.slider').noUiSlider.get()) === t",
                               arg=[slider.element_handle(), float(target)], timeout=10_000)
    else:
        handle.focus()
        handle.press("Home")
        for _ in range(int(info["max"]) + 1):
            if slider.locator(".widget-readout").text_content().strip() == str(target):
                break
            handle.press("ArrowRight")
        else:
            raise AssertionError(f"slider {description!r} has no option {target!r}")
    return slider.locator(".widget-readout").text_content().strip()


def panel_state(panel) -> dict:
    """Readout text and plot image src of a vqlab panel (None where missing)."""
    return panel.evaluate("""(p) => ({
      readout: p.querySelector('.vqlab-readout')?.textContent.trim() ?? null,
      img: p.querySelector('.vqlab-plot img')?.getAttribute('src') ?? null,
    })""")


def move_and_check(page, panel, description: str, name: str) -> str:
    """Move one slider one step (right, or left at its end); assert readout and plot followed."""
    page.wait_for_function(f"() => ({_JS_KERNEL_STATUS})() === 'idle'", timeout=SLIDER_TIMEOUT_S * 1000)
    before = panel_state(panel)
    slider = find_slider(panel, description)
    info = slider.evaluate(_JS_SLIDER_INFO)
    direction = "right" if info["now"] < info["max"] else "left"
    value = set_slider(page, panel, description, direction)
    assert value != info["readout"], f"{name}: slider {description} did not move from {info['readout']}"
    n_errors = len(page.evaluate(_JS_KERNEL_ERRORS))
    page.evaluate("() => { window.__vqlabIdleSince = null; }")
    # Wait until both changed, or the kernel raised, or it sat idle IDLE_GRACE_S with nothing changed.
    outcome = page.wait_for_function(
        f"""([p, before, nErrors]) => {{
          const r = p.querySelector('.vqlab-readout')?.textContent.trim();
          const img = p.querySelector('.vqlab-plot img')?.getAttribute('src');
          if (r !== before.readout && img && img !== before.img && ({_JS_KERNEL_STATUS})() === 'idle') return 'changed';
          if (window.__vqlabKernelErrors.length > nErrors) return 'kernel error';
          if (({_JS_KERNEL_STATUS})() !== 'idle') {{ window.__vqlabIdleSince = null; return false; }}
          window.__vqlabIdleSince = window.__vqlabIdleSince || Date.now();
          return Date.now() - window.__vqlabIdleSince > {IDLE_GRACE_S * 1000} ? 'idle, unchanged' : false;
        }}""", arg=[panel.element_handle(), before, n_errors], timeout=SLIDER_TIMEOUT_S * 1000, polling=200,
    ).json_value()
    errors = page.evaluate(_JS_KERNEL_ERRORS)[n_errors:]
    assert not errors, (f"{name}: kernel raised after {description} -> {value}:\n"
                        + "\n".join(f"{e['ename']}: {e['evalue']}\n{e['traceback']}" for e in errors))
    after = panel_state(panel)
    shown_error = re.search(r"\b[A-Z]\w*(Error|Exception): .*", after["readout"] or "")
    assert not shown_error, f"{name}: readout shows an error after {description} -> {value}: {shown_error[0]!r}"
    assert after["readout"] != before["readout"], (
        f"{name}: ({outcome}) readout unchanged after {description}: {info['readout']} -> {value}: {after['readout']!r}")
    assert after["img"] and after["img"] != before["img"], (
        f"{name}: ({outcome}) plot image {'missing' if not after['img'] else 'unchanged'} after {description} -> {value}")
    assert re.search(rf"\b{re.escape(description)}\s*=\s*{re.escape(value)}(?![\w.])", after["readout"]), (
        f"{name}: readout does not name {description}={value}: {after['readout']!r}")
    return value


# --- the test --------------------------------------------------------------------------------------

@pytest.mark.parametrize("notebook", _notebook_params())
def test_notebook_runs_and_widgets_respond(page, lab_server, notebook: Path):
    name = notebook.name
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{notebook.stem}.png"
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(f"uncaught: {e}"))
    try:
        open_notebook(page, lab_server, notebook)
        state = run_all(page, name)
        wait_widgets_rendered(page, state, name)
        assert_no_errors(page, page.evaluate(_JS_CELLS), name)
        if _uses_widgets(notebook):
            n_widgets = page.locator(".jp-Notebook .jupyter-widgets, .jp-Notebook .widget-slider").count()
            assert n_widgets > 0, f"{name} uses vqlab.widgets but no widget rendered"

        panels = page.locator(".jp-Notebook .vqlab-panel")
        if _uses_widgets(notebook) and panels.count() == 0:
            warnings.warn(f"{name} uses vqlab.widgets but shows no .vqlab-panel: no slider was moved")
        for i in range(panels.count()):
            panel = panels.nth(i)
            shown = re.search(r"\b[A-Z]\w*(Error|Exception): .*", panel_state(panel)["readout"] or "")
            assert not shown, f"{name} panel {i}: readout shows an error after the run: {shown[0]!r}"
            descriptions = [t.strip() for t in panel.locator(".widget-slider label.widget-label").all_text_contents()]
            assert descriptions, f"{name} panel {i}: no slider"
            for description in descriptions:
                move_and_check(page, panel, description, f"{name} panel {i}")
            panel.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ARTIFACTS / f"{notebook.stem}-panel{i}.png"))
        assert_no_errors(page, page.evaluate(_JS_CELLS), name)
        page.screenshot(path=str(shot))
    except BaseException:
        try:
            page.screenshot(path=str(ARTIFACTS / f"{notebook.stem}-FAILED.png"))
        except Exception:
            pass
        if console_errors:
            print(f"browser console errors for {name}:\n" + "\n".join(console_errors[-20:]))
        raise
