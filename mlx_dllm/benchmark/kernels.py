"""`mlx-dllm benchmark --kernels`: the Metal block-attention kernel against
`mx.fast.scaled_dot_product_attention` with the equivalent mask, at the shapes our modes run. A Mac only: on
any other backend there is no kernel to time, and it says so."""

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..errors import DLLMError
from .report import median

REPEATS = 20


@dataclass(frozen=True)
class Case:
    name: str
    queries: int
    cache: int
    block: int  # the block's own K/V, passed apart from the cache (0: the queries' keys are in the cache)
    heads: int
    kv_heads: int
    head_dim: int
    pattern: object


def cases() -> List[Case]:
    from ..kernels import patterns

    verify = [
        Case(f"DFlash verify 16 x GQA 4, {keys} keys", 16, keys, 0, 32, 8, 128, patterns.causal(keys - 16))
        for keys in (1024, 2048, 4096, 8192)
    ]
    quadratic = [
        Case(f"quadratic layout B {rows}", rows * (rows + 1), 1024, rows * (rows + 1), 32, 8, 128,
             patterns.quadratic(prefix=1024, rows=rows))
        for rows in (4, 8)
    ]
    block = Case("bidirectional 32-token block", 32, 1024, 32, 32, 8, 128, patterns.bidirectional())
    return verify + quadratic + [block]


def milliseconds(run: Callable, repeats: int) -> float:
    import mlx.core as mx

    for _ in range(3):  # compile and warm the allocator
        mx.eval(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(run())
        times.append((time.perf_counter() - start) * 1e3)
    return median(times)


def time_case(case: Case, dtype, repeats: int) -> Dict[str, float]:
    import mlx.core as mx

    from ..kernels import metal, patterns

    def normal(*shape):
        return mx.random.normal(shape).astype(dtype)

    q = normal(1, case.heads, case.queries, case.head_dim)
    k, v = normal(1, case.kv_heads, case.cache, case.head_dim), normal(1, case.kv_heads, case.cache, case.head_dim)
    bk, bv = (normal(1, case.kv_heads, case.block, case.head_dim) for _ in range(2)) if case.block else (None, None)
    scale = case.head_dim**-0.5
    keys = case.cache + case.block
    mask = patterns.mask(case.pattern, case.queries, keys)
    mx.eval(q, k, v, *(a for a in (bk, bv) if a is not None))

    def stock():  # what MLX does today: concatenate the block onto the cache, then attend under the mask
        kk, vv = (mx.concatenate([k, bk], axis=2), mx.concatenate([v, bv], axis=2)) if bk is not None else (k, v)
        return mx.fast.scaled_dot_product_attention(q, kk, vv, scale=scale, mask=mask)

    def kernel():
        return metal.block_attention(q, k, v, scale, case.pattern, bk, bv)

    sdpa_ms, kernel_ms = milliseconds(stock, repeats), milliseconds(kernel, repeats)
    return {"sdpa_ms": sdpa_ms, "kernel_ms": kernel_ms, "speedup": sdpa_ms / kernel_ms}


def run_kernel_benchmark(env: dict, repeats: Optional[int] = None) -> dict:
    from ..output import echo
    import mlx.core as mx

    if not mx.metal.is_available():
        raise DLLMError(
            f"--kernels times Metal kernels: this machine runs MLX on {env['device']}, with no Metal device to run them"
        )
    rows = {}
    echo(f"{'shape':<36} {'dtype':>8} {'sdpa ms':>9} {'kernel ms':>10} {'speedup':>8}")
    for case in cases():
        for dtype in (mx.float16, mx.bfloat16):
            row = time_case(case, dtype, repeats or REPEATS)
            rows[f"{case.name}, {dtype}"] = row
            echo(
                f"{case.name:<36} {str(dtype).split('.')[-1]:>8} {row['sdpa_ms']:>9.3f} {row['kernel_ms']:>10.3f} "
                f"{row['speedup']:>7.2f}x"
            )
    echo(f"Medians of {repeats or REPEATS} runs; sdpa = mx.fast.scaled_dot_product_attention (mask built once).")
    return {"benchmark": "kernels", "cases": rows, **env}
