"""Universal randomized lattice quantization (vqlab.methods.lattice): nearest points of Z/D4/E8, the dither,
the universal coding of the points and the method end to end through quantize_, compressed_size, save/load
and count_flops."""
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import vqlab
from vqlab.methods import lattice as lat
from vqlab.methods.lattice import (LatticeCode, LatticeConfig, decode_ints, encode_ints, generator_matrix,
                                   nearest_point, voronoi_dither)


def _minimal_vectors(lattice):
    dim = lat.LATTICES[lattice]
    vs = []
    for i, j in itertools.combinations(range(dim), 2):          # +-e_i +-e_j
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * dim
            v[i], v[j] = si, sj
            vs.append(v)
    if lattice == "E8":                                          # (+-1/2)^8, even number of minus signs
        for signs in itertools.product((0.5, -0.5), repeat=8):
            if sum(s < 0 for s in signs) % 2 == 0:
                vs.append(list(signs))
    return torch.tensor(vs, dtype=torch.float64)


def _is_lattice_point(p, lattice):
    p = p.double()
    if lattice in ("Z", "D4"):
        ok = (p == p.round()).all(1)
        return ok & (p.sum(1) % 2 == 0) if lattice == "D4" else ok
    twice = 2 * p
    ints = (twice == twice.round()).all(1)
    same = ((twice % 2) == (twice[:, :1] % 2)).all(1)
    return ints & same & (p.sum(1) % 2 == 0)


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_nearest_point_is_a_lattice_point_no_farther_than_its_neighbours(lattice):
    dim = lat.LATTICES[lattice]
    x = 3 * torch.randn(2000, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = nearest_point(x, lattice)
    assert p.shape == x.shape and p.dtype == x.dtype and _is_lattice_point(p, lattice).all()
    d = (x - p).pow(2).sum(1)
    neighbours = _minimal_vectors(lattice) if lattice != "Z" else torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    assert len(neighbours) == {"Z": 2, "D4": 24, "E8": 240}[lattice]
    assert _is_lattice_point(neighbours, lattice).all()
    assert bool((neighbours.pow(2).sum(1) == (2 if dim > 1 else 1)).all())        # the minimal norm
    other = (x[:, None, :] - p[:, None, :] - neighbours[None]).pow(2).sum(2)       # (n, #neighbours)
    assert bool((d[:, None] <= other + 1e-12).all())
    # the generator's rows are lattice points and nearest_point fixes lattice points
    g = generator_matrix(lattice)
    assert _is_lattice_point(g, lattice).all()
    assert torch.equal(nearest_point(p, lattice), p)
    p32 = nearest_point(x.float(), lattice)                                   # float32 works too
    assert p32.dtype == torch.float32 and _is_lattice_point(p32, lattice).all()


def test_nearest_point_d4_equals_brute_force():
    rng = range(-3, 4)
    pts = torch.tensor([v for v in itertools.product(rng, repeat=4) if sum(v) % 2 == 0], dtype=torch.float64)
    x = (1.2 * torch.randn(500, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).clamp(-2.4, 2.4)
    brute = pts[(x[:, None, :] - pts[None]).pow(2).sum(2).argmin(1)]
    p = nearest_point(x, "D4")
    assert torch.allclose((x - p).pow(2).sum(1), (x - brute).pow(2).sum(1), atol=1e-12)
    assert (p == brute).all(1).float().mean() == 1.0           # ties have probability zero


def test_nearest_point_refuses_wrong_lattice_or_dim():
    with pytest.raises(ValueError, match=r"lattice must be one of.*'A2'"):
        nearest_point(torch.zeros(3, 2), "A2")
    with pytest.raises(ValueError, match=r"E8.*\(n, 8\).*\(3, 4\)"):
        nearest_point(torch.zeros(3, 4), "E8")
    with pytest.raises(ValueError, match=r"D4.*\(n, 4\)"):
        nearest_point(torch.zeros(4), "D4")


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_dither_is_seeded_and_uniform_over_the_voronoi_cell(lattice):
    dim = lat.LATTICES[lattice]
    u = voronoi_dither(4000, lattice, seed=5)
    assert u.shape == (4000, dim) and u.dtype == torch.float64
    assert torch.equal(u, voronoi_dither(4000, lattice, seed=5))
    assert not torch.equal(u, voronoi_dither(4000, lattice, seed=6))
    assert torch.equal(nearest_point(u, lattice), torch.zeros_like(u))              # inside the Voronoi cell
    assert u.mean(0).abs().max() < 0.05                                               # centred
    # second moment of the cell: G * V^(2/d) per dimension (Conway & Sloane: G(Z)=1/12, G(D4)=0.076603,
    # G(E8)=0.071682; volumes 1, 2, 1)
    expect = {"Z": 1 / 12, "D4": 0.076603 * math.sqrt(2), "E8": 0.071682}[lattice]
    assert u.pow(2).mean().item() == pytest.approx(expect, rel=0.05)


def test_varint_round_trip():
    v = np.array([0, 1, -1, 63, -64, 64, -65, 127, 128, 1000, -100000, 2 ** 40, -2 ** 40, 2 ** 62], dtype=np.int64)
    assert np.array_equal(decode_ints(encode_ints(v)), v)
    small = np.arange(-50, 50)
    assert len(encode_ints(small)) == 100 and np.array_equal(decode_ints(encode_ints(small)), small)
    assert decode_ints(b"").size == 0
    with pytest.raises(ValueError, match="truncated"):
        decode_ints(b"\x81")


@pytest.mark.parametrize("coder", ["lzma", "bz2"])
def test_coded_size_of_constant_and_uniform_streams(coder):
    n = 64 * 1024
    const = LatticeCode.from_weight(torch.zeros(64, 1024), "Z", 1.0, seed=0, coder=coder)
    assert torch.equal(const.points(), torch.zeros(64, 1024))
    assert const.stream.numel() < 0.002 * n + 64                  # ~0 bits per symbol
    for k in (16, 64):
        sym = np.random.default_rng(k).integers(-k // 2, k // 2, n)
        bits = 8 * len(lat._compress(encode_ints(sym), coder)) / n
        assert math.log2(k) * 0.98 < bits < math.log2(k) * BOUND[coder], (coder, k, bits)


BOUND = {"lzma": 1.10, "bz2": 1.15}


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_code_round_trip_error_and_rate(lattice):
    w = 0.05 * torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    mses, rates = [], []
    for step in (0.1, 0.04, 0.01):
        code = LatticeCode.from_weight(w, lattice, step, seed=11)
        code.validate()
        assert _is_lattice_point(code.points().reshape(-1, code.dim), lattice).all()
        r = code.rows()
        assert r.shape == w.shape and r.dtype == torch.float32
        assert torch.equal(r, LatticeCode.from_weight(w, lattice, step, seed=11).rows())       # deterministic
        # the decoder's dither is the encoder's: the error is a point of the Voronoi cell scaled by step
        err = ((w - r) / step).double().reshape(-1, code.dim)
        assert (nearest_point(err, lattice) == 0).float().mean() > 0.99
        # rebuilt from config + stream alone
        twin = LatticeCode.from_config(**code.config())
        twin.stream.copy_(code.stream)
        assert torch.equal(twin.rows(), r)
        mses.append((w - r).pow(2).mean().item())
        rates.append(code.describe()["bits_per_weight"])
        # dithered quantization error: uniform over the cell, independent of w
        g = {"Z": 1 / 12, "D4": 0.076603 * math.sqrt(2), "E8": 0.071682}[lattice]
        assert mses[-1] / step ** 2 == pytest.approx(g, rel=0.12)
    assert mses[0] > mses[1] > mses[2] and rates[0] < rates[1] < rates[2]


@pytest.mark.parametrize("lattice", ["D4", "E8"])
def test_symbols_are_a_bijection_onto_the_integers(lattice):
    dim = lat.LATTICES[lattice]
    scale = 2 if lattice == "E8" else 1
    g = torch.Generator().manual_seed(4)
    p = nearest_point(5 * torch.randn(3000, dim, generator=g, dtype=torch.float64), lattice)
    ints = torch.round(p * scale).long()
    assert torch.equal(lat._from_symbols(lat._to_symbols(ints, lattice), lattice), ints)
    sym = torch.randint(-9, 9, (3000, dim), generator=g)             # any symbols decode to lattice points
    q = lat._from_symbols(sym, lattice).double() / scale
    assert _is_lattice_point(q, lattice).all() and torch.equal(lat._to_symbols(lat._from_symbols(sym, lattice), lattice), sym)


@pytest.mark.parametrize("coder", ["lzma", "bz2", "huffman", "none"])
def test_a_short_or_damaged_stream_is_refused(coder):
    w = torch.randn(8, 16)
    code = LatticeCode.from_weight(w, "E8", 0.1, seed=0, coder=coder)
    code.validate()
    short = LatticeCode.from_config(**{**code.config(), "nbytes": code.stream.numel() - 1})
    short.stream.copy_(code.stream[:-1])
    with pytest.raises(ValueError):
        short.validate()
    longer = LatticeCode.from_config(**{**code.config(), "rows": 4})      # more coordinates than the layer has
    longer.stream.copy_(code.stream)
    with pytest.raises(ValueError, match="4 x 16"):
        longer.validate()
    extra = LatticeCode.from_config(**{**code.config(), "nbytes": code.stream.numel() + 1})
    extra.stream[:-1].copy_(code.stream)                                   # one byte after the stream's end
    with pytest.raises(ValueError):
        extra.validate()
    if coder != "none":
        bad = LatticeCode.from_config(**code.config())
        bad.stream.fill_(0xFF)
        with pytest.raises(ValueError):
            bad.validate()


def test_padding_and_cache_follow_the_stream():
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="5 rows of 9.*pad=True"):
        LatticeCode.from_weight(w, "E8", 0.1)
    code = LatticeCode.from_weight(w, "E8", 0.1, seed=1, pad=True)
    assert code.shape == (5, 9) and code.n_pad == 16 and code.points().shape == (5, 16)
    assert code.rows().shape == (5, 9) and (code.rows() - w).abs().max() < 0.2
    twin = LatticeCode.from_config(**code.config())
    twin.stream.copy_(code.stream)
    assert torch.equal(twin.rows(), code.rows())
    # the cache follows in-place changes of the stream (load_state_dict, copy_)
    other = LatticeCode.from_weight(w + 1, "E8", 0.1, seed=1, pad=True, coder="none")
    code2 = LatticeCode.from_weight(w, "E8", 0.1, seed=1, pad=True, coder="none")
    before = code2.rows().clone()
    code2.load_state_dict(other.state_dict())
    assert torch.equal(code2.rows(), other.rows()) and not torch.equal(code2.rows(), before)


def test_huffman_figure_is_near_the_symbol_entropy():
    w = 0.05 * torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    code = LatticeCode.from_weight(w, "Z", 0.01, seed=0)
    sym = code.symbols().reshape(-1).numpy()
    _, cnt = np.unique(sym, return_counts=True)
    p = cnt / cnt.sum()
    h_bytes = -(p * np.log2(p)).sum() * sym.size / 8
    size = code.size(set())
    assert h_bytes <= size.entropy_index_bytes <= 1.05 * h_bytes + (sym.max() - sym.min() + 1) + 8
    assert size.index_bytes == code.stream.numel() and size.other_bytes == 12


def test_config_is_validated():
    for kw, match in (({"lattice": "A2"}, "lattice"), ({"step": 0}, "step"), ({"step": float("nan")}, "step"),
                      ({"coder": "zip"}, "coder"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")):
        with pytest.raises(ValueError, match=match):
            LatticeConfig(**kw)
    cfg = LatticeConfig(lattice="E8")
    with pytest.raises(ValueError, match=r"layer 'fc'.*E8.*8.*3 rows of 12"):
        cfg.check(nn.Linear(12, 3), "fc")
    with pytest.raises(TypeError, match="layer 'bn'"):
        cfg.check(nn.BatchNorm2d(3), "bn")
    cfg.check(nn.Linear(16, 3), "fc")
    with pytest.raises(ValueError, match="multiple of 8"):
        LatticeCode.from_weight(torch.zeros(3, 12), "E8", 0.1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("coder", ["lzma", "bz2", "huffman"])
def test_quantize_size_save_load_flops_end_to_end(tmp_path, coder):
    model = _model()
    x = torch.randn(3, 1, 8, 8)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    report = vqlab.quantize_(model, LatticeConfig(lattice="E8", step=0.02, seed=7, coder=coder, pad=True),
                             filter_fn=vqlab.all_layers, progress=False).set_index("layer")
    assert all(isinstance(model[i].code, LatticeCode) for i in (0, 2, 4, 6))
    codes = {str(i): model[i].code for i in (0, 2, 4, 6)}
    assert len({c.seed for c in codes.values()}) == 4                   # per-layer dither seeds
    assert codes["4"].seed == lat.layer_seed(7, "4")
    for name, c in codes.items():
        assert report.loc[name, "method"] == "lattice" and report.loc[name, "setting"].startswith("E8 ")
        err = (model[int(name)].weight - dense[name]).pow(2).mean().item()
        assert err == pytest.approx(0.071682 * 0.02 ** 2, rel=0.3)

    # compressed_size counts the coded streams (+ 12 bytes side info per layer + float32 biases)
    size = vqlab.compressed_size(model)
    streams = sum(c.stream.numel() for c in codes.values())
    assert size.index_bytes == streams
    biases = 4 * (8 + 16 + 32 + 10)
    assert size.compressed_bytes == streams + 4 * 12 + biases
    assert size.dense_bytes == sum(p.numel() * 4 for p in _model().parameters())

    # save / load (no model=): the file holds the coded bytes; bit-exact rows and outputs
    before = {n: c.rows().clone() for n, c in codes.items()}
    path = tmp_path / "lattice.vqz"
    nbytes = vqlab.save(model, path)
    assert nbytes == os.path.getsize(path) and 0 < nbytes - size.compressed_bytes < 4096
    back = vqlab.load(path)
    for n, c in codes.items():
        bc = back[int(n)].code
        assert isinstance(bc, LatticeCode) and bc is not c and bc.seed == c.seed and bc.step == c.step
        assert torch.equal(bc.rows(), before[n])
    assert torch.equal(back(x), model(x))

    # FLOPs: a dense product, as FlopCounterMode counts it
    df = vqlab.count_flops(model, (3, 1, 8, 8))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(3, 1, 8, 8))
    assert df["vq_flops"].sum() == counter.get_total_flops() == df["dense_flops"].sum()


def test_first_last_rule_and_z_lattice_on_any_width():
    model = _model()
    report = vqlab.quantize_(model, LatticeConfig(lattice="Z", step=0.01), progress=False).set_index("layer")
    assert report["status"].tolist() == ["float (first conv)", "lattice", "lattice", "float (last linear)"]
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[2].code, LatticeCode)
    # D4/E8 refuse a layer whose rows are no multiple of the dimension before touching the model
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"layer '1'.*6 rows of 6"):
        vqlab.quantize_(m, LatticeConfig(lattice="D4"), progress=False)
    assert isinstance(m[1], nn.Linear)


def test_finetuned_codewords_train_save_and_count(tmp_path):
    model, plain = _model(), _model()
    cfg = dict(lattice="D4", step=0.05, seed=3, pad=True)
    vqlab.quantize_(model, LatticeConfig(**cfg, finetune=True), progress=False)
    vqlab.quantize_(plain, LatticeConfig(**cfg), progress=False)
    code = model[2].code
    assert code.finetune and isinstance(code.codewords, nn.Parameter) and code.describe()["K"] == len(code.codewords)
    assert torch.equal(code.rows(), plain[2].code.rows())               # codewords start at the lattice points
    assert len(code.codewords) == len(torch.unique(code.points().reshape(-1, 4), dim=0))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)))
    before = code.codewords.detach().clone()
    stream = code.stream.clone()
    vqlab.fit(model, data, epochs=1, batch_size=16, lr=1e-2, progress=False, device="cpu")
    assert not torch.equal(code.codewords, before) and torch.equal(code.stream, stream)   # the stream is fixed
    model.eval()
    size, plain_size = vqlab.compressed_size(model), vqlab.compressed_size(plain)
    books = sum(4 * model[i].code.codewords.numel() for i in (2, 4))
    assert size.codebook_bytes == books and size.compressed_bytes == plain_size.compressed_bytes + books
    path = tmp_path / "ft.vqz"
    assert 0 < vqlab.save(model, path) - size.compressed_bytes < 4096
    back = vqlab.load(path)
    assert torch.equal(back[2].code.codewords, code.codewords) and torch.equal(back[2].code.rows(), code.rows())
    assert torch.equal(back(x[:4]), model(x[:4]))
    bad = LatticeCode.from_config(**{**code.config(), "n_codewords": len(code.codewords) + 1})
    bad.stream.copy_(code.stream)
    with pytest.raises(ValueError, match="distinct lattice points"):
        bad.validate()


