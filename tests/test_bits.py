"""vqlab.bits' ANS coder: exact round trips, the packed + 1 byte bound, beating Huffman on skewed streams, the
header layout by hand, and every kind of damage refused with ValueError."""
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vqlab.bits import ans_bytes, ans_decode, ans_encode, huffman_bytes, pack_indices, packed_bytes


def _bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def _stream(kind: str, k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(0, k, n)
    return np.minimum(rng.geometric(0.3, n) - 1, k - 1)       # skewed: P(i) ~ 0.7**i


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("n", [0, 1, 7, 100_000])
@pytest.mark.parametrize("k", [2, 3, 16, 256, 4096])
def test_round_trip_is_exact(k, n, kind):
    x = _stream(kind, k, n, seed=k + n)
    data = ans_encode(x, k)
    y = ans_decode(data, n, k)
    assert y.dtype == np.int64 and np.array_equal(x, y)
    assert len(data) == ans_bytes(x, k) == ans_bytes(torch.from_numpy(x).reshape(1, -1), k)
    assert len(data) <= packed_bytes(n, _bits(k)) + 1                # the bound, by construction (mode 2)
    assert (n == 0) == (data == b"")


@settings(max_examples=300, deadline=None)
@given(k=st.integers(1, 5000), n=st.integers(0, 3000), skew=st.floats(0.01, 1.0), seed=st.integers(0, 2 ** 31))
def test_coded_bytes_never_exceed_packed_plus_one(k, n, skew, seed):
    """The header bound: whatever the stream, ans_bytes <= packed_bytes(n, ceil(log2 k)) + 1 byte."""
    rng = np.random.default_rng(seed)
    x = np.minimum(rng.geometric(skew, n) - 1, k - 1) if skew < 1 else rng.integers(0, k, n)
    x = (x + rng.integers(0, k)) % k                                 # any symbol may be the frequent one
    data = ans_encode(x, k)
    assert len(data) <= packed_bytes(n, _bits(k)) + 1
    assert np.array_equal(ans_decode(data, n, k), x)


@pytest.mark.parametrize("k", [16, 256, 4096])
def test_ans_beats_huffman_on_skewed_indices(k):
    x = _stream("skewed", k, 24_000, seed=1)                         # LeNet-5 fc1's index count at d=2
    counts = np.bincount(x)
    p = counts[counts > 0] / x.size
    entropy_bytes = -(p * np.log2(p)).sum() * x.size / 8
    ans, huff = ans_bytes(x, k), huffman_bytes(torch.from_numpy(x), k)
    assert ans < huff
    assert entropy_bytes < ans < entropy_bytes + 2 * len(p) + 16     # header: two varints a symbol at most, + state
    # very skewed (entropy far below 1 bit): Huffman needs >= 1 bit per symbol, ANS does not
    y = (np.random.default_rng(2).random(24_000) < 0.02).astype(np.int64)
    assert ans_bytes(y, k) < huffman_bytes(torch.from_numpy(y), k) / 3


def test_header_layout_by_hand():
    # one symbol repeated: the sparse header (u=1 -> 1 << 2 | 1 = 5; gap 5; count 1000 = 0xe8 0x07), no body
    assert ans_encode(np.full(1000, 5), 16) == bytes([5, 5, 0xE8, 0x07])
    # dense header: M = 2 -> 2 << 2 | 0 = 8; counts 3, 1; then the AnsCoder's 32-bit words
    data = ans_encode([0, 0, 1, 0] * 10, 4)
    assert data[:3] == bytes([8, 30, 10]) and (len(data) - 3) % 4 == 0
    # a uniform stream the header cannot pay for: mode 2, the packed stream after one byte
    x = np.arange(16)
    assert ans_encode(x, 16) == b"\x02" + pack_indices(torch.from_numpy(x), 4)
    assert ans_encode(np.zeros(0, np.int64), 7) == b""


def _damage_cases():
    x = _stream("skewed", 16, 5000, seed=3)
    good = ans_encode(x, 16)
    assert good[0] & 3 == 0                                          # dense header: 16 counts
    cut_header = good[:5]
    cases = {
        "truncated body": (good[:-4], 5000, 16, r"decode|counts|left over|words"),
        "truncated to a partial word": (good[:-1], 5000, 16, "whole number of 4-byte words"),
        "truncated header": (cut_header, 5000, 16, "header is truncated"),
        "empty stream": (b"", 5000, 16, "is empty"),
        "extra word": (good + b"\x01\x00\x00\x00", 5000, 16, r"left over|counts|decode"),
        "unknown mode": (b"\x03" + good[1:], 5000, 16, "unknown mode 3"),
        "counts not summing": (ans_encode(x[:-1], 16), 5000, 16, "counts sum to 4999"),
        "dense symbol >= k": (good, 5000, 8, r"16 counts.*k=8"),
        "sparse symbol >= k": (bytes([5, 20, 0xE8, 0x07]), 1000, 16, "symbol >= k=16"),
        "zero count": (bytes([9, 0, 0, 0, 0]), 5, 16, "count 0"),
        "last dense count 0": (bytes([8, 3, 0]), 3, 16, "last count is 0"),
        "overlong varint": (bytes([4] + [0xFF] * 9 + [1]), 3, 16, "longer than 9 bytes"),
        "packed symbol >= k": (b"\x02" + bytes([0b11000000]), 1, 3, "symbol 3 >= k=3"),
        "packed wrong length": (b"\x02" + bytes(3), 7, 3, "packed ANS stream"),
        "body on one symbol": (bytes([5, 5, 0xE8, 0x07, 0]), 1000, 16, "no body"),
        "data for 0 symbols": (b"\x00", 0, 16, "0 symbols is empty"),
        "bad k": (good, 5000, 0, "k .* must be an integer"),
        "bad n": (good, -1, 16, "n .* must be an integer"),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_damage_cases()))
