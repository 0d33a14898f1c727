"""Launching `block_attention.metal` through `mx.fast.metal_kernel` (looked up at call time, so a test can put
the CPU emulator in its place)."""

import math
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .patterns import Pattern

SOURCE = Path(__file__).with_name("block_attention.metal")
INPUTS = ["queries", "keys", "values", "block_keys", "block_values", "params", "scale"]
THREADGROUP_BYTES = 16384  # the K and V tiles together: half of Apple's 32 KiB per threadgroup
MAX_ROWS_PER_SIMDGROUP = 4


@lru_cache(maxsize=None)
def source() -> str:
    return SOURCE.read_text()


def kernel():
    # Not cached here: MLX caches compiled kernels by name and source itself.
    return mx.fast.metal_kernel(
        name="mlx_dllm_block_attention",
        input_names=INPUTS,
        output_names=["out"],
        source=source(),
        ensure_row_contiguous=False,  # the cache is read in place, through its strides
    )


def layout(rows: int):
    """(simdgroups per threadgroup, rows per simdgroup, row tiles) for `rows` query rows of one KV head."""
    per_simdgroup = min(MAX_ROWS_PER_SIMDGROUP, math.ceil(rows / 32))
    simdgroups = min(32, math.ceil(rows / per_simdgroup))
    return simdgroups, per_simdgroup, math.ceil(rows / (simdgroups * per_simdgroup))


def keys_per_tile(head_dim: int, dtype: mx.Dtype) -> int:
    return max(1, min(32, THREADGROUP_BYTES // (2 * head_dim * dtype.size)))


def block_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    pattern: Pattern,
    block_keys: Optional[mx.array] = None,
    block_values: Optional[mx.array] = None,
) -> mx.array:
    """queries [B, Hq, Tq, D]; keys/values [B, Hkv, Tc, D] and the optional block's [B, Hkv, Tb, D]."""
    B, Hq, Tq, D = queries.shape
    Hkv, Tc = keys.shape[1], keys.shape[2]
    Tb = 0 if block_keys is None else block_keys.shape[2]
    if block_keys is None:  # never read (Tb = 0), but the signature has them
        block_keys, block_values = keys, values
    gqa = Hq // Hkv
    simdgroups, per_simdgroup, tiles = layout(gqa * Tq)
    params = mx.array([Tq, Tc, Tb, gqa, Hkv, pattern.a, pattern.b, pattern.c], dtype=mx.int32)
    dtype = queries.dtype
    threads = 32 * simdgroups
    return kernel()(
        inputs=[queries, keys, values, block_keys, block_values, params, mx.array(scale, dtype=mx.float32)],
        template=[
            ("T", dtype),
            ("D", D),
            ("KIND", pattern.kind),
            ("ROWS", per_simdgroup),
            ("KEYS", keys_per_tile(D, dtype)),
        ],
        grid=(threads, B * Hkv, tiles),
        threadgroup=(threads, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[dtype],
    )[0]
