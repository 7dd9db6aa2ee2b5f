"""compressed_size: a hand count on a small model, shared codebooks once, packing and entropy coding."""
import lzma
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from vqlab.bits import ans_bytes, huffman_bytes
from vqlab.methods.vq import VQLinear
from vqlab.io import load as vqlab_load, save as vqlab_save
from vqlab.models import get_model
from vqlab.methods.vq import VQConfig
from vqlab.quantize import all_layers, quantize_
from vqlab.size import (LZMA_FILTERS, compressed_size, huffman_code_lengths, pack_indices, round_to_store_dtype_,
                        unpack_indices)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),       # 0: first layer, stays float
        nn.BatchNorm2d(4),                    # 1
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),        # 3: VQ K=16, d=4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),              # 5: VQ K=8, d=4
        nn.Linear(6, 3),                      # 6: last layer, stays float
    )


def test_hand_count_small_model():
    model = _small_model()
    quantize_(model, VQConfig(k=8, d=4), overrides={"3": VQConfig(k=16, d=4)}, progress=False)
    r = compressed_size(model)
    # conv 0 (float):  1*4*3*3 = 36 weights * 4 B                                    = 144
    # bn 1:            weight, bias, running_mean, running_var: 4 * 4 floats * 4 B = 64
    #                  num_batches_tracked: one int64                               =   8  -> 72
    # conv 3 (VQ):     8*4*3*3 = 288 weights / d=4 = 72 indices * log2(16)=4 bits = 288 bits = 36
    #                  codebook 16 * 4 float32 = 256;  bias 8 * 4 = 32                       -> 324
    # fc 5 (VQ):       6*128 = 768 weights / 4 = 192 indices * log2(8)=3 bits = 576 bits = 72
    #                  codebook 8 * 4 * 4 B = 128;  bias 6 * 4 = 24                          -> 224
    # fc 6 (float):    (6*3 + 3) * 4 B                                                       ->  84
    assert r.index_bytes == 36 + 72
    assert r.codebook_bytes == 256 + 128
    assert r.other_bytes == 144 + 72 + 32 + 24 + 84
    assert r.compressed_bytes == 144 + 72 + 324 + 224 + 84 == 848
    # float32 model: conv0 144, bn 64 + 8 (int64 counter stays 8 B), conv3 (288 + 8) * 4 = 1184,
    # fc5 (768 + 6) * 4 = 3096, fc6 84
    assert r.dense_bytes == 144 + 72 + 1184 + 3096 + 84 == 4580
    assert r.ratio == pytest.approx(4580 / 848)
    t = r.layers.set_index("layer")
    assert t.loc["3", "compressed_bytes"] == 324 and t.loc["5", "compressed_bytes"] == 224
    assert t.loc["1", "compressed_bytes"] == 72 and t.loc["5", "index_bits"] == 3
    assert int(r.layers["compressed_bytes"].sum()) == r.compressed_bytes
    assert int(r.layers["dense_bytes"].sum()) == r.dense_bytes


def test_dense_bytes_equal_the_float_model():
    model = _small_model()
    float_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    r0 = compressed_size(model)
    assert r0.dense_bytes == r0.compressed_bytes == float_bytes and r0.ratio == 1.0
    assert r0.huffman_bytes == r0.lzma_bytes == float_bytes   # no index streams to code
    quantize_(model, VQConfig(k=8, d=4), progress=False)
    assert compressed_size(model).dense_bytes == float_bytes


def test_shared_codebook_counted_once():
    model = _small_model()
    quantize_(model, VQConfig(k=8, d=4, codebook="shared"), progress=False)
    assert model[3].codebook is model[5].codebook
    r = compressed_size(model)
    assert r.codebook_bytes == 8 * 4 * 4                      # one (1, 8, 4) float32 codebook
    assert r.index_bytes == 72 * 3 // 8 + 192 * 3 // 8        # 27 + 72
    t = r.layers.set_index("layer")
    assert t.loc["3", "codebook_bytes"] == 128 and t.loc["5", "codebook_bytes"] == 0


def test_group_codebooks_and_dtype_are_counted():
    model = _small_model()
    quantize_(model, VQConfig(k=4, d=2, codebook="group", codebook_groups=2, codebook_dtype="float16"), progress=False)
    r = compressed_size(model)
    # conv 3: (2, 4, 2) fp16 = 32 B, 144 indices * 2 bits = 36 B;  fc 5: 32 B, 384 * 2 bits = 96 B
    assert r.codebook_bytes == 2 * 32 and r.index_bytes == 36 + 96


