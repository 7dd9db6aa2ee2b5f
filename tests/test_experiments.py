import math

import pandas as pd
import pytest
import torch

from vqlab.methods.uniform import fake_quantize_uniform, uniform_quantize_
from vqlab.size import compressed_size
from vqlab.data import load_dataset
from vqlab.experiments import COLUMNS, layer_sensitivity, pareto_front, sweep
from vqlab.models import get_model
from vqlab.train import evaluate, fit


@pytest.fixture(scope="module")
def digits_model():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    fit(model, tr, epochs=10, lr=3e-3, batch_size=32, seed=0, progress=False)
    return model, tr, te


def test_uniform_quantization_levels_and_bytes():
    w = torch.randn(6, 10)
    q = fake_quantize_uniform(w, 4)
    scale = w.abs().amax(1, keepdim=True) / 7
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 7 + 1e-4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 30), torch.nn.Linear(30, 5))
    rep = uniform_quantize_(model, 8)                               # quantize_'s rule: the last Linear stays float
    assert rep.loc[rep.status == "uniform", "layer"].tolist() == ["0", "1"]
    assert rep["status"].iloc[-1] == "float (last linear)"
    size = compressed_size(model).layers.set_index("layer")
    assert size.loc["1", "index_bytes"] == 20 * 30                  # 8-bit weights
    assert size.loc["1", "other_bytes"] == 4 * 30 + 4 * 30          # one fp32 scale per row + the bias
    assert torch.equal(model[1].weight, fake_quantize_uniform(model[1].weight, 8))
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 16\], got 1"):
        fake_quantize_uniform(w, 1)


def test_sweep_measures_every_grid_point_and_baselines(digits_model):
    model, tr, te = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = sweep(model, tr, te, ks=[4, 64], ds=[2, 4], finetune_epochs=1, max_steps=20, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())      # model untouched
    assert list(df.columns) == COLUMNS + ["error"]
    assert df["method"].tolist() == ["float32", "uniform int8", "uniform int4"] + ["vq"] * 4 + ["scalar k-means"] * 2
    vq = df[df.method == "vq"].set_index(["K", "d"])
    float_acc = evaluate(model, te)
    assert df.loc[0, "acc"] == pytest.approx(float_acc)
    # compression ratio grows as bits fall; K=4,d=4 (0.5 bit/weight) is the smallest model
    assert vq.loc[(4, 4), "ratio"] > vq.loc[(4, 2), "ratio"] > vq.loc[(64, 2), "ratio"] > 1
    assert vq.loc[(64, 2), "bits_per_weight"] == pytest.approx(3.0)
    # int8 costs at most a fraction of a point on a trained model; measured accuracies are real numbers in [0, 1]
    assert abs(df.loc[1, "acc"] - float_acc) < 0.01
    assert df["acc"].between(0, 1).all() and vq["acc_finetuned"].notna().all()
    # fine-tuning the codebooks helps the most damaged model
    assert vq.loc[(4, 4), "acc_finetuned"] > vq.loc[(4, 4), "acc"]
    front = pareto_front(df)
    assert front["ratio"].is_monotonic_increasing and len(front) >= 2


def test_sweep_scalar_baselines_at_equal_bits(digits_model):
    model, tr, te = digits_model
    df = sweep(model, tr, te, ks=[16], ds=[2], baselines=("int3", "int2"), progress=False)
    assert df["method"].tolist() == ["uniform int3", "uniform int2", "vq"]
    assert df["bits_per_weight"].tolist() == [3.0, 2.0, 2.0]
    assert df.loc[1, "ratio"] > df.loc[0, "ratio"] > 1                # fewer bits, smaller model


def test_sweep_reports_impossible_grid_points(digits_model):
    model, tr, te = digits_model
    df = sweep(model, None, te, ks=[4], ds=[3], baselines=(), progress=False)
    assert df["error"].iloc[0].startswith("layer 'features.3'") and "d=3" in df["error"].iloc[0]


def test_layer_sensitivity_ranks_layers(digits_model):
    model, _, te = digits_model
    sens = layer_sensitivity(model, te, k=4, d=4, pad=True)
    assert set(sens["layer"]) == {"features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"}
    assert sens["drop_points"].is_monotonic_decreasing
    assert sens["drop_points"].iloc[0] > 0


