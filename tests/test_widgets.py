"""Every panel: move each slider over every option from code; the readout and the plot must change, nothing raise."""
import pytest
import torch

from vqlab.data import load_dataset
from vqlab.experiments import sweep
from vqlab.models import get_model
from vqlab.train import fit
from vqlab.widgets import Panel, codebook_panel, compression_panel, speed_panel


def _walk_every_option(panel: Panel) -> int:
    """Visit every other option of each slider, then return to the start; returns the number of moves."""
    moves = 0
    for name, slider in panel.sliders.items():
        start = slider.value
        for option in [o for o in slider.options if o != start] + [start]:
            text, png = panel.text, panel.png
            slider.value = option
            assert panel.error is None, (name, option, panel.error)
            assert panel.text != text, f"readout unchanged after {name}={option}"
            assert panel.png != png and panel.png[:4] == b"\x89PNG", f"plot unchanged after {name}={option}"
            assert f"{name}={option}" in panel.text or f"{name} {option}" in panel.text
            moves += 1
    return moves


def test_panels_follow_the_widget_contract():
    panel = codebook_panel(torch.randn(32, 64), ks=(4, 16), ds=(1, 2))
    assert "vqlab-panel" in panel._dom_classes
    assert "vqlab-readout" in panel.readout._dom_classes and "vqlab-plot" in panel.plot._dom_classes
    assert list(panel.sliders) == ["K", "d"]


def test_codebook_panel_every_option():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    panel = codebook_panel(layer, ks=(2, 8, 32, 128), ds=(1, 2, 4, 8), k=8, d=2)
    assert _walk_every_option(panel) == 4 + 4
    assert "bits/weight" in panel.text


def test_codebook_panel_shows_bad_values_in_the_readout():
    with pytest.raises(ValueError, match=r"start value K=16 is not one of the slider options \[4\]"):
        codebook_panel(torch.randn(8, 6), ks=(4,), ds=(2, 4), d=2)
    panel = codebook_panel(torch.randn(8, 6), ks=(4,), ds=(2, 4), k=4, d=2)
    panel.set(d=4)
    assert panel.error is not None and "d=4 does not divide the row length 6" in panel.error
    assert "d=4 does not divide" in panel.readout.value


@pytest.fixture(scope="module")
def digits_lenet():
    """A LeNet-5 for 8x8 digits trained 3 epochs, the data, and a one-point sweep to draw under the live point."""
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    fit(model, tr, epochs=3, batch_size=32, seed=0, progress=False)
    grid = sweep(model, None, te, ks=[16], ds=[4], baselines=("float",), progress=False)
    return model, tr, te, grid


def test_compression_panel_every_option(digits_lenet):
    model, tr, te, grid = digits_lenet
    panel = compression_panel(model, tr, te, grid, ks=(4, 16, 64), ds=(2, 4, 8), k=16, d=4)
    assert "× smaller" in panel.text
    assert _walk_every_option(panel) == 3 + 3


def test_speed_panel_every_option():
    panel = speed_panel(m=64, n=128, ks=(16, 256), ds=(2, 4), batches=(1, 8), repeats=2)
    assert "FLOP ratio" in panel.text
    assert _walk_every_option(panel) == 2 + 2 + 2


def test_render_error_clears_the_plot():
    panel = codebook_panel(torch.randn(8, 6), ks=(4,), ds=(2, 4), k=4, d=2)
    assert panel.png[:4] == b"\x89PNG"
    panel.set(d=4)                                        # 4 does not divide 6: render fails
    assert panel.error is not None and panel.png == b""   # no stale plot of d=2 under the error
    panel.set(d=2)
    assert panel.error is None and panel.png[:4] == b"\x89PNG"


def test_codebook_panel_shows_the_K_kmeans_used():
    panel = codebook_panel(torch.randn(6, 8), ks=(4, 256), ds=(2,), k=256, d=2)   # 24 segments of length 2
    assert panel.error is None
    assert "k-means used K=24" in panel.text and "2.50 bits/weight" in panel.text   # ceil(log2 24) / 2
    assert "4.00 bits/weight" not in panel.text
    panel.set(K=4)
    assert "K=4, d=2: <b>1.00 bits/weight</b>" in panel.text


def test_set_names_the_slider_and_its_options():
    panel = codebook_panel(torch.randn(8, 8), ks=(4, 16), ds=(2,), k=4, d=2)
    with pytest.raises(ValueError, match=r"slider 'K' has no option 5; options: \[4, 16\]"):
        panel.set(K=5)
    with pytest.raises(ValueError, match=r"no slider 'k' on this panel; sliders: \['K', 'd'\]"):
        panel.set(k=16)
    with pytest.raises(ValueError, match=r"slider 'd'"):
        panel.set(K=16, d=3)                              # checked before any slider moves
    assert panel.values == {"K": 4, "d": 2}