def test_huffman_and_lzma_figures():
    lin = nn.Linear(8, 2, bias=False)
    q = VQLinear.from_float(lin, k=4, d=2)
    with torch.no_grad():
        q.indices.copy_(torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]], dtype=torch.uint8))
    model = nn.Sequential(q)
    r = compressed_size(model)
    assert r.index_bytes == 2 and r.codebook_bytes == 4 * 2 * 4 and r.other_bytes == 0
    # histogram [4, 2, 1, 1] -> code lengths [1, 2, 3, 3] -> 4 + 4 + 3 + 3 = 14 bits = 2 B, + 4 B table
    assert huffman_code_lengths([4, 2, 1, 1]).tolist() == [1, 2, 3, 3]
    assert r.huffman_bytes == 32 + 2 + 4
    stream = pack_indices(q.indices, 2)
    assert stream == bytes([0b00000001, 0b00011011])
    assert r.lzma_bytes == 32 + len(lzma.compress(stream, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))


def test_huffman_lengths_properties():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=256)
    counts[:10] = 0
    lengths = huffman_code_lengths(counts)
    assert (lengths[:10] == 0).all() and (lengths[10:] > 0).all()
    assert sum(2.0 ** -lengths[10:]) == pytest.approx(1.0)          # a complete prefix code (Kraft equality)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    avg = (p * lengths).sum()
    assert entropy <= avg < entropy + 1                             # Huffman's optimality bounds
    assert huffman_code_lengths([0, 5, 0]).tolist() == [0, 1, 0]


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 9, 12, 16])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    n = 1001
    v = torch.randint(0, 2 ** bits, (n,), generator=g)
    b = pack_indices(v, bits)
    assert len(b) == -(-n * bits // 8)
    assert torch.equal(unpack_indices(b, bits, n), v)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\*\*2\)"):
        pack_indices(torch.tensor([0, 4]), 2)


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Flatten())])
def test_model_without_tensors_is_a_clear_error(model):
    with pytest.raises(ValueError, match=rf"the {type(model).__name__} model has no parameters or buffers"):
        compressed_size(model)


# ---------------------------------------------------------------- storage dtype and the ANS figure

def _lenet_k16_d2():
    torch.manual_seed(0)
    model = get_model("lenet5")
    quantize_(model, VQConfig(k=16, d=2, iters=5), progress=False)
    return model.eval()


def test_store_dtype_float16_hand_count_lenet5():
    model = _lenet_k16_d2()
    r = compressed_size(model, store_dtype=torch.float16)
    # conv1 (float):  8*1*5*5 = 200 weights + 8 biases = 208 elements * 2 B                          =   416
    # conv2 (VQ):     16*8*5*5 = 3200 weights / d=2 = 1600 indices * 4 bits = 800;  codebook 16*2 * 2 B = 64;
    #                 bias 16 * 2 B = 32
    # fc1 (VQ):       120*400 / 2 = 24000 indices * 4 bits = 12000;  codebook 64;  bias 120 * 2 B = 240
    # fc2 (VQ):       84*120 / 2 = 5040 indices * 4 bits = 2520;  codebook 64;  bias 84 * 2 B = 168
    # fc3 (float):    10*84 + 10 = 850 elements * 2 B                                                 =  1700
    assert r.index_bytes == 800 + 12000 + 2520 == 15320
    assert r.codebook_bytes == 3 * 64
    assert r.other_bytes == 416 + 32 + 240 + 168 + 1700 == 2556
    assert r.compressed_bytes == 18068 and r.store_dtype == torch.float16
    assert r.dense_bytes == compressed_size(model).dense_bytes == 4 * (208 + 3216 + 48120 + 10164 + 850)
    r32 = compressed_size(model)
    assert r32.compressed_bytes == 15320 + 2 * (192 + 2556)            # float32: every float at 4 bytes
    assert compressed_size(model, store_dtype="bfloat16").compressed_bytes == 18068
    # the entropy-coded figures keep the same float bytes: only the index streams differ
    assert r.huffman_bytes - r.compressed_bytes == r32.huffman_bytes - r32.compressed_bytes
    assert r.ans_bytes - r.compressed_bytes == r32.ans_bytes - r32.compressed_bytes
    assert r.lzma_bytes - r.compressed_bytes == r32.lzma_bytes - r32.compressed_bytes


def test_store_dtype_none_and_float32_leave_a_float32_model_as_it_is():
    model = _small_model()
    quantize_(model, VQConfig(k=8, d=4), overrides={"3": VQConfig(k=16, d=4)}, progress=False)
    base = compressed_size(model)
    for s in (None, "float32", torch.float32):
        r = compressed_size(model, store_dtype=s)
        assert (r.compressed_bytes, r.huffman_bytes, r.ans_bytes, r.lzma_bytes) == \
            (base.compressed_bytes, base.huffman_bytes, base.ans_bytes, base.lzma_bytes) == (848, *base.summary()["bytes"][2:])
    # float16: every float element at 2 bytes; num_batches_tracked (int64) and the indices unchanged
    r = compressed_size(model, store_dtype="float16")
    assert r.compressed_bytes == 848 - (144 + 64 + 384 + 32 + 24 + 84) // 2
    assert r.layers.set_index("layer").loc["1", "other_bytes"] == 32 + 8


