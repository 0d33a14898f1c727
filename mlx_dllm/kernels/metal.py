"""Launching `block_attention.metal` (and, for split keys, `block_attention_reduce.metal`) through
`mx.fast.metal_kernel`, looked up at call time so that a test can put the CPU emulator in its place."""

import math
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx

from . import patterns
from .patterns import Pattern

FOLDER = Path(__file__).parent
INPUTS = ["queries", "keys", "values", "block_keys", "block_values", "params", "scale", "tree"]
PARTIALS = ["partial_sums", "partial_max", "partial_total"]
THREADGROUP_BYTES = 16384  # the K and V tiles together: half of Apple's 32 KiB per threadgroup
MAX_SIMDGROUPS, MAX_ROWS_PER_SIMDGROUP = 16, 8  # 512 threads; a 16-query verify with GQA 8 in one threadgroup
# Split the keys when one pass would leave the GPU mostly idle: few threadgroups over a long cache. A guess
# until a Mac measures it (`mlx-dllm benchmark --kernels`).
SPLIT_FROM_KEYS, KEYS_PER_SPLIT, MAX_SPLITS, FEW_THREADGROUPS = 1024, 512, 32, 64


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return (FOLDER / name).read_text()


@lru_cache(maxsize=None)
def attention_kernel(factory):
    """The kernel object, built once per `factory` (mx.fast.metal_kernel, or the emulator a test swaps in)."""
    return factory(
        name="mlx_dllm_block_attention",
        input_names=INPUTS,
        output_names=["out", *PARTIALS],
        source=source("block_attention.metal"),
        ensure_row_contiguous=False,  # the cache is read in place, through its strides
    )


@lru_cache(maxsize=None)
def reduce_kernel(factory):
    return factory(
        name="mlx_dllm_block_attention_reduce",
        input_names=[*PARTIALS, "params"],
        output_names=["out"],
        source=source("block_attention_reduce.metal"),
    )


@lru_cache(maxsize=16)
def tree_input(parents: Tuple[int, ...]) -> mx.array:
    """The `tree` input: the rows' depths, then their ancestor words (`patterns.tree_words`); one unread word for
    every other pattern. Cached because each layer of a verify asks for the same tree."""
    if not parents:
        return mx.zeros((1,), dtype=mx.uint32)
    return mx.array([*patterns.depths(parents), *patterns.tree_words(parents)], dtype=mx.uint32)


def splits_for(keys: int, threadgroups: int) -> int:
    if keys < SPLIT_FROM_KEYS or threadgroups >= FEW_THREADGROUPS:
        return 1
    return min(MAX_SPLITS, math.ceil(keys / KEYS_PER_SPLIT))


def layout(rows: int):
    """(simdgroups per threadgroup, rows per simdgroup, row tiles) for `rows` query rows of one KV head."""
    per_simdgroup = min(MAX_ROWS_PER_SIMDGROUP, math.ceil(rows / MAX_SIMDGROUPS))
    simdgroups = min(MAX_SIMDGROUPS, math.ceil(rows / per_simdgroup))
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
    if pattern.kind == patterns.TREE:  # the kernel reads each row's words without bounds
        patterns.check_tree(pattern, Tq, Tc + Tb)
    gqa = Hq // Hkv
    simdgroups, per_simdgroup, tiles = layout(gqa * Tq)
    splits = splits_for(Tc + Tb, B * Hkv * tiles)
    params = mx.array([Tq, Tc, Tb, gqa, Hkv, pattern.a, pattern.b, pattern.c, splits], dtype=mx.int32)
    dtype, threads, rows = queries.dtype, 32 * simdgroups, B * Hq * Tq
    tree = tree_input(pattern.parents)
    split_shapes = [(splits, rows, D), (splits, rows), (splits, rows)] if splits > 1 else [(1,)] * 3
    outputs = attention_kernel(mx.fast.metal_kernel)(
        inputs=[queries, keys, values, block_keys, block_values, params, mx.array(scale, dtype=mx.float32), tree],
        template=[
            ("T", dtype),
            ("D", D),
            ("KIND", pattern.kind),
            ("ROWS", per_simdgroup),
            ("KEYS", keys_per_tile(D, dtype)),
            ("SPLIT", splits > 1),
        ],
        grid=(threads, B * Hkv, tiles * splits),
        threadgroup=(threads, 1, 1),
        output_shapes=[queries.shape if splits == 1 else (1,), *split_shapes],
        output_dtypes=[dtype] + [mx.float32] * 3,
    )
    if splits == 1:
        return outputs[0]
    return reduce_kernel(mx.fast.metal_kernel)(
        inputs=[*outputs[1:], mx.array([splits, rows], dtype=mx.int32)],
        template=[("T", dtype), ("D", D)],
        grid=(D, rows, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[dtype],
    )[0]
