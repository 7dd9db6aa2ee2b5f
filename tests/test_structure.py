"""The layout the redesign of issue 24 promised, held as tests: the driver imports no method, one pair of quantized
layer classes, configs without targeting fields, one name per method, no private imports across modules, module
imports without cycles; and the public pieces that replaced private helpers (quantize_layer, set_submodule,
keep_first_last, the VQLinear / VQConv2d names, attributes read through to the code)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch
import torch.nn as nn

import vqlab
from vqlab.config import HANDLERS
from vqlab.layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from vqlab.methods.vq import VQCode, VQConv2d, VQLinear
from vqlab.methods.vq_simd import SimdCode

ROOT = pathlib.Path(vqlab.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(imported vqlab module, imported names) of every `from ... import ...` in a file."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if target.startswith("vqlab"):
                out.append((target, [a.name for a in node.names]))
    return out


FILES = sorted(p for p in ROOT.rglob("*.py"))


def test_the_driver_imports_no_method():
    targets = [t for t, _ in _imports(ROOT / "quantize.py")]
    assert targets and not any(t.startswith("vqlab.methods") for t in targets), targets


def test_no_private_name_is_imported_across_modules():
    bad = [(_module_name(p), t, n) for p in FILES for t, names in _imports(p) for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_module_imports_have_no_cycle():
    graph = {}
    for p in FILES:
        mod = _module_name(p)
        deps = set()
        for t, names in _imports(p, top_level_only=True):
            deps.add(t)
            deps.update(f"{t}.{n}" for n in names)
        graph[mod] = {d for d in deps if d in {_module_name(q) for q in FILES} and d != mod}
    # a package's __init__ imports its own modules: leave those edges out, they are the package's index
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not d.startswith(mod + ".")}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_one_pair_of_quantized_layer_classes():
    classes = {cls for p in FILES for cls in vars(__import__(_module_name(p), fromlist=["_"])).values()
               if inspect.isclass(cls) and issubclass(cls, QuantizedLayer) and cls.__module__.startswith("vqlab")}
    assert classes == {QuantizedLayer, QuantizedLinear, QuantizedConv2d}


def test_configs_carry_no_targeting_field_and_one_name_each():
    builtin = [c for c in HANDLERS if c.__module__.startswith("vqlab.")]
    assert {c.__name__ for c in builtin} >= {"VQConfig", "UniformConfig", "BinaryConfig", "ScalarConfig", "PQConfig",
                                            "RVQConfig", "LatticeConfig", "VQ4ALLConfig", "QAFConfig"}
    names = set()
    for cls in builtin:
        assert issubclass(cls, vqlab.QuantConfig)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert not fields & {"quantize_first_last", "report_status", "method"}, (cls, fields)
        assert cls.name and cls.name not in names
        names.add(cls.name)
    from vqlab.codes import CODES
    assert names <= set(CODES)                       # the config's name is its code's registry name


def test_quantize_layer_and_set_submodule_replace_the_private_helpers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    float_fc = model[2]
    q = vqlab.quantize_layer(float_fc, vqlab.VQConfig(k=4, d=4), "2")
    assert isinstance(q, VQLinear) and model[2] is float_fc                         # the float layer untouched
    vqlab.set_submodule(model, "2", q)
    assert model[2] is q
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\): d=3 does not divide in_features=16"):
        vqlab.quantize_layer(float_fc, vqlab.VQConfig(k=4, d=3), "2")
    with pytest.raises(TypeError, match="config must be one of"):
        vqlab.quantize_layer(float_fc, object())


def test_keep_first_last_is_the_default_filter():
    torch.manual_seed(0)
    a, b = vqlab.get_model("lenet5", input_size=8), vqlab.get_model("lenet5", input_size=8)
    b.load_state_dict(a.state_dict())
    ra = vqlab.quantize_(a, vqlab.VQConfig(k=8, d=2, iters=3), progress=False)
    rb = vqlab.quantize_(b, vqlab.VQConfig(k=8, d=2, iters=3), filter_fn=vqlab.keep_first_last(b), progress=False)
    quantized = lambda r: r.loc[r["status"] == "vq", "layer"].tolist()                   # noqa: E731
    assert quantized(ra) == quantized(rb) == ["features.3", "classifier.1", "classifier.3"]
    assert rb.set_index("layer").loc["features.0", "status"] == "skipped (filter_fn)"


def test_vq_names_are_the_quantized_layers_with_a_vq_code():
    lin = VQLinear(8, 4, k=4, d=2)
    conv = VQConv2d(4, 6, 3, padding=1, k=4, d=2)
    assert type(lin) is QuantizedLinear and type(conv) is QuantizedConv2d
    assert isinstance(lin, VQLinear) and not isinstance(lin, VQConv2d) and isinstance(conv, VQConv2d)
    assert isinstance(lin.code, VQCode) and conv.segment == "input"
    plain = QuantizedLinear(8, 4, code=vqlab.methods.uniform.UniformCode(4, 8, 8))
    assert not isinstance(plain, VQLinear)
    vqlab.pack_simd_(nn.Sequential(lin))
    assert isinstance(lin.code, SimdCode) and isinstance(lin, VQLinear)          # the simd layout is a VQ code too


def test_layer_reads_and_writes_the_code_attributes_it_lists():
    lin = VQLinear(8, 4, k=4, d=2)
    assert lin.codebook is lin.code.codebook and lin.k == 4 and lin.indices is lin.code.indices
    lin.backend = "torch"
    assert lin.code.backend == "torch" and "backend" not in lin.__dict__
    with pytest.raises(ValueError, match="indices hold values"):
        lin.indices = torch.full((4, 4), 9, dtype=torch.uint8)
    with pytest.raises(AttributeError):
        lin.not_an_attribute
