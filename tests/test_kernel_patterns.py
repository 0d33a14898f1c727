"""The attention entry point's patterns, fallback and routing, on every backend (no kernel runs here)."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm.kernels import attention, patterns, routing


def brute_force(pattern, Tq, Tk):
    """The pattern's rule, one (query, key) pair at a time, written from the docstring."""
    seen = np.zeros((Tq, Tk), dtype=bool)
    for i, j in itertools.product(range(Tq), range(Tk)):
        if pattern.kind == patterns.BIDIRECTIONAL:
            seen[i, j] = True
        elif pattern.kind == patterns.CAUSAL:
            seen[i, j] = j <= pattern.a + i
        elif pattern.kind == patterns.CAUSAL_WINDOW:
            seen[i, j] = 0 <= (pattern.a + i) - (pattern.c + j) < pattern.b
        elif pattern.kind == patterns.BIDIRECTIONAL_WINDOW:
            seen[i, j] = abs((pattern.a + i) - (pattern.c + j)) <= pattern.b
    return seen


@pytest.mark.parametrize(
    "pattern, Tq, Tk",
    [
        (patterns.bidirectional(), 5, 9),
        (patterns.causal(4), 5, 9),
        (patterns.causal(0), 3, 3),
        (patterns.causal(7), 2, 12),  # an offset MLX's "causal" cannot say
        (patterns.window(3, causal=True, query_start=6, key_start=2), 4, 8),
        (patterns.window(2, causal=False, query_start=6, key_start=2), 4, 8),
    ],
)
def test_visible_matches_the_rule(pattern, Tq, Tk):
    np.testing.assert_array_equal(np.array(patterns.visible(pattern, Tq, Tk)), brute_force(pattern, Tq, Tk))


def test_mask_names_what_mlx_can_name():
    assert patterns.mask(patterns.bidirectional(), 4, 10) is None
    assert patterns.mask(patterns.causal(6), 4, 10) == "causal"
    assert isinstance(patterns.mask(patterns.causal(5), 4, 10), mx.array)


def test_patterns_refuse_impossible_integers():
    with pytest.raises(ValueError, match="window"):
        patterns.window(0, causal=True, query_start=0)
    with pytest.raises(ValueError, match="row"):
        patterns.quadratic(prefix=3, rows=0)
    with pytest.raises(ValueError, match="kind"):
        patterns.Pattern(9)


def random_qkv(B, Hq, Hkv, Tq, Tk, D, seed=0):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((B, Hq, Tq, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32))
    return q, k, v


@pytest.mark.parametrize(
    "pattern, Tq",
    [
        (patterns.bidirectional(), 6),
        (patterns.causal(9), 6),
        (patterns.causal(3), 6),
        (patterns.window(4, causal=True, query_start=9), 6),
        (patterns.quadratic(prefix=3, rows=3), 12),
    ],
)
def test_fallback_equals_attention_under_the_explicit_mask(pattern, Tq):
    Tk = 15
    q, k, v = random_qkv(2, 8, 2, Tq, Tk, 32)
    ours = attention(q, k, v, 0.2, pattern)
    explicit = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=patterns.visible(pattern, Tq, Tk))
    np.testing.assert_allclose(np.array(ours), np.array(explicit), atol=1e-6)


def test_separate_block_keys_equal_the_concatenated_cache():
    q, k, v = random_qkv(1, 4, 2, 5, 12, 32, seed=1)
    ours = attention(q, k[:, :, :7], v[:, :, :7], 0.3, patterns.causal(7), k[:, :, 7:], v[:, :, 7:])
    whole = attention(q, k, v, 0.3, patterns.causal(7))
    np.testing.assert_allclose(np.array(ours), np.array(whole), atol=1e-6)
    with pytest.raises(ValueError, match="together"):
        attention(q, k, v, 0.3, patterns.bidirectional(), block_keys=k)


def call(backend="metal", queries=16, keys=1024, head_dim=128, gqa=4, dtype=mx.float16, pattern=None):
    pattern = pattern if pattern is not None else patterns.causal(keys - queries)
    return routing.Call(backend, queries, keys, head_dim, gqa, dtype, pattern)


@pytest.mark.parametrize(
    "case, expected",
    [
        (call(), routing.KERNEL),  # DFlash verify: 16 x GQA 4 misses MLX's vector kernel
        (call(backend="cpu"), routing.SDPA),
        (call(backend="cuda"), routing.SDPA),
        (call(queries=1), routing.SDPA),  # AR decode: MLX's vector kernel
        (call(queries=8, gqa=8), routing.KERNEL),  # 64 rows: past the vector kernel's 32
        (call(queries=32, pattern=patterns.bidirectional()), routing.KERNEL),  # a diffusion block
        (call(queries=20, pattern=patterns.quadratic(prefix=1004, rows=4)), routing.KERNEL),
        (call(queries=1, pattern=patterns.window(512, causal=True, query_start=1023)), routing.KERNEL),
        (call(queries=128), routing.SDPA),  # a prefill chunk fills MLX's tiles
        (call(queries=300, pattern=patterns.quadratic(prefix=0, rows=16)), routing.SDPA),
        (call(head_dim=96), routing.SDPA),
        (call(dtype=mx.int32), routing.SDPA),
    ],
)
def test_routing(case, expected):
    assert routing.route(case) == expected


def test_the_current_backend_is_named():
    expected = "cpu" if mx.default_device() == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")
    assert routing.current_backend() == expected
