"""What the two packed VQ layouts share (`SimdCode` for linears, `SimdConvCode` for convolutions): the layout is the
code's only storage, a uint8 buffer `packed` holding 4 bits per index plus the layout's zero padding."""
from __future__ import annotations

import torch

from ..bits import huffman_bytes, pack_indices
from ..codes import CodeSize, packed_ans_bytes
from ..kernels.reference import check_indices
from .vq import VQCodeBase

__all__ = ["PackedVQCode"]


class PackedVQCode(VQCodeBase):
    """A VQ code stored only in a kernel's packed layout.  Subclasses say where the indices go: `index_shape()`
    (rows, segments), `pack(indices)` -> the buffer, `unpack()` -> a copy of the indices, `packed_shape()`."""

    packed: torch.Tensor

    def index_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def packed_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def pack(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self) -> torch.Tensor:
        raise NotImplementedError

    def index_values(self) -> torch.Tensor:
        return self.unpack()

    def set_indices(self, indices: torch.Tensor) -> None:
        """Store new (rows, segments) integer indices in [0, K) (checked; ValueError otherwise)."""
        want = self.index_shape()
        if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != want:
            raise ValueError(f"indices must have shape {want}, got "
                             f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        check_indices(indices, self.k, what="indices")
        packed = self.pack(indices.to(self.packed.device))
        with torch.no_grad():
            self.packed.copy_(packed)

    def size(self, seen: set[int]) -> CodeSize:
        """The packed buffer as it is (4 bits per index plus the padding); Huffman / ANS figures from the index
        histogram; the codebook once per object (shared codebooks stay shared)."""
        book_bytes = self._codebook_size(seen)
        seen.add(id(self.packed))
        idx = self.unpack()
        return CodeSize(index_bytes=self.packed.numel(), codebook_bytes=book_bytes,
                        entropy_index_bytes=huffman_bytes(idx, self.k), ans_index_bytes=packed_ans_bytes(self),
                        streams=[pack_indices(idx, 4)], k=self.k, d=self.d, index_bits=4)

    def packing(self) -> dict[str, int]:
        return {"packed": 8}          # the layout's bytes as they are (ANS-coded by save(index_coding="ans"))

    def _validate_packed(self) -> None:
        """`packed` of the layout's shape and dtype, every index < K, the padding zero (the buffer equals the
        packing of its own indices).  Run after the codebook's checks."""
        want = self.packed_shape()
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != want:
            raise ValueError(f"packed must be uint8 {want}, got {tuple(self.packed.shape)} {self.packed.dtype}")
        idx = self.unpack()
        check_indices(idx, self.codebook.weight.shape[1], what="packed indices")
        if not torch.equal(self.pack(idx), self.packed):
            raise ValueError("packed: the padding of the layout must be zero")