def test_inference_mode_codes_decode():
    with torch.inference_mode():
        code = LatticeCode.from_weight(torch.randn(4, 16), "E8", 0.1)
        r = code.rows()
        code.validate()
    assert torch.equal(code.rows(), r)


def test_huffman_coder_round_trip_sizes_and_damage():
    from vqlab.bits import huffman_decode, huffman_encode
    g = np.random.default_rng(0)
    for data in (b"", b"\x07" * 5000, g.integers(0, 16, 20000, dtype=np.uint8).tobytes(),
                 g.geometric(0.3, 30000).clip(1, 255).astype(np.uint8).tobytes(), bytes(range(256)) * 3):
        coded = huffman_encode(data)
        assert huffman_decode(coded, len(data)) == data
    # a constant stream: one bit per byte; 16 equiprobable values: 4 bits; a skewed one: near its entropy
    assert len(huffman_encode(b"\x07" * 8000)) == 132 + 1000
    uniform = g.integers(0, 16, 40000, dtype=np.uint8).tobytes()
    assert abs(8 * (len(huffman_encode(uniform)) - 132) / 40000 - 4.0) < 0.01
    skew = g.geometric(0.3, 40000).clip(1, 255).astype(np.uint8)
    p = np.bincount(skew) / len(skew)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= 8 * (len(huffman_encode(skew.tobytes())) - 132) / 40000 < entropy + 0.1
    # extreme skew: code lengths are limited to 15 bits and the round trip still holds
    fib = b"".join(bytes([i]) * int(1.6 ** i) for i in range(30))
    assert huffman_decode(huffman_encode(fib), len(fib)) == fib
    coded = huffman_encode(uniform)
    for bad, what in ((coded[:100], "header"), (coded[:-1], "truncated"), (coded + b"\0", "after its end"),
                      (coded[:4] + b"\x11" * 128 + coded[132:], "prefix code")):
        with pytest.raises(ValueError, match=what):
            huffman_decode(bad, 40000)
    with pytest.raises(ValueError, match="more than 100"):
        huffman_decode(coded, 100)


