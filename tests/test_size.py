"""compressed_size: a hand count on a small model, shared codebooks once, packing and entropy coding."""
import lzma

import numpy as np
import pytest
import torch
import torch.nn as nn

from vqlab.layers import VQLinear
from vqlab.quantize import VQConfig, quantize_
from vqlab.size import LZMA_FILTERS, compressed_size, huffman_code_lengths, pack_indices, unpack_indices


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
    quantize_(model, VQConfig(k=4, d=2, codebook="group", groups=2, codebook_dtype="float16"), progress=False)
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
