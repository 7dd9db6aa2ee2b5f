"""Eval at float speed (issue 23): a layer on the "dense" path reuses its weight, rebuilt once, and is never served
a stale one -- indices or codebook changed in place, through `.numpy()`, by `load_state_dict`, by re-assignment or
by `fit` -- and numba's kernels are loaded ahead by the warm-up thread."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import vqlab
import vqlab.kernels as K
import vqlab.kernels.checked as checked
from vqlab.kernels.backends import numba_usable
from vqlab.methods.vq import VQConv2d, VQLinear

pytestmark = pytest.mark.skipif(not numba_usable(), reason="the dense backend needs numba")


@pytest.fixture(params=["dense", "auto"])
def backend(request):
    """"dense" pinned, or "auto" (which picks dense for these batches of 64 on any machine measured)."""
    K.clear_caches()
    K.set_backend("dense" if request.param == "dense" else None)
    yield request.param
    K.set_backend(None)
    K.clear_caches()


def _linear():
    torch.manual_seed(0)
    return VQLinear.from_float(nn.Linear(48, 40), k=16, d=4).eval()


def _conv():
    torch.manual_seed(0)
    return VQConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1), k=16, d=2).eval()


def _reference(layer, x):
    with torch.no_grad():
        w = layer.dequantize()
        if isinstance(layer, nn.Linear) or not hasattr(layer, "kernel_size"):
            return F.linear(x, w, layer.bias)
        return F.conv2d(layer.pad_input(x), w, layer.bias, layer.stride, layer.conv_padding, layer.dilation,
                        layer.groups)


def _input(layer):
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 48, generator=g) if not hasattr(layer, "kernel_size") else torch.randn(64, 6, 9, 9, generator=g)


def _same(layer, x):
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


def _dense_entries() -> int:
    return sum(1 for hit in checked._CACHE.values() for key in hit._store if str(key[0]).startswith("dense"))


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_the_weight_is_rebuilt_once_and_reused(make, backend):
    layer, rebuilt = make(), []
    x = _input(layer)
    real = K.backends.dequantize_checked

    def counting(*args, **kwargs):
        rebuilt.append(kwargs.get("temporary"))
        return real(*args, **kwargs)
    K.backends.dequantize_checked = counting
    try:
        for _ in range(3):
            _same(layer, x)
    finally:
        K.backends.dequantize_checked = real
    if backend == "dense" or any(v == "dense" for v in K.auto_choices().values()):
        assert rebuilt == [False] and _dense_entries() == 1


def _change_indices_in_place(layer):
    with torch.no_grad():
        layer.indices[0, :3] = (layer.indices[0, :3].long() + 5).remainder(16).to(layer.indices.dtype)


def _change_indices_through_numpy(layer):
    a = layer.indices.numpy()                       # no _version bump: only the bytes tell
    a[1, :2] = (a[1, :2].astype(int) + 7) % 16


def _assign_new_indices(layer):
    layer.indices = torch.randint(0, 16, layer.indices.shape, dtype=layer.indices.dtype,
                                  generator=torch.Generator().manual_seed(5))


def _load_state_dict(layer):
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.indices.copy_(torch.randint(0, 16, other.indices.shape, generator=torch.Generator().manual_seed(6)))
        other.codebook.weight.mul_(1.5)
    layer.load_state_dict(other.state_dict())


def _change_codebook_in_place(layer):
    with torch.no_grad():
        layer.codebook.weight[0, 0] += 0.25


def _change_codebook_through_numpy(layer):
    layer.codebook.weight.detach().numpy()[0, 1] -= 0.5


def _reassign(layer):
    with torch.no_grad():
        rows = layer.weight_to_rows(layer.dequantize()) + 0.3 * torch.randn(layer.code.shape,
                                                                           generator=torch.Generator().manual_seed(7))
    assert layer.reassign(rows) > 0


CHANGES = [_change_indices_in_place, _change_indices_through_numpy, _assign_new_indices, _load_state_dict,
           _change_codebook_in_place, _change_codebook_through_numpy, _reassign]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.lstrip("_") for c in CHANGES])
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_a_changed_code_is_never_served_a_stale_weight(make, change, backend):
    layer = make()
    x = _input(layer)
    _same(layer, x)                                  # the weight is cached now
    before = _reference(layer, x)
    change(layer)
    after = _reference(layer, x)
    assert not torch.allclose(before, after)         # the change matters to the output
    _same(layer, x)


def test_fit_then_eval_uses_the_trained_codebook(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 4))
    vqlab.quantize_(model, vqlab.VQConfig(k=8, d=2))
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(256, 1, 6, 6, generator=g), torch.randint(0, 4, (256,), generator=g))
    x = data.tensors[0][:64]
    model.eval()
    with torch.no_grad():
        first = model(x)
    vqlab.fit(model, data, epochs=1, lr=0.05, batch_size=32, progress=False)
    model.eval()
    K.set_backend("torch")
    with torch.no_grad():
        ref = model(x)
    K.set_backend("dense" if backend == "dense" else None)
    with torch.no_grad():
        y = model(x)
    assert not torch.allclose(first, ref, atol=1e-3)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_the_warm_up_thread_loads_every_kernel_ahead():
    code = ("import vqlab.kernels as K; s = K.warm.wait(600); print(s['state'], s['error'], len(s['kernels']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["done", "None", "13"]
    off = subprocess.run([sys.executable, "-c", "import vqlab.kernels as K; print(K.warm.status()['state'])"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "VQLAB_WARM": "0"})
    assert off.stdout.split() == ["not", "started"]


def test_plain_eval_calls_skip_the_custom_ops_dispatch_and_its_dynamo_import():
    """The custom ops' dispatch imports torch._dynamo on its first call (1-2 s quiet, 15 s on a busy machine); a
    plain eager no-grad evaluation runs the same implementation without it, with the op's outputs."""
    code = ("import sys, torch, vqlab\n"
            "from vqlab.models import get_model\n"
            "torch.manual_seed(0); m = get_model('lenet5')\n"
            "vqlab.quantize_(m, vqlab.VQConfig(k=16, d=2), progress=False); m.eval()\n"
            "x = torch.randn(8, 1, 28, 28)\n"
            "with torch.no_grad(): y = m(x)\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no-dynamo')\n"
            "y2 = m(x)\n"                                              # with grad: through the custom ops
            "print(torch.equal(y, y2.detach()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["no-dynamo", "True"]
