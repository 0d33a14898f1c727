"""The Metal block-attention kernel against `mx.fast.scaled_dot_product_attention` under the equivalent mask.

On a Mac the kernel runs on the real Metal backend; on Linux the CPU emulator stands in for
`mx.fast.metal_kernel` (tests/metal_emulator), so the same `kernels.attention` code path runs. The reference is
computed in float32 from the same (rounded) inputs, so the tolerance is the kernel's own error."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm.kernels import attention, metal, patterns, routing
from mlx_dllm.sampler.tree import grow_tree

TOLERANCE = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


@pytest.fixture
def metal_route(request, monkeypatch):
    """The kernel's backend: real Metal when this machine has it, else the emulator; routing sees "metal"."""
    if not mx.metal.is_available():
        request.getfixturevalue("metal_emulator")
        monkeypatch.setattr(routing, "current_backend", lambda: "metal")


def inputs(B, Hq, Hkv, Tq, Tc, Tb, D, dtype, seed):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    q = normal(B, Hq, Tq, D)
    k, v = normal(B, Hkv, Tc, D), normal(B, Hkv, Tc, D)
    bk, bv = (normal(B, Hkv, Tb, D), normal(B, Hkv, Tb, D)) if Tb else (None, None)
    return q, k, v, bk, bv


def reference(q, k, v, bk, bv, scale, pattern):
    if bk is not None:
        k, v = mx.concatenate([k, bk], axis=2), mx.concatenate([v, bv], axis=2)
    mask = patterns.visible(pattern, q.shape[2], k.shape[2])
    f32 = [a.astype(mx.float32) for a in (q, k, v)]
    return mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)


