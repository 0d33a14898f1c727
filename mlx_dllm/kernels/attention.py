"""The one attention entry point: custom Metal/CUDA block kernels plug in here later."""

from typing import Optional, Union

import mlx.core as mx


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: Optional[Union[str, mx.array]] = None,
) -> mx.array:
    """queries [B, Hq, Tq, D]; keys/values [B, Hkv, Tk, D] (GQA is not pre-tiled)."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
