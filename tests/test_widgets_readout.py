"""Issue 23: every panel says "computing …" in its readout at once on a move, then shows the answer (`set` returns
once it is shown); points a stored sweep already holds are answered from it, not computed again."""
import pandas as pd
import pytest
import torch

import vqlab
import vqlab.experiments as experiments
from vqlab.data import load_dataset
from vqlab.experiments import sweep
from vqlab.models import get_model
from vqlab.train import fit
from vqlab.widgets import COMPUTING, budget_panel, codebook_panel, compression_panel, method_panel, speed_panel


@pytest.fixture(scope="module")
def digits_lenet():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    fit(model, tr, epochs=1, batch_size=32, seed=0, progress=False)
    grid = sweep(model, None, te, ks=[4, 16], ds=[2, 4], baselines=("float",), progress=False)
    return model, tr, te, grid


def _shown_during(panel, **move) -> list[str]:
    """Every readout value the browser is sent while `panel.set(**move)` runs."""
    seen = []
    panel.readout.observe(lambda change: seen.append(change["new"]), names="value")
    panel.set(**move)
    return seen


def _panels(digits_lenet):
    model, tr, te, grid = digits_lenet
    cands = pd.DataFrame([{"layer": "a", "setting": "float", "bytes": 100, "float_bytes": 100, "predicted_loss": 0.0},
                          {"layer": "a", "setting": "vq", "bytes": 10, "float_bytes": 100, "predicted_loss": 0.1}])
    yield codebook_panel(torch.randn(32, 64), ks=(4, 16), ds=(1, 2), k=4, d=2), {"K": 16}
    yield compression_panel(model, tr, te, grid, ks=(4, 16, 64), ds=(2, 4), k=16, d=4), {"K": 64}
    yield method_panel(model, te, grid, {"K": ([4, 16], 4)}, lambda K: vqlab.VQConfig(k=K, d=2)), {"K": 16}
    yield speed_panel(m=32, n=64, ks=(16, 64), ds=(2,), batches=(1,), k=16, d=2, repeats=1), {"K": 64}
    yield budget_panel(cands, 100, targets=(2, 8), target=8), {"target": 2}


def test_every_panel_says_computing_at_once_then_shows_the_answer(digits_lenet):
    for panel, move in _panels(digits_lenet):
        seen = _shown_during(panel, **move)
        assert len(seen) == 2, (type(panel), seen)
        label = ", ".join(f"{k}={v}" for k, v in panel.values.items())
        assert COMPUTING in seen[0] and "vqlab-computing" in seen[0] and label in seen[0]
        assert COMPUTING not in seen[1] and seen[1] == panel.text == panel.readout.value   # set returned: answered
        assert panel.error is None, panel.error


def test_a_failing_render_replaces_computing_with_the_error():
    panel = codebook_panel(torch.randn(8, 6), ks=(4,), ds=(2, 4), k=4, d=2)
    seen = _shown_during(panel, d=4)
    assert COMPUTING in seen[0] and "does not divide" in seen[-1] and COMPUTING not in panel.readout.value


def test_compression_panel_answers_swept_points_from_the_sweep(digits_lenet, monkeypatch):
    model, tr, te, grid = digits_lenet
    calls = []
    real = experiments.compress_and_evaluate

    def counting(*args, **kwargs):
        calls.append(args[3:5])
        return real(*args, **kwargs)
    monkeypatch.setattr(experiments, "compress_and_evaluate", counting)
    panel = compression_panel(model, tr, te, grid, ks=(4, 16, 64), ds=(2, 4), k=16, d=4)
    panel.set(K=4, d=2)
    assert calls == [] and "(from the sweep)" in panel.text
    row = grid[(grid["K"] == 4) & (grid["d"] == 2)].iloc[0]
    assert f"{row['ratio']:.1f}× smaller" in panel.text and f"accuracy {row['acc']:.3f}" in panel.text
    # the same point computed now gives the figures the sweep stored (same model, seed, no fine-tuning)
    fresh = compression_panel(model, tr, te, grid, ks=(4, 16, 64), ds=(2, 4), k=16, d=4, from_grid=False)
    fresh.set(K=4, d=2)
    assert fresh.text == panel.text.replace(" (from the sweep)", "")
    assert calls == [(16, 4), (4, 4), (4, 2)]                  # one move per slider, each computed
    panel.set(K=64)                                            # not swept: computed
    assert calls[-1] == (64, 2) and "(from the sweep)" not in panel.text