# ---------------------------------------------------------------- issue 27: large inputs, tiny steps, bombs

@pytest.mark.parametrize("lattice", ["D4", "E8"])
def test_nearest_point_of_large_inputs_is_a_lattice_point_in_every_dtype(lattice):
    """Issue 27 item 4: float32 inputs near 2**24 got their parity summed in float32 and came back off the lattice."""
    dim = lat.LATTICES[lattice]
    g = torch.Generator().manual_seed(0)
    for top in (2.0 ** 10, 2.0 ** 21, 2.0 ** 22 - 8):
        x = (torch.rand(500, dim, generator=g, dtype=torch.float64) - 0.5) * 2 * top
        x[:, 0] = top - torch.rand(500, generator=g, dtype=torch.float64) * 4
        x32 = x.float()
        p32 = nearest_point(x32, lattice)
        assert p32.dtype == torch.float32 and bool(_is_lattice_point(p32, lattice).all())
        assert torch.equal(p32.double(), nearest_point(x32.double(), lattice))     # the same point as float64's
    x = torch.zeros(1, dim)
    x[0, 0], x[0, 1] = 2.0 ** 24 + 2, 0.6                                  # the input
    with pytest.raises(ValueError, match=r"\|x\| < 4194304 .*exact in torch.float32.*float64"):
        nearest_point(x, lattice)
    p = nearest_point(x.double(), lattice)
    assert p.dtype == torch.float64 and bool(_is_lattice_point(p, lattice).all())
    big = torch.full((1, dim), 2.0 ** 51)
    for bad in (big.double(), torch.full((1, dim), float("nan")), torch.full((1, dim), float("inf"))):
        with pytest.raises(ValueError, match="must be finite with"):
            nearest_point(bad, lattice)
    assert nearest_point(torch.tensor([[3] + [0] * (dim - 1)]), lattice).dtype == torch.float32   # integer input


