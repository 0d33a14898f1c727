"""mx.array <-> the raw bytes a kernel buffer holds.

An input keeps MLX's real memory layout (its strides, also negative or zero,
and where its first element sits), which is what MLX hands the GPU when
ensure_row_contiguous is False."""

import ctypes
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .dtypes import BITS_VIEW


@dataclass(frozen=True)
class Layout:
    data: bytes
    pointer_offset: int  # bytes from the buffer start to element 0
    strides: tuple  # in elements, as MLX passes them


def _bits(array: mx.array) -> np.ndarray:
    """A numpy view of the array's memory (no copy), as unsigned integers."""
    mx.eval(array)
    return np.asarray(array.view(BITS_VIEW[array.itemsize]))


def input_layout(array: mx.array, row_contiguous: bool) -> Layout:
    bits = _bits(array)
    if row_contiguous or bits.flags.c_contiguous:
        bits = np.ascontiguousarray(bits)
        return Layout(bits.tobytes(), 0, tuple(s // bits.itemsize for s in bits.strides))
    low = sum(min(0, (n - 1) * s) for n, s in zip(bits.shape, bits.strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(bits.shape, bits.strides)) + bits.itemsize
    data = ctypes.string_at(bits.ctypes.data + low, high - low)
    return Layout(data, -low, tuple(s // bits.itemsize for s in bits.strides))


def filled_bytes(shape, dtype: mx.Dtype, value) -> bytes:
    """An output's starting bytes: init_value, or 0xFF poison (NaN, -1) when unset."""
    size = int(np.prod(shape, dtype=np.int64))
    if value is None:
        return b"\xff" * (size * dtype.size)
    # MLX casts a float32 init_value to the output dtype (mx.full would keep float32).
    value = mx.array(value, dtype=mx.float32).astype(dtype)
    return _bits(mx.broadcast_to(value, tuple(shape))).tobytes()


def from_bytes(data: bytes, shape, dtype: mx.Dtype) -> mx.array:
    bits = np.frombuffer(data, dtype=np.dtype(f"u{dtype.size}"))
    return mx.array(bits).view(dtype).reshape(tuple(shape))
