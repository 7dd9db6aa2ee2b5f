"""Every dtype table vqlab uses, in one place: float dtypes by name, the storage dtypes of `save(store_dtype=)`,
index dtypes, and the dtypes a vqlab file may hold."""
from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "FLOAT_NAMES", "STORE_DTYPES", "INDEX_DTYPES", "FILE_DTYPES", "float_dtype",
           "dtype_name", "index_dtype", "check_store_dtype"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float dtypes by the names configs and files use for them
FLOAT_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
               "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}
# what `save(..., store_dtype=...)` / `compressed_size(..., store_dtype=...)` may store floats at
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# integer dtypes an index tensor may have (values are checked against K separately)
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# dtypes of the tensors a vqlab file may hold, by their file name ("float32", "uint8", ...)
FILE_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the name configs and files record."""
    return str(dtype).removeprefix("torch.")


def float_dtype(value, field: str = "dtype") -> torch.dtype:
    """A float torch dtype from a dtype or its name ("float16", "torch.float16", "half", ...); ValueError naming
    `field` and the value otherwise."""
    if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_NAMES:
        return FLOAT_NAMES[value.removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES:
        return value
    raise ValueError(f"{field} must be a float dtype or its name, one of {sorted(FLOAT_NAMES)}, got {value!r}")


def index_dtype(k: int) -> torch.dtype:
    """Smallest torch integer dtype that holds indices 0..K-1 (uint8, int16 or int32)."""
    if k <= 256:
        return torch.uint8
    if k <= 2**15:
        return torch.int16
    return torch.int32


def check_store_dtype(store_dtype) -> torch.dtype | None:
    """None, or the torch dtype of `store_dtype` (torch.float16 / torch.bfloat16 / torch.float32 or the name);
    ValueError naming the value and the allowed names otherwise."""
    if store_dtype is None:
        return None
    if isinstance(store_dtype, str) and store_dtype.removeprefix("torch.") in STORE_DTYPES:
        return STORE_DTYPES[store_dtype.removeprefix("torch.")]
    if isinstance(store_dtype, torch.dtype) and store_dtype in STORE_DTYPES.values():
        return store_dtype
    raise ValueError(f"store_dtype must be None or one of {sorted(STORE_DTYPES)} (a name or a torch dtype), "
                     f"got {store_dtype!r}")
