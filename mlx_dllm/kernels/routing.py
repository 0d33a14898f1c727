"""Which implementation runs an attention call: a pure function of the backend, the shapes and the pattern.

The block kernel runs only on Metal, where MLX's own paths fall short for our modes: 9 to 64 queries (a DFlash
verify, a diffusion block) pad to MLX's 32-row steel tile, or run unfused at head dim 256, and any pattern MLX
cannot name (windows, the quadratic layout, a draft tree) costs a materialised [Tq, Tk] mask. Everything else, and
every other backend, goes to `mx.fast.scaled_dot_product_attention`. No speed claim stands until a Mac measures it
(`benchmarks/kernel_attention.py`).
"""

import os
from dataclasses import dataclass

import mlx.core as mx

from . import patterns
from .patterns import Pattern

KERNEL, SDPA = "kernel", "sdpa"
HEAD_DIMS = (64, 128, 256)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MLX_VECTOR_HEAD_DIMS = (64, 96, 128, 192, 256)
MAX_KERNEL_QUERIES = 256  # beyond this the queries fill MLX's matmul tiles, and its steel kernel is the better fit


@dataclass(frozen=True)
class Call:
    """What routing looks at: the backend ("metal", "cpu", "cuda"), shapes and the pattern."""

    backend: str
    queries: int
    keys: int
    head_dim: int
    gqa: int
    dtype: mx.Dtype
    pattern: Pattern


def mlx_vector_path(call: Call) -> bool:
    """MLX's own vector kernel: one simdgroup per query row, at most 8 queries and 32 rows with GQA."""
    return (
        call.queries <= 8
        and call.queries <= call.keys
        and call.queries * call.gqa <= 32
        and call.head_dim in MLX_VECTOR_HEAD_DIMS
    )


def route(call: Call) -> str:
    if call.backend != "metal" or call.head_dim not in HEAD_DIMS or call.dtype not in DTYPES:
        return SDPA
    if call.queries > MAX_KERNEL_QUERIES or call.pattern.kind not in patterns.KERNEL_KINDS:
        return SDPA
    if patterns.named_by_mlx(call.pattern, call.queries, call.keys):  # never a mask built only to be looked at
        return SDPA if mlx_vector_path(call) or call.queries > 64 else KERNEL
    return KERNEL  # MLX would read a materialised mask


def kernels_enabled() -> bool:
    """MLX_DLLM_KERNELS=0 sends every call to MLX's attention: the way out if a Metal compiler rejects the kernel."""
    return os.environ.get("MLX_DLLM_KERNELS", "1") != "0"


def current_backend() -> str:
    """The backend the next op runs on."""
    if mx.default_device() == mx.gpu:
        return "metal" if mx.metal.is_available() else "cuda"
    return "cpu"
