"""The one attention entry point of every model file: a pattern object instead of a mask, routed to the Metal
block kernel where it is expected to win and to `mx.fast.scaled_dot_product_attention` everywhere else."""

import os
from typing import Optional

import mlx.core as mx

from ..errors import DLLMError
from . import metal, patterns, routing
from .patterns import Pattern

# MLX's CPU attention holds a forward's float32 scores and their softmax at once; the GPU kernels stream the
# scores, and what they materialize is a boolean mask.
CPU_SCORE_BYTES = 2 * 4


def memory_size() -> int:
    """The device's memory in bytes (unified memory on a Mac; physical memory on the CPU backend)."""
    size = mx.device_info().get("memory_size")
    return int(size) if size else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(heads: int, tokens: int, keys: int) -> None:
    """Refuse, in one line, a forward whose attention (over all its batch rows and `heads`) could not fit in
    memory: MLX does not raise when an allocation that large fails, the process dies (a block length of 100,000
    did)."""
    on_cpu = routing.current_backend() == "cpu"
    needed = tokens * keys * (heads * CPU_SCORE_BYTES if on_cpu else 1)
    if needed > memory_size():
        raise DLLMError(
            f"attention over {tokens} x {keys} positions needs {needed / 2**30:.0f} GiB, more than the "
            f"{memory_size() / 2**30:.0f} GiB this machine has: use a shorter block or prompt chunk"
        )


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    pattern: Pattern,
    block_keys: Optional[mx.array] = None,
    block_values: Optional[mx.array] = None,
) -> mx.array:
    """queries [B, Hq, Tq, D]; keys/values [B, Hkv, Tc, D] (GQA is not pre-tiled), then the optional block's own
    [B, Hkv, Tb, D]: key columns are the Tc cache rows followed by the Tb block rows."""
    if (block_keys is None) != (block_values is None):
        raise ValueError("block_keys and block_values go together")
    Tq = queries.shape[2]
    Tk = keys.shape[2] + (0 if block_keys is None else block_keys.shape[2])
    check_fits(queries.shape[0] * queries.shape[1], Tq, Tk)
    call = routing.Call(
        backend=routing.current_backend(),
        queries=Tq,
        keys=Tk,
        head_dim=queries.shape[-1],
        gqa=queries.shape[1] // keys.shape[1],
        dtype=queries.dtype,
        pattern=pattern,
    )
    if routing.kernels_enabled() and routing.route(call) == routing.KERNEL:
        return metal.block_attention(queries, keys, values, scale, pattern, block_keys, block_values)
    if block_keys is not None:
        keys = mx.concatenate([keys, block_keys], axis=2)
        values = mx.concatenate([values, block_values], axis=2)
    mask = patterns.mask(pattern, Tq, Tk)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def masked_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """An explicit mask, for the one layout no pattern describes: training's anchor blocks, one per batch row."""
    check_fits(queries.shape[0] * queries.shape[1], queries.shape[2], keys.shape[2])
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
