"""A VQ model runs in a child made by fork() after it ran in the parent (multiprocessing's default start method
on Linux, DataLoader workers): numba's threading layer is a fork-safe one, or the child runs the reference.

Each case runs in a fresh interpreter with a time limit, so a killed or hanging child fails the test instead of
the test session.  The children call torch.set_num_threads(1) first, as DataLoader workers do: torch's own GNU
OpenMP (pip wheels) hangs a forked child in any multi-threaded op once the parent used its thread team, with or
without vqlab.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

_SETUP = """
import os, sys, torch, vqlab
from vqlab import VQConfig, get_model, quantize_
torch.manual_seed(0)
m = get_model("lenet5", input_size=8)
quantize_(m, VQConfig(k=16, d=2), progress=False)
m.eval()
x = torch.randn(64, 1, 8, 8)
with torch.no_grad():
    y = m(x)
    for layer in m.modules():
        if isinstance(layer, vqlab.VQLinear):
            layer.backend = "numba"
    y_numba = m(x)
assert torch.allclose(y, y_numba, atol=1e-5)
"""


def _run(body: str, env: dict | None = None, timeout: int = 240) -> str:
    code = textwrap.dedent(_SETUP) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}:\n{out[-3000:]}"
    return out


_WAIT = """
import signal, time
t0 = time.time()
while time.time() - t0 < 120:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.1)
else:
    os.kill(pid, signal.SIGKILL)
    sys.exit("the forked child hung")
sys.exit(0 if status == 0 else f"the forked child ended with wait status {status}")
"""

_FORK = """
import numba
print("layer", numba.threading_layer())
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    ok = False
    try:
        with torch.no_grad():
            ok = torch.allclose(m(x), y_numba, atol=1e-5) and torch.allclose(m(x[:1]), y_numba[:1], atol=1e-5)
    finally:
        os._exit(0 if ok else 3)
""" + _WAIT


def test_forked_child_runs_the_vq_model():
    out = _run(_FORK)
    assert "layer omp" not in out                      # vqlab chose a fork-safe layer


def test_forked_child_of_an_openmp_process_runs_the_reference():
    """With numba's GNU OpenMP layer forced, the child does not launch numba's kernels (numba would kill it)."""
    out = _run(_FORK, env={"NUMBA_THREADING_LAYER": "omp"})
    assert "layer omp" in out


def test_fork_pool_maps_vq_inference():
    _run("""
import multiprocessing as mp

def infer(i):
    with torch.no_grad():
        return m(x[i:i + 8]).sum().item()

with mp.get_context("fork").Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
    got = pool.map_async(infer, range(0, 64, 8)).get(timeout=120)
want = [y_numba[i:i + 8].sum().item() for i in range(0, 64, 8)]
assert all(abs(a - b) < 1e-3 for a, b in zip(got, want)), (got, want)
""")


def test_workqueue_layer_is_entered_by_one_thread_at_a_time():
    """Under "workqueue" two threads inside a parallel kernel abort the process: vqlab serialises its calls."""
    _run("""
import threading
errors = []

def work():
    try:
        for _ in range(30):
            with torch.no_grad():
                assert torch.allclose(m(x), y_numba, atol=1e-5)
    except BaseException as e:
        errors.append(e)

ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
""", env={"NUMBA_THREADING_LAYER": "workqueue"})


def test_where_numba_may_not_run_every_backend_runs_the_reference(monkeypatch):
    """What a child forked from an OpenMP process sees: no exact native backend; "auto" (also with "simd"
    registered, which auto never picks) and "numba" run the reference, training's codebook gradient too."""
    import torch
    from vqlab.kernels import backends, dequantize, vq_matmul

    monkeypatch.setattr(backends, "_FORKED_FROM_OMP", [True])
    torch.manual_seed(0)
    book, idx, x = torch.randn(16, 2), torch.randint(0, 16, (24, 8), dtype=torch.uint8), torch.randn(5, 16)
    want = x @ dequantize(book, idx).T
    for backend in ("auto", "numba", "dense"):
        assert torch.allclose(vq_matmul(x, book, idx, backend=backend), want, atol=1e-5)
    book.requires_grad_(True)
    dequantize(book, idx).sum().backward()
    assert torch.equal(book.grad, torch.bincount(idx.long().reshape(-1), minlength=16).float()[:, None].expand(16, 2))


_PACKED_FORK = """
torch.set_num_threads(2)                      # the parent splits the batch over vqlab's two pool threads
c = get_model("cnn", input_size=8)
quantize_(c, VQConfig(k=16, d=2), progress=False)
report = vqlab.pack_simd_(c)
assert report["packed"].sum() >= 3, report
c.eval()
xc = torch.randn(8, 1, 8, 8)
with torch.no_grad():
    yc, yc1 = c(xc), c(xc[:1])
print("native", vqlab.kernels.simd.native_isa())
pid = os.fork()
if pid == 0:
    torch.set_num_threads(CHILD_THREADS)
    ok = False
    try:
        with torch.no_grad():                # the parent's cached call plans, a new pool in the child
            ok = torch.equal(c(xc), yc) and torch.equal(c(xc[:1]), yc1) and torch.equal(c(xc), yc)
    finally:
        os._exit(0 if ok else 3)
""" + _WAIT


def test_forked_child_runs_packed_convolutions_with_the_parents_outputs():
    """Packed (simd) convolutions and linears planned and run on two threads in the parent give the same outputs
    in a forked child (one thread, as a DataLoader worker): the parent's pool threads are not the child's."""
    out = _run(_PACKED_FORK.replace("CHILD_THREADS", "1"))
    assert "native" in out


_PACKED_LAYERS_FORK = """
torch.set_num_threads(2)
c = get_model("cnn", input_size=8)
quantize_(c, VQConfig(k=16, d=2), progress=False)
vqlab.pack_simd_(c)
c.eval()
seen = []
convs = [m for m in c.modules() if isinstance(getattr(m, "code", None), vqlab.SimdConvCode)]
assert len(convs) >= 2, convs
hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))) for m in convs]
with torch.no_grad():
    c(torch.randn(8, 1, 8, 8))
for h in hooks:
    h.remove()
pid = os.fork()
if pid == 0:
    ok = False                                # two threads: the batch split over a pool made in the child
    try:
        with torch.no_grad():
            ok = all(torch.equal(m(i), o) for m, i, o in seen) and all(torch.equal(m(i), o) for m, i, o in seen)
    finally:
        os._exit(0 if ok else 3)
""" + _WAIT


def test_forked_child_on_two_threads_runs_packed_convolutions():
    """The packed convolutions alone (no torch op that would use torch's OpenMP team, which hangs a forked
    child on two threads with or without vqlab) on two threads in a forked child: the parent's cached two-part
    call plans, a fresh pool; the outputs equal the parent's."""
    _run(_PACKED_LAYERS_FORK)