def check(B, Hq, Hkv, Tq, Tc, Tb, D, dtype, pattern, seed=0):
    q, k, v, bk, bv = inputs(B, Hq, Hkv, Tq, Tc, Tb, D, dtype, seed)
    scale = D**-0.5
    ours = metal.block_attention(q, k, v, scale, pattern, bk, bv)
    assert ours.dtype == dtype and ours.shape == q.shape
    error = float(mx.abs(ours.astype(mx.float32) - reference(q, k, v, bk, bv, scale, pattern)).max())
    assert error <= TOLERANCE[dtype], (Tq, Tc + Tb, D, Hq // Hkv, dtype, pattern, error)
    return error


@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims(metal_route, D):
    check(1, 4, 1, 16, 40, 0, D, mx.float32, patterns.causal(24))
    check(1, 4, 1, 8, 20, 8, D, mx.float32, patterns.bidirectional(), seed=1)


# (Tq, Tk, gqa): one query over one key and over 600, ragged tiles, GQA 8 past 32 rows, a verify, a block.
SHAPES = [(1, 1, 8), (1, 600, 1), (3, 33, 4), (9, 40, 8), (16, 100, 4), (32, 97, 1), (64, 70, 1)]


@pytest.mark.parametrize("Tq, Tk, gqa", SHAPES)
def test_causal_and_bidirectional_over_shapes_and_gqa(metal_route, Tq, Tk, gqa):
    check(1, 2 * gqa, 2, Tq, Tk, 0, 64, mx.float32, patterns.causal(Tk - Tq))
    check(1, gqa, 1, Tq, Tk, 0, 64, mx.float32, patterns.bidirectional(), seed=1)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dtypes_accumulate_in_float32(metal_route, dtype):
    check(2, 4, 1, 16, 100, 0, 128, dtype, patterns.causal(84))


@pytest.mark.parametrize(
    "pattern, Tq, Tk",
    [
        (patterns.causal(3), 8, 40),  # an offset MLX's "causal" cannot name
        (patterns.window(16, causal=True, query_start=200, key_start=180), 12, 32),
        (patterns.window(5, causal=False, query_start=10, key_start=0), 24, 40),
        (patterns.window(1, causal=True, query_start=0), 1, 1),
    ],
)
def test_offsets_and_windows(metal_route, pattern, Tq, Tk):
    check(1, 4, 1, Tq, Tk, 0, 64, mx.float32, pattern)


@pytest.mark.parametrize("rows", range(2, 9))
def test_quadratic_layout(metal_route, rows):
    L = rows * (rows + 1)
    check(1, 4, 2, L, 37, L, 64, mx.float32, patterns.quadratic(prefix=37, rows=rows))


def test_cache_and_block_as_separate_inputs(metal_route):
    check(1, 4, 1, 16, 50, 16, 128, mx.float16, patterns.bidirectional())


def test_the_cache_is_read_through_its_strides(metal_route):
    """A slice of a preallocated buffer (what write-then-trim hands attention), never copied first."""
    q, k, v, _, _ = inputs(1, 4, 1, 16, 256, 0, 64, mx.float32, seed=3)
    k, v = k[:, :, :200], v[:, :, :200]
    pattern = patterns.causal(184)
    ours = metal.block_attention(q, k, v, 0.125, pattern)
    np.testing.assert_allclose(np.array(ours), np.array(reference(q, k, v, None, None, 0.125, pattern)), atol=2e-5)


@pytest.mark.parametrize("pattern", [patterns.causal(84), patterns.bidirectional(), patterns.causal(20)])
def test_split_keys_combine_to_one_pass(metal_route, monkeypatch, pattern):
    """Keys split over threadgroups (some of them seeing no key at all under a causal offset), then reduced."""
    monkeypatch.setattr(metal, "SPLIT_FROM_KEYS", 1)
    monkeypatch.setattr(metal, "KEYS_PER_SPLIT", 16)
    assert metal.splits_for(100, 1) == 7
    check(1, 8, 2, 16, 70, 30, 64, mx.float32, pattern)


# A draft tree as DFlash grows it (25 rows: one root, four depths), and a 40-row forest of two roots whose rows past
# 32 have ancestors in the first ancestor word and themselves in the second.
GROWN = grow_tree(7, [[1, 2, 3]] * 4, [[-0.1, -1.0, -2.0]] * 4, 24).parents
FOREST = tuple(-1 if row in (0, 17) else (row - 1 if row % 3 else row // 2) for row in range(40))


@pytest.mark.parametrize(
    "parents, prefix, window, gqa, block, dtype",
    [
        (GROWN, 0, 0, 2, False, mx.float32),  # no prefix; the tree's keys in the one input
        (FOREST, 37, 0, 4, True, mx.float16),
        (FOREST, 37, 3, 1, True, mx.float32),
        (GROWN, 10, 1, 2, False, mx.float16),  # a window of 1: each row sees itself alone
    ],
)
def test_tree(metal_route, parents, prefix, window, gqa, block, dtype):
    n = len(parents)
    Tc, Tb = (prefix, n) if block else (prefix + n, 0)
    check(1, 2 * gqa, 2, n, Tc, Tb, 64, dtype, patterns.tree(prefix, parents, window))


@pytest.mark.parametrize("window", [0, 3])
def test_tree_with_split_keys(metal_route, monkeypatch, window):
    monkeypatch.setattr(metal, "SPLIT_FROM_KEYS", 1)
    monkeypatch.setattr(metal, "KEYS_PER_SPLIT", 16)
    check(1, 4, 2, len(FOREST), 60, len(FOREST), 64, mx.float32, patterns.tree(60, FOREST, window))


def test_the_entry_point_routes_a_verify_to_the_kernel(metal_route, monkeypatch):
    launched = []
    real = metal.block_attention
    monkeypatch.setattr(metal, "block_attention", lambda *args: launched.append(args[4]) or real(*args))
    q, k, v, _, _ = inputs(1, 8, 2, 16, 100, 0, 64, mx.float32, seed=4)
    pattern = patterns.causal(84)
    ours = attention(q, k, v, 0.125, pattern)
    assert launched == [pattern]
    np.testing.assert_allclose(np.array(ours), np.array(reference(q, k, v, None, None, 0.125, pattern)), atol=2e-5)


def test_mlx_dllm_kernels_0_keeps_every_call_on_mlx(metal_route, monkeypatch):
    monkeypatch.setenv("MLX_DLLM_KERNELS", "0")
    monkeypatch.setattr(metal, "block_attention", lambda *args: pytest.fail("the kernel ran"))
    q, k, v, _, _ = inputs(1, 8, 2, 16, 100, 0, 64, mx.float32, seed=4)
    attention(q, k, v, 0.125, patterns.causal(84))


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_the_kernel_is_race_free_and_in_bounds(metal_emulator, monkeypatch, sanitizer):
    """ThreadSanitizer (a missing barrier) and AddressSanitizer (a read or write out of bounds), on threadgroups
    that load several tiles of keys, with and without split keys."""
    with metal_emulator.options(sanitizer=sanitizer):
        check(1, 4, 2, 6, 74, 6, 32, mx.float32, patterns.quadratic(prefix=74, rows=2))  # 3 tiles of 32 keys
        monkeypatch.setattr(metal, "SPLIT_FROM_KEYS", 1)
        monkeypatch.setattr(metal, "KEYS_PER_SPLIT", 64)
        check(1, 2, 1, 3, 157, 0, 64, mx.float16, patterns.causal(154))  # 3 splits of 2 tiles
