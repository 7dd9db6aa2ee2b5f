"""Kernel backends in one place: register one, pin what `auto` runs, layouts keyed by backend and clearable."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vqlab.kernels as K
import vqlab.kernels.checked as checked
from vqlab.kernels import KernelBackend, dequantize, register_backend, set_backend, vq_conv2d, vq_matmul
from vqlab.kernels import unregister_backend


@pytest.fixture(autouse=True)
def _clean():
    K.clear_caches()
    set_backend(None)
    yield
    set_backend(None)
    unregister_backend("rowloop")
    K.clear_caches()


def _rowloop(xf, book, chk):
    """A deliberately simple backend: dequantize its own private layout, one GEMM."""
    w = chk.layout("rowloop", lambda c: book[c.long()].reshape(c.shape[0], -1).contiguous())
    return xf @ w.T


def test_a_registered_backend_runs_for_matmul_conv_and_groups():
    register_backend(KernelBackend("rowloop", matmul=_rowloop, auto=False))
    assert "rowloop" in K.available_backends() and "rowloop" in K.backend_names()
    g = torch.Generator().manual_seed(0)
    book = torch.randn(2, 16, 4, generator=g)
    idx = torch.randint(0, 16, (10, 6), generator=g, dtype=torch.uint8)
    x = torch.randn(3, 24, generator=g)
    torch.testing.assert_close(vq_matmul(x, book, idx, backend="rowloop"), x @ dequantize(book, idx).T)
    xc = torch.randn(2, 8, 5, 5, generator=g)
    idx_c = torch.randint(0, 16, (6, 8 * 9 // 4 // 2), generator=g, dtype=torch.uint8)
    w = dequantize(book, idx_c).reshape(6, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(vq_conv2d(xc, book, idx_c, (6, 4, 3, 3), padding=1, groups=2, backend="rowloop"),
                               F.conv2d(xc, w, padding=1, groups=2), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="out of range|K=16"):                     # still checked before it runs
        bad = idx.clone(); bad[0, 0] = 99
        vq_matmul(x, book, bad, backend="rowloop")
    # the layout cache is keyed by backend: numba's and rowloop's entries live side by side, and clear empties it
    vq_matmul(x, book, idx, backend="numba")
    store = next(iter(checked._CACHE.values()))._store
    assert {k[0] for k in store} >= {"rowloop", "numba/16"}
    K.clear_caches()
    assert not checked._CACHE


def test_reserved_and_unknown_names():
    with pytest.raises(ValueError, match="reserved"):
        register_backend(KernelBackend("auto", matmul=_rowloop))
    with pytest.raises(ValueError, match="not an available backend"):
        set_backend("nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        vq_matmul(torch.randn(1, 4), torch.randn(4, 2), torch.zeros(3, 2, dtype=torch.uint8), backend="nope")


def test_pinned_backend_gives_the_same_output_as_that_backend():
    g = torch.Generator().manual_seed(1)
    book = torch.randn(256, 4, generator=g)
    idx = torch.randint(0, 256, (300, 64), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 256, generator=g)
    for name in ("dense", "numba", "torch"):
        set_backend(name)
        assert torch.equal(vq_matmul(x, book, idx, backend="auto"), vq_matmul(x, book, idx, backend=name))
    set_backend(None)
    assert K.auto_choices() == {}                                  # nothing was timed while pinned


def test_environment_variable_pins_auto():
    code = ("import torch, vqlab.kernels as K; from vqlab.kernels.registry import pinned_backend;"
            "print(pinned_backend()); b=torch.randn(16,2); i=torch.randint(0,16,(4,3),dtype=torch.uint8);"
            "K.vq_matmul(torch.randn(1,6), b, i); print(len(K.auto_choices()))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, VQLAB_BACKEND="numba"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numba", "0"]
