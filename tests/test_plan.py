"""Call plans (issue 25, no per-call overhead): a quantized layer's eval call reuses what its first call decided,
gives the full call's outputs bit for bit, and re-plans whenever anything the plan rests on changed -- indices or
codebook rewritten behind torch's back, a tensor swapped, the backend pinned, the thread count, a fork."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import vqlab
import vqlab.kernels as K
import vqlab.kernels.plan as plan
from vqlab.kernels.backends import numba_usable
from vqlab.methods.vq import VQConv2d, VQLinear

pytestmark = pytest.mark.skipif(not numba_usable(), reason="native backends need numba")


@pytest.fixture(params=["auto", "dense", "numba"])
def backend(request):
    K.clear_caches()
    K.set_backend(None if request.param == "auto" else request.param)
    yield request.param
    K.set_backend(None)
    K.clear_caches()


@pytest.fixture
def full_calls(monkeypatch):
    """Counts the calls that went past a plan to the full vq_matmul / vq_conv2d."""
    count = {"n": 0}
    for name in ("vq_matmul", "vq_conv2d"):
        real = getattr(plan, name)

        def counting(*a, _real=real, **k):
            count["n"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(plan, name, counting)
    return count


def _layers():
    torch.manual_seed(0)
    return [VQLinear.from_float(nn.Linear(48, 40), k=16, d=4).eval(),
            VQConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1, stride=2), k=16, d=2).eval()]


def _x(layer, batch=1):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 48, generator=g) if not hasattr(layer, "kernel_size") else torch.randn(batch, 6, 9, 9, generator=g)


def _full(layer, x):
    """The full call, no plan: vq_matmul / vq_conv2d plus bias as the code calls them."""
    code = layer.code
    if not hasattr(layer, "kernel_size"):
        return vqlab.kernels.vq_matmul(x, code.codebook.weight, code.indices, code.backend) + layer.bias
    kh, kw = layer.kernel_size
    return vqlab.kernels.vq_conv2d(x, code.codebook.weight, code.indices, (layer.out_channels, layer.cin_pad, kh, kw),
                                   layer.stride, layer.conv_padding, layer.dilation, layer.groups, layer.segment,
                                   layer.bias, code.backend)


@pytest.mark.parametrize("batch", [1, 5])
def test_a_planned_call_equals_the_full_call_bit_for_bit(backend, full_calls, batch):
    for layer in _layers():
        x = _x(layer, batch)
        with torch.no_grad():
            first = layer(x)
            n = full_calls["n"]
            again = [layer(x) for _ in range(3)]
            assert full_calls["n"] == n, f"{type(layer).__name__}: a repeated call did not use its plan"
            full = _full(layer, x)
        for y in again:
            assert torch.equal(y, first) and torch.equal(y, full)


def test_a_three_dim_input_uses_the_plan_and_keeps_its_shape(full_calls):
    layer = _layers()[0]
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        y0 = layer(x)
        n = full_calls["n"]
        y1 = layer(x)
    assert full_calls["n"] == n and y1.shape == (2, 3, 40) and torch.equal(y0, y1)


def _rewrite_index(layer):
    idx = layer.code.indices.numpy()            # behind torch's back: no version bump
    idx[0, 0] = (int(idx[0, 0]) + 1) % layer.code.k


def _rewrite_book(layer):
    layer.code.codebook.weight.detach().numpy()[..., 0, :] += 0.5


def _swap_indices(layer):
    layer.code.indices = layer.code.indices.clone()
    _rewrite_index(layer)


def _load_state(layer):
    other = copy.deepcopy(layer)
    _rewrite_book(other)
    _rewrite_index(other)
    layer.load_state_dict(other.state_dict())


@pytest.mark.parametrize("change", [_rewrite_index, _rewrite_book, _swap_indices, _load_state])
def test_a_change_behind_the_plan_is_seen_at_the_next_call(backend, change):
    for layer in _layers():
        x = _x(layer, 4)
        with torch.no_grad():
            before = layer(x)
            layer(x)
            change(layer)
            after = layer(x)
            ref = _full(layer, x)
        assert torch.equal(after, ref), f"{change.__name__}: {type(layer).__name__} served its old plan"
        assert not torch.equal(after, before)


def test_an_index_out_of_range_written_behind_the_plan_is_refused_on_the_next_call():
    for layer in _layers():
        x = _x(layer)
        with torch.no_grad():
            layer(x)
            layer(x)
            layer.code.indices.numpy()[0, 0] = layer.code.k
            with pytest.raises(ValueError, match="out of range|outside|>= K|\\[0, "):
                layer(x)


def test_data_swapped_to_another_dtype_replans_instead_of_comparing_the_old_bytes(full_calls):
    layer = _layers()[0]
    x = _x(layer)
    with torch.no_grad():
        y = layer(x)
        layer(x)
        n = full_calls["n"]
        layer.code.indices.data = layer.code.indices.data.to(torch.int32)    # same object and values, 4x the bytes
        assert torch.equal(layer(x), y)
    assert full_calls["n"] == n + 1


def test_pinning_another_backend_or_changing_threads_replans(full_calls):
    layer = _layers()[0]
    x = _x(layer, 8)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            layer(x)
            n = full_calls["n"]
            K.set_backend("numba")
            layer(x)
            assert full_calls["n"] == n + 1
            torch.set_num_threads(1 if threads != 1 else 2)
            layer(x)
            assert full_calls["n"] == n + 2
    finally:
        K.set_backend(None)
        torch.set_num_threads(threads)


def test_grad_and_flop_counting_calls_bypass_the_plan(full_calls):
    from torch.utils.flop_counter import FlopCounterMode
    layer = _layers()[0]
    x = _x(layer)
    with torch.no_grad():
        layer(x)
        layer(x)
        n = full_calls["n"]
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert full_calls["n"] == n + 1 and counter.get_total_flops() > 0
    y = layer(x.requires_grad_(True))                      # grad enabled, x needs grad: the custom op
    y.sum().backward()
    assert x.grad is not None and full_calls["n"] == n + 2


def test_clear_caches_forgets_plans(full_calls):
    layer = _layers()[0]
    x = _x(layer)
    with torch.no_grad():
        layer(x)
        n = full_calls["n"]
        K.clear_caches()
        layer(x)
    assert full_calls["n"] == n + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_does_not_run_its_parents_plan():
    code = """