def _count_compare_configs(monkeypatch) -> list:
    """The labels of every compare_configs call the panels make from now on (the call still runs)."""
    calls = []
    real = experiments.compare_configs
    monkeypatch.setattr(experiments, "compare_configs", lambda *a, **k: calls.append(list(a[2])) or real(*a, **k))
    return calls


def test_method_panel_answers_stored_states_from_the_table(digits_lenet, monkeypatch):
    model, _, te, grid = digits_lenet
    stored = experiments.compare_configs(model, te, {"K=4": vqlab.VQConfig(k=4, d=2)}, progress=False)
    calls = _count_compare_configs(monkeypatch)
    panel = method_panel(model, te, grid, {"K": ([4, 16], 4)}, lambda K: vqlab.VQConfig(k=K, d=2), stored=stored)
    assert calls == [] and "(from the stored table)" in panel.text
    assert f"accuracy {stored['acc'].item():.3f}" in panel.text
    panel.set(K=16)
    assert calls == [["K=16"]] and "(from the stored table)" not in panel.text


def test_a_slow_method_shows_a_labelled_quick_estimate_then_the_full_answer(digits_lenet):
    model, tr, te, grid = digits_lenet

    def make(K):
        return vqlab.VQConfig(k=K, d=2)
    panel = method_panel(model, te, grid, {"K": ([4, 16], 4)}, make, quick=lambda K: vqlab.VQConfig(k=K, d=2, iters=1),
                         quick_label="one k-means iteration", quick_images=100)
    seen = _shown_during(panel, K=16)
    assert len(seen) == 3, seen
    assert COMPUTING in seen[0]
    assert "quick estimate (one k-means iteration, 100 test images)" in seen[1] and COMPUTING in seen[1]
    plain = method_panel(model, te, grid, {"K": ([4, 16], 4)}, make)
    plain.set(K=16)
    assert seen[2] == panel.text == plain.text and COMPUTING not in panel.text
    panel.set(K=4)
    again = _shown_during(panel, K=16)                 # answered before: from the cache, no estimate
    assert len(again) == 2 and again[1] == plain.text
    with pytest.raises(ValueError, match="quick_images"):
        method_panel(model, te, grid, {"K": ([4, 16], 4)}, make, quick=make, quick_images=0)


def test_method_panel_names_stored_states_the_notebooks_way(digits_lenet, monkeypatch):
    model, _, te, grid = digits_lenet
    stored = experiments.compare_configs(model, te, {"VQ K=4 d=2": vqlab.VQConfig(k=4, d=2)}, progress=False)
    stored = stored.drop(columns="error")                 # as notebook 04 concatenates its tables
    calls = _count_compare_configs(monkeypatch)
    panel = method_panel(model, te, grid, {"K": ([4, 16], 4)}, lambda K: vqlab.VQConfig(k=K, d=2), stored=stored,
                         stored_label=lambda K: f"VQ K={K} d=2" if K != 16 else None)
    assert calls == [] and "(from the stored table)" in panel.text
    fresh = method_panel(model, te, grid, {"K": ([4, 16], 4)}, lambda K: vqlab.VQConfig(k=K, d=2))
    assert fresh.text == panel.text.replace(" (from the stored table)", "")   # the same figures as computing it
    panel.set(K=16)                                                       # stored_label None: computed
    assert calls[-1] == ["K=16"] and "(from the stored table)" not in panel.text