@pytest.mark.parametrize("lattice, step", [("Z", 1e-25), ("D4", 1e-25), ("E8", 1e-25), ("E8", 1e-300), ("Z", 5e-324)])
def test_a_step_too_small_for_the_weights_is_refused_naming_the_layer(lattice, step):
    """Issue 27 item 3: a tiny valid step quantized without error and zeroed the model (w / step overflowed)."""
    torch.manual_seed(0)
    model = vqlab.get_model("lenet5", input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '.*': step=.* is too small for weights up to .* 2\*\*22"):
        vqlab.quantize_(model, LatticeConfig(lattice=lattice, step=step), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())    # nothing changed
    with pytest.raises(ValueError, match="too small"):
        LatticeCode.from_weight(torch.randn(4, 8), lattice, step)
    with pytest.raises(ValueError, match="NaN or Inf"):
        LatticeCode.from_weight(torch.tensor([[float("nan")] * 8]), lattice, 0.1)
    with pytest.raises(ValueError, match="beyond float32's range"):
        LatticeCode.from_weight(torch.randn(4, 8), lattice, 1e39)
    w = torch.randn(4, 8)
    code = LatticeCode.from_weight(w, lattice, float(w.abs().max()) / 2 ** 21)      # just inside: exact round trip
    assert (code.rows() - w).abs().max() <= 2 * float(w.abs().max()) / 2 ** 21


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_a_stream_with_coordinates_beyond_the_limit_is_refused(tmp_path, lattice):
    """A crafted stream of huge symbols (a point a 1e-25 step would give) is refused by validate, so by save and load."""
    dim = lat.LATTICES[lattice]
    code = LatticeCode.from_weight(torch.randn(2, 8), lattice, 0.1, coder="none")
    for top in (2 ** 23, 2 ** 40):
        sym = code.symbols().clone()
        sym[0, 0] = top
        raw = encode_ints(sym.numpy())
        bad = LatticeCode(2, 8, lattice, 0.1, 0, "none", len(raw))
        bad.stream.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        with pytest.raises(ValueError, match="beyond"):
            bad.validate()
    model = nn.Sequential(vqlab.layers.QuantizedLinear(8, 2, code=bad))
    with pytest.raises(ValueError, match="cannot save.*beyond"):
        vqlab.save(model, tmp_path / "bad.vqz")
    assert dim and not (tmp_path / "bad.vqz").exists()