def test_damage_is_refused_with_valueerror(case):
    data, n, k, match = _damage_cases()[case]
    with pytest.raises(ValueError, match=match):
        ans_decode(data, n, k)


def test_encode_refuses_bad_symbols():
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, 4\).*\[0, 4\]"):
        ans_encode([0, 1, 4], 4)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        ans_encode(np.array([-1, 2]), 4)
    with pytest.raises(ValueError, match="integer symbols"):
        ans_encode(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="k .* must be an integer"):
        ans_encode([0], 0)


def test_random_damage_gives_valueerror_or_symbols_in_range():
    """Cut, flip, extend or replace coded streams: ans_decode returns n symbols in [0, k) or raises
    ValueError — never another exception, never a hang."""
    rng = np.random.default_rng(0)
    refused = 0
    t0 = time.perf_counter()
    for _ in range(1500):
        k = int(rng.choice([2, 3, 16, 256, 4096]))
        n = int(rng.choice([1, 7, 300]))
        x = np.minimum(rng.geometric(rng.uniform(0.05, 0.9), n) - 1, k - 1)
        d = bytearray(ans_encode(x, k))
        op = int(rng.integers(0, 4))
        if op == 0:
            d = d[:int(rng.integers(0, len(d)))]
        elif op == 1:
            d[int(rng.integers(0, len(d)))] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            d += bytes(rng.integers(0, 256, int(rng.integers(1, 6))).astype(np.uint8))
        else:
            d = bytearray(rng.integers(0, 256, int(rng.integers(0, 40))).astype(np.uint8))
        try:
            y = ans_decode(bytes(d), n, k)
        except ValueError:
            refused += 1
            continue
        assert y.shape == (n,) and 0 <= int(y.min()) and int(y.max()) < k
    assert refused > 1000 and time.perf_counter() - t0 < 60


# ---------------------------------------------------------------- effective rate (notebook 01)

def test_effective_bits_per_weight_counts_what_compressed_size_stores():
    import vqlab
    from vqlab.bits import effective_bits_per_weight

    torch.manual_seed(0)
    model = vqlab.get_model("lenet5")
    vqlab.quantize_(model, vqlab.VQConfig(k=256, d=4, iters=2), progress=False)
    row = vqlab.compressed_size(model).layers.set_index("layer").loc["classifier.1"]   # 120 x 400, no padding
    stored = 8 * (row["index_bytes"] + row["codebook_bytes"]) / 48000
    assert effective_bits_per_weight(48000, 256, 4) == pytest.approx(stored)
    assert effective_bits_per_weight(48000, 256, 4) == pytest.approx(2 + 256 * 4 * 32 / 48000)
    # residual VQ: two indices per segment, two codebooks; PQ: sub-vectors of length d/M, one index each, M books
    assert effective_bits_per_weight(48000, 256, 8, codebooks=2, stages=2) == pytest.approx(2 + 2 * 256 * 8 * 32 / 48000)
    assert effective_bits_per_weight(48000, 256, 4, codebooks=2) == pytest.approx(2 + 2 * 256 * 4 * 32 / 48000)
    with pytest.raises(ValueError, match="n_weights"):
        effective_bits_per_weight(0, 256, 4)
