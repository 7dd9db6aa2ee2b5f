"""The papers' whole pipelines (`vqlab.pipelines`) on the embedded digits, in seconds: what each stage must hold."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import vqlab
import vqlab.methods.gong as gong
from vqlab import pipelines
from vqlab.methods.lattice import LatticeCode, _mark_pruned, _unmark_pruned
from vqlab.methods.qaf import QAFCode


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    train, test = vqlab.load_dataset("digits", "train"), vqlab.load_dataset("digits", "test")
    model = vqlab.get_model("lenet5", input_size=8)
    vqlab.fit(model, train, epochs=6, lr=3e-3, progress=False)
    return model.eval(), train, test


def test_choi_pipeline_stages_and_a_size_fine_tuning_does_not_change(digits, tmp_path):
    model, train, test = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, rep = pipelines.choi(model, train, test, lattice="Z", step=0.05, prune=0.6, prune_steps=40,
                            finetune_steps=40, progress=False)
    st = rep.stages.set_index("stage")
    assert list(st.index) == ["float", "pruned", "pruned + retrained", "lattice", "fine-tuned"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # the float model untouched
    # fine-tuning the shared values moves them but leaves every stored byte count as it was
    assert st.loc["fine-tuned", "ratio"] == st.loc["lattice", "ratio"] and st.loc["lattice", "ratio"] > 5
    assert st.loc["fine-tuned", "file_bytes"] == st.loc["lattice", "file_bytes"]
    codes = [m.code for m in q.modules() if isinstance(getattr(m, "code", None), LatticeCode)]
    assert codes and all(c.pruned and "values" in c._parameters for c in codes)
    for c in codes:
        kept = c._kept_mask()[:, :c.n_cols]
        rows = c.rows().detach()
        assert torch.all(rows[~kept] == 0) and 0.55 < c.sparsity() < 0.65           # pruned weights exactly 0
    assert abs(st.loc["fine-tuned", "delta_points"]) < 100 and not math.isnan(st.loc["fine-tuned", "accuracy"])
    # the file holds the pruned, fine-tuned model
    nbytes = vqlab.save(q, tmp_path / "choi.vqz", store_dtype="float16", index_coding="ans")
    back = vqlab.load(tmp_path / "choi.vqz").eval()
    assert nbytes == st.loc["fine-tuned", "file_bytes"] and torch.equal(back(test.tensors[0][:64]), q(test.tensors[0][:64]))


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_pruned_segments_are_coded_in_the_stream(lattice):
    torch.manual_seed(1)
    w = torch.randn(12, 40) * 0.1
    code = LatticeCode.from_weight(w, lattice, 0.02, 5, "lzma", pad=True, prune=0.5)
    dim = code.dim
    segs = nn.functional.pad(w, (0, code.n_pad - 40)).reshape(-1, dim)
    pruned = code._decoded()["pruned"]
    assert int(pruned.sum()) == len(segs) // 2                                      # floor(0.5 N + 1/2)
    assert segs[pruned].norm(dim=1).max() <= segs[~pruned].norm(dim=1).min()        # the smallest ones
    plain = LatticeCode.from_weight(w, lattice, 0.02, 5, "lzma", pad=True)
    kept = code._kept_mask()[:, :40]
    assert torch.equal(code.rows()[kept], plain.rows()[kept])                       # kept weights as without pruning
    sym = torch.tensor([[0, 0], [3, -1], [-2, 4], [0, 5]])
    marked = _mark_pruned(sym, torch.tensor([True, False, False, False]))
    assert marked.tolist() == [[0, 0], [4, -1], [-2, 4], [1, 5]]
    back, was = _unmark_pruned(marked)
    assert back.tolist() == [[0, 0], [3, -1], [-2, 4], [0, 5]] and was.tolist() == [True, False, False, False]


def test_a_pruned_segment_with_a_nonzero_symbol_is_refused():
    from vqlab.methods.lattice import _compress, encode_ints
    code = LatticeCode.from_weight(torch.randn(2, 8), "D4", 0.05, 0, "none", prune=0.5)
    sym = code.symbols().clone()
    first = int(torch.nonzero(sym[:, 0] == 0)[0])
    sym[first, 2] = 1                                                               # junk after the pruned marker
    raw = _compress(encode_ints(sym.numpy()), "none")
    bad = LatticeCode(2, 8, "D4", 0.05, 0, "none", len(raw), pruned=True)
    bad.stream.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    with pytest.raises(ValueError, match="pruned lattice segment"):
        bad.validate()


def test_vqdnn_pipeline_reports_kmeans_then_fine_tuned(digits):
    model, train, test = digits
    q, rep = pipelines.vqdnn(model, train, test, k=16, d=2, codebook="layer", finetune_steps=60, progress=False)
    st = rep.stages.set_index("stage")
    assert list(st.index) == ["float", "k-means", "fine-tuned"]
    assert st.loc["fine-tuned", "accuracy"] >= st.loc["k-means", "accuracy"] - 0.02
    assert st.loc["k-means", "ratio"] > 5 and st.loc["fine-tuned", "ratio"] >= st.loc["k-means", "ratio"] * 0.99


def test_vqdnn_distillation_learns_from_the_float_model_and_leaves_it_alone(digits):
    model, train, test = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(k=16, d=2, codebook="layer", finetune_steps=30, progress=False)
    q0, rep0 = pipelines.vqdnn(model, train, test, **kw)
    q1, rep1 = pipelines.vqdnn(model, train, test, distill=True, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())        # the teacher is a copy
    assert all(p.requires_grad for p in model.parameters())
    assert rep1.setting["distill"] is True and "distill" not in rep0.setting
    assert rep1.final["what"].endswith("distilled")
    s0, s1 = rep0.stages.set_index("stage"), rep1.stages.set_index("stage")
    assert s0.loc["k-means", "accuracy"] == s1.loc["k-means", "accuracy"]               # same start
    books0 = [m.codebook.weight for m in q0.modules() if isinstance(m, vqlab.methods.vq.VQCode)]
    books1 = [m.codebook.weight for m in q1.modules() if isinstance(m, vqlab.methods.vq.VQCode)]
    assert books0 and not all(torch.equal(a, b) for a, b in zip(books0, books1))       # a different loss


def test_qaf_fine_tuning_keeps_the_factors_on_their_grid(digits):
    model, train, test = digits
    q, rep = pipelines.qaf(model, train, test, rank_ratio=0.3, bits=3, iters=3, finetune_steps=40, progress=False)
    codes = [m.code for m in q.modules() if isinstance(getattr(m, "code", None), QAFCode)]
    assert codes and all(c.finetune for c in codes)
    for c in codes:
        for i, latent in enumerate(getattr(c, f"latent{j}") for j in range(len(c.dims))):
            assert torch.equal(c.ints()[i], torch.round(latent.detach()).clamp(-3, 3))   # q is round(latent)
        c.validate()                                                                # integers in [0, 2^b - 2]
    st = rep.stages.set_index("stage")
    assert st.loc["fine-tuned", "ratio"] == st.loc["quantized", "ratio"]
    assert st.loc["fine-tuned", "accuracy"] > st.loc["quantized", "accuracy"]


def test_gong_codeword_fine_tuning_is_an_option(digits):
    model, train, test = digits
    q, rep = pipelines.gong(model, gong.RVQConfig(k=8, stages=2, d=4), train, test, finetune_steps=40,
                            progress=False)
    codes = [m.code for m in q.modules() if isinstance(getattr(m, "code", None), gong.RVQCode)]
    assert codes and all(isinstance(c.codebooks, nn.Parameter) for c in codes)
    st = rep.stages.set_index("stage")
    assert st.loc["fine-tuned", "ratio"] == st.loc["quantized", "ratio"]
    q2, rep2 = pipelines.gong(model, gong.RVQConfig(k=8, stages=2, d=4), val_ds=test, progress=False)
    assert list(rep2.stages["stage"]) == ["float", "quantized"]


def test_vq4all_fixed_fraction_only_grows_and_one_codebook_serves_all(digits):
    model, train, test = digits
    torch.manual_seed(2)
    cnn = vqlab.get_model("cnn", input_size=8)
    vqlab.fit(cnn, train, epochs=2, lr=3e-3, progress=False)
    nets, rep = pipelines.vq4all([model, cnn], [train, train], [test, test], k=32, d=4, rounds=3,
                                 steps_per_round=15, progress=False)
    books = {id(m.codebook) for net in nets for m in net.modules() if isinstance(m, vqlab.VQLinear | vqlab.VQConv2d)}
    assert len(books) == 1
    st = rep.stages.set_index("stage")
    assert st.loc["all, codebook in ROM", "ratio"] >= st.loc["all", "ratio"]
    assert (st["fixed_before_last"].dropna().between(0, 1)).all()
    # the fraction progressive_fit fixes never falls from round to round
    work = [m for m in [vqlab.get_model("lenet5", input_size=8)]][0]
    work.load_state_dict(model.state_dict())
    book = vqlab.methods.vq4all.universal_codebook([work], k=32, d=4)
    vqlab.quantize_(work, vqlab.VQ4ALLConfig(codebook=book, alpha=0.5), progress=False)
    hist = vqlab.methods.vq4all.progressive_fit(work, train, rounds=4, steps_per_round=10, progress=False)
    assert hist["fixed_fraction"].is_monotonic_increasing and hist["fixed_fraction"].iloc[-1] == 1.0


def test_the_readme_pipeline_table_is_the_stored_table():
    """README.md's ResNet-20 table is what benchmarks/pipelines_table.py renders from data/tables/ today."""
    import importlib.util
    from pathlib import Path

    from vqlab.paper_results import describe, results_table, to_markdown, verdict

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pipelines_table", root / "benchmarks" / "pipelines_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    df = results_table()
    assert len(df) >= 1 and df["file_ratio"].gt(1).all()
    assert mod.readme_block((root / "README.md").read_text()) == to_markdown(df).strip()
    assert verdict("choi", 13.7, -0.72) == "missed: ratio 2.9× short" and verdict("vqdnn", 23.2, -0.5) == "met"
    assert verdict("vqdnn", 23.2, -2.72) == "missed: 1.72 points too low" and verdict("gong", 5, -9) == "—"
    setting = {"pipeline": "vqdnn", "k": 256, "d": 8, "codebook": "shared", "finetune_steps": 4000}
    assert describe(setting) == ("vqdnn", "K=256 d=8 (shared codebook), 4000 steps")
    assert describe({**setting, "distill": True})[1] == "K=256 d=8 (shared codebook), 4000 steps, distilled from the float model"
    assert describe({**setting, "seed": 1})[1] == "K=256 d=8 (shared codebook), 4000 steps, seed 1"
    compress = {"pipeline": "compress", "target": 64.0, "epochs": 2.0, "seeds": [1]}
    assert describe(compress)[1] == "target 64×, 2.0 epochs, seed 1"
    assert describe({**compress, "ks": [2, 16], "ds": [4, 8], "calib_size": 512})[1] == \
        "target 64×, 2.0 epochs, K in {2, 16}, d in {4, 8}, scan on 512 images, seed 1"


def test_vq4all_batchnorm_re_estimation_adds_a_row_per_network_and_the_total_takes_it(digits):
    _, train, test = digits
    torch.manual_seed(2)
    cnn = vqlab.get_model("cnn", input_size=8)
    vqlab.fit(cnn, train, epochs=2, lr=3e-3, progress=False)
    nets, rep = pipelines.vq4all([cnn], [train], [test], k=32, d=4, rounds=2, steps_per_round=10, progress=False,
                                 distill=True, recalibrate_bn=4)
    st = rep.stages.set_index("stage")
    assert list(st.index) == ["0: SmallCNN", "0: SmallCNN, BN re-estimated", "all", "all, codebook in ROM"]
    assert st.loc["all", "delta_points"] == st.loc["0: SmallCNN, BN re-estimated", "delta_points"]
    assert abs(st.loc["0: SmallCNN, BN re-estimated", "accuracy"] - vqlab.evaluate(nets[0], test)) < 1e-6
    assert rep.setting["recalibrate_bn"] == 4 and rep.setting["distill"] is True
    from vqlab.paper_results import describe
    assert "re-estimated (4 batches)" in describe(rep.setting)[1]
