"""The non-VQ baseline of the compression studies: uniform (scalar, linear) int-b quantization, a method like the
others (a `WeightCode`, a config and a handler), so it goes through `quantize_` with the same layer choice, size
accounting and file format.

Symmetric, per output channel: w_q = round(w / s) * s with s = max|w_row| / (2^(b-1) - 1).  Stored: the
integer levels packed at b bits each (offset by 2^(b-1) - 1 so they are non-negative) and one float32 scale per
output channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator

import pandas as pd
import torch
import torch.nn as nn

from ..bits import huffman_bytes, pack_indices, packed_bytes
from ..checks import check_int
from ..codes import CodeSize, WeightCode, packed_ans_bytes, register_code, stored_bytes
from ..config import QuantConfig, register_handler
from ..layers import quantized_layer
from ..quantize import all_layers, quantize_

__all__ = ["UniformConfig", "UniformCode", "uniform_quantize_", "fake_quantize_uniform"]


def _check_bits(bits, field: str = "bits") -> None:
    check_int(field, bits, 2, 16)


def _levels_and_scale(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out, ...) -> integer levels (out, n) in [-L, L] (int64) and scales (out,), L = 2^(bits-1) - 1."""
    _check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(len(w), -1).float()
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / levels                 # (out,)
    return torch.round(flat / scale[:, None]).clamp(-levels, levels).long(), scale


def fake_quantize_uniform(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel uniform quantization.  w: (out, ...) -> same shape and dtype."""
    q, scale = _levels_and_scale(w, bits)
    return (q * scale[:, None]).to(w.dtype).reshape(w.shape)


@register_code
class UniformCode(WeightCode):
    """Integer levels (rows, n), packed at `bits` bits, and a float32 scale per row: rows() = (codes - L) * scale."""

    kind = "uniform"

    def __init__(self, rows: int, n: int, bits: int):
        super().__init__()
        _check_bits(bits)
        self.bits = bits
        self.register_buffer("codes", torch.zeros(rows, n, dtype=torch.int32 if bits > 8 else torch.uint8))
        self.register_buffer("scale", torch.ones(rows))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int) -> "UniformCode":
        q, scale = _levels_and_scale(weight, bits)
        code = cls(q.shape[0], q.shape[1], bits)
        code.codes.copy_(q + 2 ** (bits - 1) - 1)
        code.scale.copy_(scale)
        return code.to(weight.device)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self) -> torch.Tensor:
        return (self.codes.float() - (2 ** (self.bits - 1) - 1)) * self.scale[:, None]

    def size(self, seen: set[int]) -> CodeSize:
        return CodeSize(index_bytes=packed_bytes(self.codes.numel(), self.bits), other_bytes=stored_bytes(self.scale),
                        ans_index_bytes=packed_ans_bytes(self),
                        entropy_index_bytes=huffman_bytes(self.codes, 2 ** self.bits),
                        streams=[pack_indices(self.codes, self.bits)], index_bits=self.bits)

    def config(self) -> dict:
        return {"rows": self.shape[0], "n": self.shape[1], "bits": self.bits}

    @classmethod
    def from_config(cls, rows: int, n: int, bits: int) -> "UniformCode":
        check_int("UniformCode rows", rows, 1)
        check_int("UniformCode n", n, 1)
        return cls(rows, n, bits)

    def packing(self) -> dict[str, int]:
        return {"codes": self.bits}

    def validate(self) -> None:
        if self.codes.numel() and int(self.codes.max()) > 2 ** self.bits - 2:
            raise ValueError(f"uniform int{self.bits} levels must lie in [0, {2 ** self.bits - 2}], got "
                             f"{int(self.codes.max())}")

    def describe(self) -> dict:
        return {"method": self.kind, "setting": f"int{self.bits}", "K": None, "d": 1,
                "bits_per_weight": float(self.bits)}

    def extra_repr(self) -> str:
        return f"rows={self.shape[0]}, n={self.shape[1]}, bits={self.bits}"


@dataclass(frozen=True)
class UniformConfig(QuantConfig):
    """Uniform symmetric int-b quantization per output channel (the int8/int4 baselines).

    Args:
        bits: 2..16 bits per weight.
    Example:
        >>> quantize_(model, UniformConfig(bits=4))
    """

    name: ClassVar[str] = "uniform"
    bits: int = 8

    def validate(self) -> None:
        _check_bits(self.bits, self.field_name("bits"))


@register_handler(UniformConfig)
def _uniform_handler(modules: list[tuple[str, nn.Module]], config: UniformConfig) -> Iterator[tuple[str, nn.Module]]:
    for name, m in modules:
        yield name, quantized_layer(m, UniformCode.from_weight(m.weight, config.bits))


def uniform_quantize_(model: nn.Module, bits: int = 8, quantize_first_last: bool = False,
                      progress: bool = False) -> pd.DataFrame:
    """`quantize_(model, UniformConfig(bits))`: the same layer choice as VQ (first conv and last linear stay float
    unless quantize_first_last); returns quantize_'s report."""
    return quantize_(model, UniformConfig(bits), filter_fn=all_layers if quantize_first_last else None,
                     progress=progress)