def test_sweep_command_writes_csv_and_png(tmp_path, monkeypatch):
    from vqlab.__main__ import main

    monkeypatch.setattr("vqlab.train.checkpoint_path", lambda *a, **k: tmp_path / "ckpt.pt")
    rc = main(["sweep", "--dataset", "digits", "--model", "lenet5", "--epochs", "2", "--k", "4", "16", "--d", "4",
               "--finetune-epochs", "0", "--out", str(tmp_path / "results"), "--quiet"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "results" / "sweep_lenet5_digits.csv")
    assert len(df[df.method == "vq"]) == 2 and (tmp_path / "results" / "sweep_lenet5_digits.png").stat().st_size > 10_000
    assert (tmp_path / "ckpt.pt").exists()


def test_bits_per_weight_is_the_stored_index_bits(digits_model):
    from vqlab.experiments import compress_and_evaluate
    from vqlab.methods.vq import VQConfig

    model, _, te = digits_model
    row, q = compress_and_evaluate(model, None, te, 24, 4)
    assert row["bits_per_weight"] == VQConfig(k=24, d=4).bits_per_weight == 5 / 4      # ceil(log2 24) = 5
    assert q.classifier[1].bits_per_weight == pytest.approx(5 / 4)
    df = sweep(model, None, te, ks=[24], ds=[3], baselines=(), progress=False)         # an error row, same formula
    assert df["error"].notna().all() and df["bits_per_weight"].tolist() == [5 / 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"ks": [0]}, r"every value of ks must be an integer >= 2, got 0"),
    ({"ks": [16], "ds": [0]}, r"every value of ds must be an integer >= 1, got 0"),
    ({"ks": []}, r"ks is empty"),
    ({"finetune_epochs": -1}, r"finetune_epochs must be an integer >= 0, got -1"),
])
def test_sweep_rejects_bad_grids_before_any_work(monkeypatch, kwargs, message):
    def no_work(*a, **k):
        raise AssertionError("sweep evaluated a model before checking its grid")

    monkeypatch.setattr("vqlab.experiments.evaluate", no_work)
    with pytest.raises(ValueError, match=message):
        sweep(torch.nn.Linear(4, 2), None, None, **{"ks": [16], "ds": [2], **kwargs})


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope"], "error: unknown model 'nope'; choose one of ['cnn', 'lenet5',"),
    (["train", "--dataset", "nope"], "error: unknown dataset 'nope'; choose one of ['cifar10', 'digits',"),
    (["train", "--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    (["sweep", "--model", "nope"], "error: unknown model 'nope'"),
    (["sweep", "--dataset", "nope"], "error: unknown dataset 'nope'"),
    (["sweep", "--k", "0", "--d", "0", "--finetune-epochs", "0"], "error: --k values must be >= 2, got 0"),
    (["sweep", "--d", "0"], "error: --d values must be >= 1, got 0"),
    (["sweep", "--finetune-epochs", "-1"], "error: --finetune-epochs must be >= 0, got -1"),
])
def test_cli_bad_arguments_are_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, message):
    from vqlab.__main__ import main

    def no_work(*a, **k):
        raise AssertionError("the command started working before checking its arguments")

    monkeypatch.setattr("vqlab.train.train_or_load", no_work)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_sweep_out_that_is_a_file_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from vqlab.__main__ import main

    target = tmp_path / "existing_file"
    target.write_text("keep me")
    monkeypatch.setattr("vqlab.train.train_or_load", lambda *a, **k: pytest.fail("trained before checking --out"))
    assert main(["sweep", "--dataset", "digits", "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --out {target} exists and is not a folder; give a folder for the CSV and PNG\n"
    assert target.read_text() == "keep me"


def test_cli_error_exit_status_from_the_shell():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vqlab", "train", "--model", "nope"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: unknown model 'nope'") and r.stderr.count("\n") == 1, r.stderr


def test_compare_configs_measures_any_method(digits_model):
    import vqlab.methods.gong as gong
    import vqlab.methods.lattice as lat
    from vqlab.experiments import compare_configs, compress_and_evaluate, copy_model
    from vqlab.methods.vq import VQConfig

    model, tr, te = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = compare_configs(model, te, {"vq": VQConfig(k=16, d=4), "scalar": gong.ScalarConfig(k=16),
                                     "rvq": gong.RVQConfig(k=4, stages=2, d=4),
                                     "too big": gong.ScalarConfig(k=1 << 15)}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())      # the model is not changed
    assert df["label"].tolist() == ["vq", "scalar", "rvq", "too big"]
    assert df["method"].tolist()[:3] == ["vq", "gong_scalar", "gong_rvq"]
    row, q = compress_and_evaluate(model, None, te, 16, 4)
    vq = df.iloc[0]
    assert vq["ratio"] == row["ratio"] and vq["acc"] == row["acc"] and vq["bits_per_weight"] == pytest.approx(1.0)
    assert df.iloc[1]["bits_per_weight"] == pytest.approx(4.0) and df.iloc[2]["bits_per_weight"] == pytest.approx(1.0)
    assert df.iloc[1]["acc"] == pytest.approx(evaluate(model, te), abs=0.05)         # 16 levels: close to float
    assert "k=32768" in df.iloc[3]["error"] and math.isnan(df.iloc[3]["ratio"])
    # FLOPs per method: count_flops of the compressed copy (the VQ row's equals counting `q` by hand)
    from vqlab.flops import count_flops
    fl = compare_configs(model, te, {"vq": VQConfig(k=16, d=4)}, flops_input_shape=(1, 1, 8, 8), progress=False)
    by_hand = count_flops(q, (1, 1, 8, 8))
    assert fl.iloc[0]["flops"] == by_hand["vq_flops"].sum()
    assert fl.iloc[0]["flop_ratio"] == pytest.approx(by_hand["vq_flops"].sum() / by_hand["dense_flops"].sum())
    assert "flops" not in df
    assert df.iloc[:3]["error"].isna().all()
    # one footing (issue 28): Gong's RVQ convolutions count their lookup-table product as VQ's always do, whatever
    # backend is pinned (notebook 08 pins "dense" for its accuracy runs), and the caller's pin survives
    import vqlab
    from vqlab.experiments import lut_flops
    from vqlab.kernels.registry import pinned_backend

    vqlab.kernels.set_backend("dense")
    try:
        rvq = compare_configs(model, te, {"rvq": gong.RVQConfig(k=4, stages=2, d=4)}, flops_input_shape=(1, 1, 8, 8),
                              progress=False).iloc[0]
        r = copy_model(model)
        vqlab.quantize_(r, gong.RVQConfig(k=4, stages=2, d=4), progress=False)
        dense_path = count_flops(r, (1, 1, 8, 8)).set_index("layer")      # "dense" pinned: the conv convolves densely
        lut_path = lut_flops(r, (1, 1, 8, 8)).set_index("layer")
        assert pinned_backend() == "dense"
        conv = "features.3"
        assert dense_path.loc[conv, "vq_flops"] == dense_path.loc[conv, "dense_flops"]
        assert lut_path.loc[conv, "vq_table_flops"] > 0 and lut_path.loc[conv, "vq_flops"] != lut_path.loc[conv, "dense_flops"]
        assert rvq["flops"] == lut_path["vq_flops"].sum()
    finally:
        vqlab.kernels.set_backend(None)
    # fine-tuning: accuracy after it is measured, and the size is counted again (trainable lattice codewords)
    ft = compare_configs(model, te, {"E8": lat.LatticeConfig(step=0.2, pad=True, finetune=True)}, train_ds=tr,
                         finetune_epochs=1, max_steps=5, progress=False).iloc[0]
    assert not math.isnan(ft["acc_finetuned"]) and ft["delta_points"] == pytest.approx(
        100 * (ft["acc_finetuned"] - evaluate(model, te)))


def test_pareto_plot_styles_labels_before_after_and_zoom():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vqlab.experiments import METHOD_STYLES, method_styles, pareto_plot

    assert len(set(METHOD_STYLES.values())) == len(METHOD_STYLES)          # no two methods look alike
    many = [f"method {i}" for i in range(30)] + ["vq", "qaf"]
    assert len(set(method_styles(many).values())) == len(many)
    df = pd.DataFrame([
        {"method": "float32", "ratio": 1.0, "acc": 0.91, "acc_finetuned": float("nan")},
        {"method": "vq", "K": 16, "d": 2, "ratio": 12.0, "acc": 0.88, "acc_finetuned": 0.90},
        {"method": "vq", "K": 4, "d": 8, "ratio": 34.0, "acc": 0.11, "acc_finetuned": 0.78},
        {"method": "vq", "K": 256, "d": 8, "ratio": 6.0, "acc": 0.86, "acc_finetuned": 0.87},   # dominated
        {"method": "uniform int4", "ratio": 6.8, "acc": 0.908, "acc_finetuned": float("nan")},
    ])
    fig, ax = plt.subplots()
    pareto_plot(df, ax=ax, before_after=True, zoom=5, extra_fronts={"no training": df["acc_finetuned"].isna(),
                                                                    "post-training": (df["ratio"] > 0, "acc")})
    labels = {t.get_text() for t in ax.texts}
    assert labels == {"float32", "K16,d2", "uniform int4"}     # the front inside the zoom, nothing else
    assert ax.get_ylim()[0] == pytest.approx(91 - 5)
    assert len(ax.child_axes) == 1                              # the inset holds the points the zoom leaves out
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "hollow: before fine-tuning" in legend and "front: no training" in legend and "front: post-training" in legend
    post = [l for l in ax.lines if l.get_label() == "front: post-training"][0]
    assert list(post.get_ydata()) == pytest.approx([91.0, 90.8, 88.0, 11.0])   # before any fine-tuning
    plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["finetune", "-d", "3"], r"error: -k 16 -d 3: layer 'features.3' \(Conv2d\): d=3 does not divide"),
    (["finetune", "--k", "100000"], r"error: -k 100000 -d 2: layer 'features.3' \(Conv2d\): K=100000 is larger than"),
    (["finetune", "--codebook", "shared", "--k", "20000"], r"error: -k 20000 -d 2: the shared codebook serves \d+ "),
    (["finetune", "--lr", "inf"], r"error: --lr must be a finite number > 0, got inf"),
    (["finetune", "--lr", "nan"], r"error: --lr must be a finite number > 0, got nan"),
    (["finetune", "--out", "/proc/a.vqz"], r"error: --out /proc/a.vqz: cannot write in /proc"),
    (["finetune", "--baseline", "{tmp}/garbage.pt"], r"error: --baseline .*garbage.pt is not a checkpoint torch can read"),
    (["finetune", "--baseline", "{tmp}/model.vqz"], r"error: --baseline .*model.vqz is a vqlab .vqz file"),
    (["finetune", "--baseline", "{tmp}"], r"error: --baseline .* is a folder"),
    (["finetune", "--baseline", "{tmp}/cnn.pt"], r"error: --baseline .*cnn.pt holds another model's weights, not lenet5"),
    (["finetune", "--baseline", "{tmp}/dict.pt"], r"error: --baseline .*dict.pt is not a vqlab baseline checkpoint"),
    (["finetune", "--baseline", "/proc/none/b.pt"], r"error: --baseline /proc/none/b.pt: cannot write in /proc"),
    (["train", "--out", "/proc/t.pt"], r"error: --out /proc/t.pt: cannot write in /proc"),
    (["train", "--lr", "inf"], r"error: --lr must be a finite number > 0, got inf"),
    (["train", "--out", "{tmp}/garbage.pt"], r"error: --out .*garbage.pt is not a checkpoint torch can read"),
])
def test_cli_finetune_and_train_refuse_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    """Issue 27: these gave tracebacks, some after training (--lr inf failed on NaN, --out /proc/a.vqz after 14 s)."""
    import re

    import vqlab
    from vqlab.__main__ import main

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    vqlab.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "model.vqz")
    cnn = vqlab.get_model("cnn", num_classes=10, in_channels=1, input_size=8)
    torch.save({"state_dict": cnn.state_dict(), "meta": {}}, tmp_path / "cnn.pt")
    torch.save({"weights": 1}, tmp_path / "dict.pt")

    def no_work(*a, **k):
        raise AssertionError("the command started working before checking its arguments")

    monkeypatch.setattr("vqlab.train.train_or_load", no_work)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "finetune" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.vqz")]
    assert main([*argv, "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert re.match(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out.vqz").exists() and not list(tmp_path.glob(".vqlab-probe-*"))