def test_a_float16_model_is_unchanged_by_store_dtype():
    model = _small_model().half()
    base = compressed_size(model)
    assert compressed_size(model, store_dtype=torch.float16).compressed_bytes == base.compressed_bytes
    assert compressed_size(model, store_dtype="bfloat16").compressed_bytes == base.compressed_bytes  # not wider
    before = {k: v.clone() for k, v in model.state_dict().items()}
    round_to_store_dtype_(model, "bfloat16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", ["float8", "half", torch.int8, torch.float64, 16, "int64"])
def test_bad_store_dtype_names_the_value_and_the_allowed_names(bad):
    match = r"store_dtype must be None or one of \['bfloat16', 'float16', 'float32'\].*got " + re.escape(repr(bad))
    with pytest.raises(ValueError, match=match):
        compressed_size(_small_model(), store_dtype=bad)
    with pytest.raises(ValueError, match="store_dtype must be None or one of"):
        round_to_store_dtype_(_small_model(), bad)


def test_round_to_store_dtype_rounds_stored_floats_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 8))
    quantize_(model, VQConfig(k=16, d=4, reassign_every=5), filter_fn=all_layers, progress=False)
    with torch.no_grad():
        model[1].running_mean.normal_()
    latents = {n: t.detach().clone() for n, t in model.named_parameters() if n.endswith("latent")}
    assert len(latents) == 2
    indices = model[0].indices.clone()
    assert round_to_store_dtype_(model, torch.float16) is model
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("latent"):
            assert torch.equal(t.detach(), latents[name])             # training-only: untouched
        elif t.is_floating_point():
            assert t.dtype == torch.float32 and torch.equal(t, t.half().float()), name
    assert torch.equal(model[0].indices, indices) and model[1].num_batches_tracked.dtype == torch.int64
    once = {k: v.clone() for k, v in model.state_dict().items()}
    round_to_store_dtype_(model, "float16")                           # idempotent
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    # a value beyond float16's range: a clear error, and nothing rounded
    with torch.no_grad():
        model[2].bias[3] = 1e6
        model[2].bias[4] = 0.1
    with pytest.raises(ValueError, match=r"'2\.bias' holds 1e\+06, beyond the range of float16 \(largest finite 65504\)"):
        round_to_store_dtype_(model, torch.float16)
    assert float(model[2].bias.detach()[4]) == float(torch.tensor(0.1)) != float(torch.tensor(0.1).half())
    round_to_store_dtype_(model, torch.bfloat16)                      # bfloat16 holds 1e6 (rounded)
    assert float(model[2].bias.detach()[3]) == float(torch.tensor(1e6).bfloat16())


def test_ans_figure_report_columns_and_summary():
    lin = nn.Linear(64, 16, bias=False)
    q = VQLinear.from_float(lin, k=16, d=2)
    g = np.random.default_rng(0).geometric(0.4, q.indices.shape) - 1
    with torch.no_grad():
        q.indices.copy_(torch.from_numpy(np.minimum(g, 15)))
    model = nn.Sequential(q)
    r = compressed_size(model)
    assert r.layers["ans_index_bytes"].tolist() == [ans_bytes(q.indices, 16)]
    assert r.ans_bytes == r.compressed_bytes - r.index_bytes + ans_bytes(q.indices, 16)
    assert r.ans_bytes < r.huffman_bytes == r.compressed_bytes - r.index_bytes + huffman_bytes(q.indices, 16)
    assert r.ans_ratio == pytest.approx(r.dense_bytes / r.ans_bytes)
    s = r.summary().set_index("coding")
    assert list(s.index) == ["float32", "packed", "huffman", "ans", "lzma"]
    assert s.loc["ans", "bytes"] == r.ans_bytes and s.loc["ans", "ratio"] == pytest.approx(r.ans_ratio)
    assert list(r.layers.columns).index("ans_index_bytes") == list(r.layers.columns).index("huffman_index_bytes") + 1


def test_ans_figure_of_a_float_model_is_its_size():
    model = _small_model()
    r = compressed_size(model)
    assert r.ans_bytes == r.compressed_bytes and (r.layers["ans_index_bytes"] == 0).all()


def test_a_rounded_model_carries_its_storage_dtype(tmp_path):
    """What round_to_store_dtype_ (and vqlab.compress) returns counts and saves at that dtype by default."""
    torch.manual_seed(0)
    model = get_model("lenet5", input_size=8)
    quantize_(model, VQConfig(k=16, d=2, iters=3), progress=False)
    plain = compressed_size(model).compressed_bytes
    round_to_store_dtype_(model, "float16")
    assert compressed_size(model).compressed_bytes == compressed_size(model, store_dtype="float16").compressed_bytes
    assert compressed_size(model).compressed_bytes < plain
    a = vqlab_save(model, tmp_path / "a.vqz")
    b = vqlab_save(model, tmp_path / "b.vqz", store_dtype="float16")
    assert a == b and compressed_size(vqlab_load(tmp_path / "a.vqz")).ratio == compressed_size(model).ratio
    assert compressed_size(model, store_dtype="float32").compressed_bytes == plain      # asked for: as asked