def test_method_panel_every_option_and_bad_values(digits_lenet):
    import vqlab.methods.gong as gong
    import vqlab.methods.lattice as lat
    from vqlab.widgets import method_panel

    model, _, te, grid = digits_lenet
    panel = method_panel(model, te, grid, {"K": ([4, 16], 4), "d": ([2, 4], 4), "stages": ([1, 2], 1)},
                         lambda K, d, stages: gong.RVQConfig(k=K, d=d, stages=stages))
    assert list(panel.sliders) == ["K", "d", "stages"] and "× smaller" in panel.text
    assert _walk_every_option(panel) == 2 + 2 + 2
    panel = method_panel(model, te, grid, {"lattice": (["Z", "E8"], "Z"), "step": ([0.05, 0.1], 0.05)},
                         lambda lattice, step: lat.LatticeConfig(lattice=lattice, step=step, pad=True))
    assert _walk_every_option(panel) == 2 + 2
    # a knob value some layer cannot take: the reason in the readout, no stale plot
    panel = method_panel(model, te, grid, {"K": ([4, 4096], 4)}, lambda K: gong.ScalarConfig(k=K))
    panel.set(K=4096)
    assert panel.error is not None and "k=4096" in panel.error and panel.png == b""


def test_show_displays_the_panel_and_a_static_picture(monkeypatch):
    import IPython.display

    panel = codebook_panel(torch.randn(32, 64), ks=(4, 16), ds=(1, 2), k=4, d=2)
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert panel.show() is None                      # nothing returned: the cell shows the panel once
    assert shown[0] is panel
    assert "K=4, d=2" in shown[1].data and panel.text in shown[1].data
    assert shown[2].data == panel.png and panel.png[:4] == b"\x89PNG"


def test_bad_panel_arguments_are_named_before_any_work(digits_lenet):
    """Issue 27: repeats=0, m=0, a target of 0, empty candidates, a grid without acc_finetuned ended in raw
    messages (IndexError, ZeroDivisionError, KeyError) in the readout."""
    import pandas as pd

    from vqlab.widgets import budget_panel, method_panel
    import vqlab

    for kw, match in ((dict(repeats=0), r"repeats must be an integer >= 1, got 0"),
                      (dict(m=0), r"m must be an integer >= 1, got 0"),
                      (dict(ks=(1, 16)), r"every value of ks must be an integer >= 2, got 1"),
                      (dict(batches=()), r"batches is empty")):
        with pytest.raises(ValueError, match=match):
            speed_panel(**{"m": 64, "n": 64, "ks": (16,), "ds": (2,), "batches": (1,), "k": 16, "d": 2, **kw})
    cands = pd.DataFrame([{"layer": "a", "setting": "float", "bytes": 100, "float_bytes": 100, "predicted_loss": 0.0},
                          {"layer": "a", "setting": "vq", "bytes": 10, "float_bytes": 100, "predicted_loss": 0.1}])
    with pytest.raises(ValueError, match=r"every value of targets must be a finite number > 0, got 0"):
        budget_panel(cands, 100, targets=(0, 8), target=0)
    with pytest.raises(ValueError, match=r"candidates must be a CompressReport.candidates table .* got 0 rows"):
        budget_panel(cands.iloc[:0], 100, targets=(8,), target=8)
    with pytest.raises(TypeError, match=r"candidates must be a pandas DataFrame"):
        budget_panel(None, 100, targets=(8,), target=8)
    assert budget_panel(cands, 100, targets=(2, 8), target=8).error is None
    model, tr, te, _ = digits_lenet
    bare = pd.DataFrame([{"method": "vq", "ratio": 5.0, "acc": 0.5, "K": 16, "d": 2}])      # no acc_finetuned
    assert compression_panel(model, tr, te, bare, ks=(16,), ds=(2,), k=16, d=2).error is None
    assert method_panel(model, te, bare, {"K": ([4], 4)}, lambda K: vqlab.VQConfig(k=K, d=2)).error is None
    with pytest.raises(ValueError, match=r"grid must be a DataFrame with columns method, ratio, acc"):
        method_panel(model, te, pd.DataFrame({"x": [1]}), {"K": ([4], 4)}, lambda K: vqlab.VQConfig(k=K, d=2))
