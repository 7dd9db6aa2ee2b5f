"""The size-budget recipe: `allocate` (multiple-choice knapsack) and `vqlab.compress` end to end."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

import vqlab
from vqlab.recipes import allocate, default_methods, layer_candidates


def _table(seed: int, layers: int = 4, options: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(layers):
        for j in range(options):
            rows.append({"layer": f"l{i}", "setting": f"s{j}", "bytes": int(rng.integers(1, 400)),
                         "predicted_loss": float(rng.exponential(1.0)) * (j > 0)})
    return pd.DataFrame(rows)


def _brute(table: pd.DataFrame, budget: int, fixed: int) -> float:
    groups = [g for _, g in table.groupby("layer", sort=False)]
    best = math.inf
    for combo in itertools.product(*[list(g.itertuples()) for g in groups]):
        if fixed + sum(r.bytes for r in combo) <= budget:
            best = min(best, sum(r.predicted_loss for r in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_optimal_and_never_exceeds_the_budget(seed):
    table = _table(seed)
    fixed = 37
    lo = fixed + int(table.groupby("layer")["bytes"].min().sum())
    for budget in (lo, lo + 50, lo + 300, lo + 2000):
        chosen = allocate(table, budget, fixed)
        assert list(chosen["layer"]) == ["l0", "l1", "l2", "l3"]
        used = fixed + sum(int(table[(table.layer == r.layer) & (table.setting == r.setting)].bytes.iloc[0])
                           for r in chosen.itertuples())                       # counted from the table itself
        assert used <= budget
        assert chosen["predicted_loss"].sum() == pytest.approx(_brute(table, budget, fixed), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_a_larger_budget_never_gives_a_smaller_model(seed):
    table = _table(seed, layers=5, options=6)
    lo = int(table.groupby("layer")["bytes"].min().sum())
    sizes = [int(allocate(table, b)["bytes"].sum()) for b in range(lo, lo + 1500, 7)]
    assert sizes == sorted(sizes)


def test_coarse_byte_units_still_hold_the_budget():
    table = _table(3)
    lo = int(table.groupby("layer")["bytes"].min().sum())
    for unit in (2, 7, 50):
        for budget in (lo + 60, lo + 400, lo + 900):
            if budget // unit * unit < sum(-(-int(b) // unit) * unit for b in table.groupby("layer")["bytes"].min()):
                continue
            assert int(allocate(table, budget, 0, unit)["bytes"].sum()) <= budget


def test_unreachable_budget_names_the_smallest_size():
    table = _table(0)
    lo = 5 + int(table.groupby("layer")["bytes"].min().sum())
    with pytest.raises(ValueError, match=f"gives {lo} bytes"):
        allocate(table, lo - 1, 5)


def test_default_candidates_fit_every_layer_of_lenet5():
    model = vqlab.get_model("lenet5")
    cands = layer_candidates(model)
    assert list(cands) == ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    for name, cs in cands.items():
        assert cs[0] is None                                            # staying float is always a choice
        layer = model.get_submodule(name)
        for cfg in cs[1:]:
            cfg.check(layer, name)
            assert math.ceil(math.log2(cfg.k)) / cfg.d <= 4
    # the first conv has one input channel: its segments run along the flattened 5x5 kernel
    assert {c.segment for c in cands["features.0"][1:]} == {"kernel"}
    assert {c.d for c in cands["features.0"][1:]} == {1, 5}
    # the second conv (8 input channels): input segments where d divides 8, kernel segments otherwise
    assert all((c.segment == "input") == (8 % c.d == 0) for c in cands["features.3"][1:])
    assert {c.d for c in cands["features.3"][1:] if c.segment == "kernel"} == {5, 10}


# ---------------------------------------------------------------- compress end to end (digits: seconds)

@pytest.fixture(scope="module")
def digits():
    model, _ = vqlab.train_or_load("lenet5", "digits", epochs=10, progress=False)   # the committed checkpoint
    return model, vqlab.load_dataset("digits", "train"), vqlab.load_dataset("digits", "test")


SMALL = dict(methods=lambda m: default_methods(m, ks=(4, 16), ds=(1, 2, 4, 5, 8)), calib_size=256, progress=False)


def _hand_count(model) -> int:
    """Stored bytes with floats as float16, counted without compressed_size: packed indices at ceil(log2 K)
    bits, codebooks / biases / float weights at 2 bytes per number."""
    total, seen = 0, set()
    for m in model.modules():
        code = getattr(m, "code", None)
        if isinstance(code, vqlab.VQCode):
            total += math.ceil(code.indices.numel() * math.ceil(math.log2(code.codebook.k)) / 8)
            if id(code.codebook.weight) not in seen:
                seen.add(id(code.codebook.weight))
                total += 2 * code.codebook.weight.numel()
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.is_floating_point() and id(t) not in seen and not (code is not None and t is code.indices):
                seen.add(id(t))
                total += 2 * t.numel()
    return total


def test_compress_meets_the_budget_and_the_file_agrees(digits, tmp_path):
    model, train, test = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, rep = vqlab.compress(model, train, target_ratio=16, val_ds=test, stage_steps=10, final_steps=10, **SMALL)
    dense = vqlab.compressed_size(model).dense_bytes
    assert _hand_count(small) <= dense / 16
    assert _hand_count(small) == rep.size.compressed_bytes
    assert vqlab.compressed_size(small, store_dtype="float16").ratio >= 16 and rep.ratio >= 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())          # the input is untouched
    # the report: one row per layer, at least one quantized, accuracies measured, stages in order
    assert list(rep.layers["layer"]) == [n for n, _ in vqlab.recipes._layers(model)]
    assert (rep.layers["order"] > 0).any() and rep.layers["bytes"].sum() <= rep.size.compressed_bytes
    assert 0.5 < rep.accuracy <= 1 and rep.accuracy == pytest.approx(vqlab.evaluate(small, test))
    assert list(rep.stages["stage"]) == list(range(1, len(rep.stages) + 1))
    # the saved file holds the same values: same predictions after load
    path = tmp_path / "small.vqz"
    vqlab.save(small, path, store_dtype="float16")
    loaded = vqlab.load(path)
    x = test.tensors[0][:200]
    with torch.no_grad():
        assert torch.equal(small.eval()(x), loaded.eval()(x))
    assert path.stat().st_size >= rep.size.compressed_bytes


def test_a_budget_of_one_returns_the_float_model_unchanged(digits):
    model, train, test = digits
    same, rep = vqlab.compress(model, train, target_ratio=1, val_ds=test, **SMALL)
    assert same is not model
    assert not any(isinstance(m, vqlab.QuantizedLinear | vqlab.QuantizedConv2d) for m in same.modules())
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in same.state_dict().items())
    assert rep.ratio == pytest.approx(1.0) and rep.accuracy == rep.float_accuracy


def test_a_larger_budget_never_yields_a_smaller_compressed_model(digits):
    model, train, _ = digits
    _, first = vqlab.compress(model, train, target_ratio=24, stage_steps=0, final_steps=0, **SMALL)
    sizes = []
    for target in (24, 16, 12, 8, 4, 2):
        small, rep = vqlab.compress(model, train, target_ratio=target, stage_steps=0, final_steps=0,
                                    sensitivity=first.candidates, progress=False)
        dense = vqlab.compressed_size(model).dense_bytes
        assert _hand_count(small) <= dense / target
        sizes.append(_hand_count(small))
    assert sizes == sorted(sizes)


def test_unreachable_budgets_and_bad_arguments_are_named(digits):
    model, train, _ = digits
    with pytest.raises(ValueError, match="cannot be met: the smallest setting of every layer gives"):
        vqlab.compress(model, train, target_ratio=10_000, stage_steps=0, final_steps=0, **SMALL)
    for bad in (0, -2, float("nan"), "32"):
        with pytest.raises(ValueError, match="target_ratio"):
            vqlab.compress(model, train, target_ratio=bad)
    with pytest.raises(ValueError, match="order"):
        vqlab.compress(model, train, target_ratio=8, order="random")
    with pytest.raises(ValueError, match="sensitivity table is for layers"):
        vqlab.compress(model, train, target_ratio=8, sensitivity=pd.DataFrame(
            {"layer": ["x"], "setting": ["float"], "config": [None], "bytes": [1], "float_bytes": [4],
             "predicted_loss": [0.0]}))


def test_bad_datasets_and_arguments_are_named_before_any_work(digits):
    """Issue 27: a model with only BatchNorm, an empty dataset, a list of (x, y) pairs, labels >= classes,
    batch_size=0 gave raw errors; epochs=-1 and calib_size=0 were accepted (the latter calibrating on everything)."""
    from torch.utils.data import TensorDataset
    model, train, test = digits
    x, y = train.tensors
    with pytest.raises(ValueError, match=r"no nn.Linear or nn.Conv2d layer to quantize"):
        vqlab.compress(torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten()), train, target_ratio=4,
                       progress=False)
    with pytest.raises(ValueError, match=r"train_ds is empty \(0 samples\)"):
        vqlab.compress(model, TensorDataset(x[:0], y[:0]), target_ratio=8)
    with pytest.raises(TypeError, match=r"train_ds must be a torch.utils.data.TensorDataset\(x, y\), got list .*"
                                        r"TensorDataset\(torch.stack\(xs\)"):
        vqlab.compress(model, [(x[i], int(y[i])) for i in range(10)], target_ratio=8)
    with pytest.raises(ValueError, match=r"train_ds has labels in \[0, 12\] but the model predicts 10 classes"):
        vqlab.compress(model, TensorDataset(x, torch.where(y == 9, 12, y)), target_ratio=8)
    with pytest.raises(ValueError, match=r"val_ds has labels in \[-1, 8\]"):
        vqlab.compress(model, train, target_ratio=8, val_ds=TensorDataset(test.tensors[0], test.tensors[1] - 1))
    with pytest.raises(ValueError, match=r"integer class labels"):
        vqlab.compress(model, TensorDataset(x, y.float()), target_ratio=8)
    for kw, match in ((dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
                      (dict(epochs=-1), r"epochs must be a finite number >= 0, got -1"),
                      (dict(calib_size=0), r"calib_size must be an integer >= 1, got 0"),
                      (dict(lr=float("inf")), r"lr must be a finite number > 0, got inf"),
                      (dict(stage_steps=-3), r"stage_steps must be an integer >= 0, got -3"),
                      (dict(distill_weight=2), r"distill_weight must be a finite number in \[0, 1\], got 2"),
                      (dict(byte_unit=0), r"byte_unit must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=match):
            vqlab.compress(model, train, target_ratio=8, **kw)


def test_hooks_on_the_input_stay_out_and_modes_are_kept(digits):
    """Forward hooks on the input model fired on the recipe's internal copies; the returned model was always in
    eval mode.  Now the copies have no hooks and the result has the input's modes."""
    model, train, _ = digits
    calls = []
    handle = model.classifier[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        model.train()
        model.features.eval()
        small, _ = vqlab.compress(model, train, target_ratio=8, stage_steps=2, final_steps=2, **SMALL)
        assert calls == []
        model(train.tensors[0][:2])
        assert calls == [1]                                     # the user's hook still works on the input
        assert small.training and not small.features.training and small.classifier.training
        assert all(m.training == small.classifier.training for m in small.classifier.modules())
        same, _ = vqlab.compress(model, train, target_ratio=1, **SMALL)
        assert same.training and not same.features.training
    finally:
        handle.remove()
        model.eval()