import os, torch, torch.nn as nn
import vqlab.kernels.plan as plan
from vqlab.methods.vq import VQLinear
torch.set_num_threads(1)   # as in the child: torch's GNU OpenMP hangs a forked child after a multi-threaded op
torch.manual_seed(0)
layer = VQLinear.from_float(nn.Linear(48, 40), k=16, d=4).eval()
x = torch.randn(2, 48)
with torch.no_grad():
    y = layer(x); layer(x)
assert plan._PLANS[layer.code].key[-1] == os.getpid()
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    with torch.no_grad():
        z = layer(x)   # numba may be unusable in a fork (the reference then runs, with no plan)
        p = plan._PLANS.get(layer.code)
        ok = torch.allclose(z, y, atol=1e-5) and (p is None or p.key[-1] == os.getpid())
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------- packed layers (pack_simd_): the small-call path

from vqlab.kernels import dequantize, simd  # noqa: E402
from vqlab.methods import vq_simd  # noqa: E402

needs_native = pytest.mark.skipif(simd.native_isa() is None, reason="no native simd kernel here")


def _packed(k=16):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))
    vqlab.quantize_(m, vqlab.VQConfig(k=k, d=2), filter_fn=vqlab.all_layers, progress=False)
    vqlab.pack_simd_(m)
    return m.eval()


@needs_native
@pytest.mark.parametrize("batch", [1, 3, 64, 200])        # 200: one C call against the general path's chunks of 64
def test_a_packed_layers_small_call_equals_the_general_path_bit_for_bit(batch, monkeypatch):
    m = _packed()
    x = torch.randn(batch, 96)
    with torch.no_grad():
        fast = [m(x) for _ in range(3)]
        monkeypatch.setattr(simd, "packed_small_call", lambda *a, **k: None)     # the general path only
        vq_simd._FAST.clear()
        general = m(x)
    assert all(torch.equal(y, general) for y in fast)


@needs_native
def test_a_packed_layers_codebook_change_is_seen_and_a_nan_runs_the_reference():
    m = _packed()
    layer, x = m[0], torch.randn(2, 96)
    with torch.no_grad():
        m(x)
        book = layer.code.codebook.weight
        book.detach().numpy()[0, 3, :] += 1.0                 # behind torch's back
        y = layer(x)
        ref = x @ dequantize(book, layer.code.unpack()).T + layer.bias
        assert (y - ref).abs().max() < 6 * 0.05 * ref.abs().max()          # the kernel's approximation, new book
        book.detach().numpy()[0, 5, 0] = float("nan")         # an unused-or-not NaN: the exact reference runs
        y = layer(x)
        ref = x @ dequantize(book, layer.code.unpack()).T + layer.bias
        assert torch.equal(torch.isnan(y), torch.isnan(ref))


@needs_native
def test_a_packed_nibble_at_or_above_k_is_refused_on_the_next_small_call():
    m = _packed(k=11)
    x = torch.randn(1, 96)
    with torch.no_grad():
        m(x)
        m(x)
        m[0].code.packed.numpy().reshape(-1)[0] |= 0x0F       # nibble 15 >= K = 11
        with pytest.raises(ValueError):
            m(x)


def test_a_snapshot_never_compares_a_tensor_off_the_cpu_by_pointer():
    from vqlab.kernels.checked import Snapshot
    t = torch.randn(16, 2)
    snap = Snapshot(t)
    assert snap.same(t) and snap.same(t.clone())
    assert not snap.same(t.to("meta"))                   # a device pointer never reaches memcmp
    assert not snap.same(t.double()) and not snap.same(t.t()) and not snap.same(t[:8])
    t[0, 0] += 1
    assert not snap.same(t)


def test_a_bias_replaced_through_data_is_used_at_the_next_call():
    for layer in _layers():
        x = _x(layer, 2)
        with torch.no_grad():
            layer(x)
            layer(x)
            layer.bias.data = layer.bias.data + 1.0            # the same Parameter object, new storage
            assert torch.equal(layer(x), _full(layer, x))
