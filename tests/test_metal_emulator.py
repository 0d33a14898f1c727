"""The Metal emulator (tests/metal_emulator) is checked against MLX itself: MLX's documented
kernels and mlx-lm's own kernels must match their ops paths, the generated signature must be
the text MLX prints, and the bugs it exists to catch (a missing barrier, writes and reads out
of bounds, uninitialised threadgroup memory) must fail every run."""

import importlib.util
import math

import mlx.core as mx
import pytest
from mlx import nn

from tests.metal_emulator.mlx_reference import mlx_generated_source
from tests.metal_emulator.signature import InputInfo, write_kernel_source

# MLX's documentation (docs/src/dev/custom_metal_kernels.rst), verbatim.
DOCS_EXP_SOURCE = """
        uint elem = thread_position_in_grid.x;
        T tmp = inp[elem];
        out[elem] = metal::exp(tmp);
    """
DOCS_STRIDED_EXP_SOURCE = """
        uint elem = thread_position_in_grid.x;
        // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
        uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
        T tmp = inp[loc];
        // Output arrays are always row contiguous
        out[elem] = metal::exp(tmp);
    """

# One threadgroup sums 256 values: simd_sum, then simdgroup 0 adds the partial sums.
BLOCK_SUM_SOURCE = """
    threadgroup float partial[32];
    uint sg = simdgroup_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    float v = simd_sum(x[thread_position_in_grid.x]);
    if (lane == 0) {
        partial[sg] = v;
    }
    BARRIER
    if (sg == 0) {
        float p = simd_sum(lane < simdgroups_per_threadgroup ? partial[lane] : 0.0f);
        if (lane == 0) {
            out[threadgroup_position_in_grid.x] = p;
        }
    }
"""
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def max_error(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def within_rounding(a, b, dtype) -> bool:
    """Equal up to a few float32 ulps, or one rounding step of a 16-bit type."""
    rtol = {mx.float32: 1e-6, mx.float16: 2**-10, mx.bfloat16: 2**-7}[dtype]
    return mx.allclose(a.astype(mx.float32), b.astype(mx.float32), rtol=rtol, atol=1e-6).item()


def run_exp(kernel, a):
    return kernel(
        inputs=[a],
        template=[("T", mx.float32)],
        grid=(a.size, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[a.shape],
        output_dtypes=[a.dtype],
    )[0]


def test_docs_exp_kernel_matches_mx_exp_with_a_partial_last_threadgroup(metal_emulator):
    kernel = mx.fast.metal_kernel(name="myexp", input_names=["inp"], output_names=["out"], source=DOCS_EXP_SOURCE)
    # 385 = 256 + 129 threads. The body has no bounds check: a full last group would write past
    # `out`, and the canary would say so.
    a = mx.random.normal(shape=(5, 77), key=mx.random.key(0)).astype(mx.float16)
    b = run_exp(kernel, a)
    assert b.dtype == mx.float16 and b.shape == a.shape
    assert mx.allclose(b, mx.exp(a)).item()
    assert max_error(b, mx.exp(a)) <= 2e-3


def test_docs_strided_exp_kernel_reads_through_elem_to_loc(metal_emulator):
    kernel = mx.fast.metal_kernel(
        name="myexp_strided",
        input_names=["inp"],
        output_names=["out"],
        source=DOCS_STRIDED_EXP_SOURCE,
        ensure_row_contiguous=False,
    )
    # As in the docs, a[::2]: strided, 385 threads. (A reversed view would read out of bounds:
    # the docs kernel does its index arithmetic in uint.)
    a = mx.random.normal(shape=(9, 77), key=mx.random.key(1))[::2]
    b = run_exp(kernel, a)
    assert max_error(b, mx.exp(a)) <= 1e-6
    # The contiguous body on the same raw buffer reads the wrong elements: the strides matter.
    raw = mx.fast.metal_kernel(
        name="myexp_raw", input_names=["inp"], output_names=["out"], source=DOCS_EXP_SOURCE, ensure_row_contiguous=False
    )
    assert max_error(run_exp(raw, a), mx.exp(a)) > 0.1


# (kernel arguments, call arguments) pairs covering MLX's signature rules.
SIGNATURE_CASES = {
    "docs": (
        dict(name="myexp", input_names=["inp"], output_names=["out"], source=DOCS_EXP_SOURCE),
        dict(inputs=[mx.zeros((4, 16), mx.float16)], template=[("T", mx.float32)], output_dtypes=[mx.float16]),
    ),
    "template_kinds": (
        dict(name="tpl", input_names=["a"], output_names=["b"], source="b[0] = T(N) + B;"),
        dict(
            inputs=[mx.zeros((10,), mx.bfloat16)],
            template=[("T", mx.bfloat16), ("N", 7), ("B", False), ("U", mx.int64)],
            output_dtypes=[mx.uint32],
        ),
    ),
    "constant_and_scalar_inputs": (
        dict(name="small", input_names=["big", "few", "one", "n"], output_names=["out"], source="out[0] = big[0];"),
        dict(
            inputs=[mx.zeros((8,)), mx.zeros((7,), mx.int32), mx.array(1.5), 3],
            output_dtypes=[mx.float32],
        ),
    ),
    "shape_strides_ndim": (
        dict(
            name="strided",
            input_names=["x", "y"],
            output_names=["out"],
            source="out[0] = x_shape[0] + x_strides[1] + y_ndim + x[0];",
            ensure_row_contiguous=False,
        ),
        dict(inputs=[mx.zeros((3, 4)), mx.zeros((2, 2, 2))], output_dtypes=[mx.float32]),
    ),
    "attributes_and_atomics": (
        dict(
            name="attrs",
            input_names=["x"],
            output_names=["sum", "count"],
            source="uint a = thread_index_in_simdgroup + simdgroup_index_in_threadgroup + threads_per_threadgroup.x"
            " + threadgroups_per_grid.y + grid_size.z + thread_execution_width;",
            atomic_outputs=True,
        ),
        dict(inputs=[mx.zeros((64,), mx.uint8)], output_dtypes=[mx.float32, mx.int32]),
    ),
    "header_and_no_attributes": (
        dict(
            name="hdr",
            input_names=["x"],
            output_names=["y", "z"],
            source="y[0] = helper(x[0]) + x_shape[0]; z[0] = 0;",
            header="#include <metal_stdlib>\nusing namespace metal;\ninline float helper(float v) { return v; }\n",
        ),
        dict(inputs=[mx.zeros((9,))], output_dtypes=[mx.float32, mx.bool_]),
    ),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_generated_source_is_what_mlx_prints(case):
    kernel_args, call_args = SIGNATURE_CASES[case]
    call_args = dict(call_args, grid=(32, 1, 1), threadgroup=(32, 1, 1))
    call_args["output_shapes"] = [(1,)] * len(call_args["output_dtypes"])
    inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in call_args["inputs"]]
    ours = write_kernel_source(
        kernel_args["name"],
        kernel_args.get("header", ""),
        kernel_args["source"],
        kernel_args["input_names"],
        [InputInfo(x.dtype, x.ndim, x.size) for x in inputs],
        kernel_args["output_names"],
        call_args["output_dtypes"],
        call_args.get("template", []),
        kernel_args.get("atomic_outputs", False),
    ).text()
    assert ours == mlx_generated_source(kernel_args, call_args)


def test_verbose_prints_what_mlx_prints(metal_emulator, capsys):
    kernel_args, call_args = SIGNATURE_CASES["docs"]
    call_args = dict(call_args, grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(4, 16)])
    mx.fast.metal_kernel(**kernel_args)(**call_args, verbose=True)
    printed = capsys.readouterr().out
    assert printed == f"Generated source code for `myexp`:\n```\n{mlx_generated_source(kernel_args, call_args)}\n```\n"


def fresh_module(name: str):
    """A private copy of an mlx-lm module, executed now, so it builds its kernels with the
    patched mx.fast.metal_kernel; the imported module is left alone."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gated_delta(metal_emulator, monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # it builds kernels only on Metal
    return fresh_module("mlx_lm.models.gated_delta")


def gated_delta_inputs(Dk, Dv, vector_gate=False, B=1, T=3, Hk=2, Hv=4):
    keys = iter(mx.random.split(mx.random.key(3), 6))
    q = mx.random.normal((B, T, Hk, Dk), key=next(keys)) * Dk**-0.5
    k = mx.random.normal((B, T, Hk, Dk), key=next(keys)) * Dk**-0.5
    v = mx.random.normal((B, T, Hv, Dv), key=next(keys))
    g_shape = (B, T, Hv, Dk) if vector_gate else (B, T, Hv)
    g = mx.exp(-mx.random.uniform(shape=g_shape, key=next(keys)))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv), key=next(keys)))
    state = mx.random.normal((B, Hv, Dv, Dk), key=next(keys)) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("Dk,vector_gate", [(64, False), (64, True)])
def test_mlx_lm_gated_delta_kernel_matches_its_ops_path(gated_delta, Dk, vector_gate):
    inputs = gated_delta_inputs(Dk, 8, vector_gate)
    y, state = gated_delta.gated_delta_kernel(*inputs)
    y_ops, state_ops = gated_delta.gated_delta_ops(*inputs)
    assert max_error(y, y_ops) <= 1e-5
    assert max_error(state, state_ops) <= 1e-5


def test_mlx_lm_gated_delta_variants_are_bitwise_equal_as_on_the_gpu(gated_delta):
    # mlx-lm pins its packed kernel bitwise to the explicit xor tree, and states that on Apple
    # GPUs simd_sum lowers to that same tree: the emulator must reproduce both equalities.
    inputs = gated_delta_inputs(128, 16)
    packed = gated_delta.gated_delta_kernel(*inputs)
    tree = gated_delta.gated_delta_kernel_xtree(*inputs)
    generic = gated_delta.gated_delta_kernel_unpacked(*inputs)
    for a, b, c in zip(packed, tree, generic):
        assert mx.array_equal(a, b).item() and mx.array_equal(b, c).item()
    assert max_error(packed[0], gated_delta.gated_delta_ops(*inputs)[0]) <= 1e-5


def rms_norm_ops(x, eps):
    x = x.astype(mx.float32)
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_mlx_lm_qk_norm_kernel_matches_ops(metal_emulator, dtype):
    qk_norm = fresh_module("mlx_lm.kernels.qk_norm")
    heads, kv_heads, head_dim, eps, scale = 4, 2, 48, 1e-6, 0.37  # head_dim 48: lanes past D idle
    qkvg = mx.random.normal((2, 3, 2 * (heads + kv_heads) * head_dim), key=mx.random.key(4)).astype(dtype)
    q, k = qk_norm.qk_norm(qkvg, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, eps=eps, query_scale=scale)
    rows = qkvg[..., : (heads + kv_heads) * head_dim].reshape(2, 3, heads + kv_heads, head_dim)
    normed = rms_norm_ops(rows, eps).astype(dtype)
    q_ops = (normed[:, :, :heads].astype(mx.float32) * scale).astype(dtype)
    k_ops = normed[:, :, heads:]
    assert q.dtype == dtype and within_rounding(q, q_ops, dtype) and within_rounding(k, k_ops, dtype)


def test_mlx_lm_rms_norm_sigmoid_gate_kernel_matches_ops_on_strided_input(metal_emulator):
    module = fresh_module("mlx_lm.kernels.rms_norm_sigmoid_gate")
    B, H, L, D, eps = 2, 3, 5, 40, 1e-5
    x = mx.random.normal((B, L, H, D), key=mx.random.key(5)).transpose(0, 2, 1, 3)  # (B, H, L, D), strided
    gate = mx.random.normal((B, L, H * D), key=mx.random.key(6))
    out = module.rms_norm_sigmoid_gate(x, gate, eps=eps)
    expected = (rms_norm_ops(x, eps).transpose(0, 2, 1, 3).reshape(B, L, H * D)) * mx.sigmoid(gate)
    assert max_error(out, expected) <= 2e-6


def block_sum(barrier: str):
    kernel = mx.fast.metal_kernel(
        name="block_sum", input_names=["x"], output_names=["out"], source=BLOCK_SUM_SOURCE.replace("BARRIER", barrier)
    )
    x = mx.random.normal((3 * 256,), key=mx.random.key(7))
    out = kernel(
        inputs=[x], grid=(x.size, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(3,)], output_dtypes=[mx.float32]
    )
    return out[0], x.reshape(3, 256).sum(axis=1)


def test_block_sum_with_its_barrier_is_right_and_race_free(metal_emulator):
    with metal_emulator.options(sanitizer="thread"):
        out, expected = block_sum(BARRIER)
    assert max_error(out, expected) <= 1e-5


def test_a_removed_barrier_gives_nan_every_run(metal_emulator):
    # The baton order is fixed: lane 1 reads partial[1] before simdgroup 1 has written it, and
    # reads the poison. (With reverse_threads=True the writers run first and the bug hides;
    # ThreadSanitizer, below, finds it in either order.)
    for _ in range(3):
        out, _ = block_sum("")
        assert mx.isnan(out).all().item()


@pytest.mark.parametrize("reverse", [False, True])
def test_a_removed_barrier_is_a_race_for_thread_sanitizer(metal_emulator, reverse):
    with metal_emulator.options(sanitizer="thread", reverse_threads=reverse):
        with pytest.raises(metal_emulator.KernelRaceError) as error:
            block_sum("")
    assert "block_sum.source:7" in str(error.value) and "block_sum.source:11" in str(error.value)


def copy_kernel(body: str, **kernel_args):
    kernel = mx.fast.metal_kernel(name="copy", input_names=["x"], output_names=["out"], source=body, **kernel_args)
    x = mx.arange(40, dtype=mx.float32)
    return kernel(
        inputs=[x], grid=(40, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(40,)], output_dtypes=[mx.float32]
    )[0]


def test_the_copy_kernel_itself_is_fine(metal_emulator):
    out = copy_kernel("uint i = thread_position_in_grid.x; out[i] = x[i];")
    assert mx.array_equal(out, mx.arange(40, dtype=mx.float32)).item()


def test_a_write_past_an_output_is_caught_by_its_canary(metal_emulator):
    with pytest.raises(metal_emulator.KernelRunError, match="wrote past the end of output `out`"):
        copy_kernel("uint i = thread_position_in_grid.x; out[i + 1] = x[i];")


@pytest.mark.parametrize("sanitizer", [None, "address"])
def test_a_read_past_an_input_is_caught(metal_emulator, sanitizer):
    # Plain runs fault on the guard page after the input (and rerun under ASan for the line).
    with metal_emulator.options(sanitizer=sanitizer), pytest.raises(metal_emulator.KernelMemoryError) as error:
        copy_kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i + 4];")
    message = str(error.value)
    assert "heap-buffer-overflow" in message and "input `x`" in message and "copy.source:2" in message
    if sanitizer is None:
        assert "read past the end of input `x`: byte 0 after its 160 bytes" in message


def test_a_write_into_an_input_is_caught(metal_emulator):
    with pytest.raises(metal_emulator.KernelMemoryError, match="wrote into input `x`, which is const"):
        copy_kernel("uint i = thread_position_in_grid.x;\n((device float*)x)[i] = 0;\nout[i] = x[i];")


def test_uninitialised_threadgroup_memory_reads_as_nan(metal_emulator):
    out = copy_kernel(
        "threadgroup float tile[32];\n"
        "uint i = thread_index_in_threadgroup;\n"
        "if (i % 2 == 0) tile[i] = x[thread_position_in_grid.x];\n"
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "out[thread_position_in_grid.x] = tile[i];"
    )
    assert mx.isnan(out[1::2]).all().item()
    assert mx.array_equal(out[::2], mx.arange(0, 40, 2, dtype=mx.float32)).item()


def test_a_compile_error_names_the_body_line(metal_emulator):
    with pytest.raises(metal_emulator.KernelCompileError, match=r"copy\.source:2:\d+: error: .*undeclared_name"):
        copy_kernel("uint i = thread_position_in_grid.x;\nout[i] = x[i] + undeclared_name;")


def test_a_simd_call_in_divergent_code_is_reported_not_hung(metal_emulator):
    body = (
        "uint i = thread_position_in_grid.x;\n"
        "if (thread_index_in_simdgroup < 16) { out[i] = simd_sum(x[i]); }\n"
        "else { threadgroup_barrier(mem_flags::mem_threadgroup); out[i] = 0; }"
    )
    with pytest.raises(
        metal_emulator.KernelRunError, match=r"deadlock: threads 0-15 wait in simd_sum \(copy\.source:2"
    ):
        copy_kernel(body)


def test_threadgroup_limits_are_metal_limits(metal_emulator):
    with pytest.raises(metal_emulator.KernelRunError, match="over the 32 KiB limit"):
        copy_kernel("threadgroup float big[8193];\nbig[0] = 1;\nout[thread_position_in_grid.x] = big[0];")
    kernel = mx.fast.metal_kernel(name="wide", input_names=["x"], output_names=["out"], source="out[0] = x[0];")
    with pytest.raises(ValueError, match="maximum allowed threads per threadgroup"):
        kernel(
            inputs=[mx.zeros((1,))],
            grid=(2048, 1, 1),
            threadgroup=(1025, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


def test_atomic_outputs_with_init_value(metal_emulator):
    kernel = mx.fast.metal_kernel(
        name="histogram",
        input_names=["x"],
        output_names=["counts", "odd"],
        source="uint i = thread_position_in_grid.x;\n"
        "atomic_fetch_add_explicit(&counts[x[i] % 4], 1.0f, memory_order_relaxed);\n"
        "if (x[i] % 2) atomic_fetch_add_explicit(&odd[0], 1, memory_order_relaxed);",
        atomic_outputs=True,
    )
    x = mx.arange(50, dtype=mx.uint32)
    counts, odd = kernel(
        inputs=[x],
        grid=(50, 1, 1),
        threadgroup=(16, 1, 1),
        output_shapes=[(4,), (1,)],
        output_dtypes=[mx.float32, mx.int32],
        init_value=2,
    )
    assert counts.tolist() == [15.0, 15.0, 14.0, 14.0] and odd.tolist() == [27]


def test_shim_types_behave_as_metal(metal_emulator):
    # half limits (libstdc++'s are 0 for _Float16), bfloat rounding, vectors and dot.
    body = """
        out[0] = float(metal::numeric_limits<half>::max());
        out[1] = float(Limits<half>::finite_min);
        out[2] = float(bfloat16_t(1.00390625f));
        out[3] = dot(float4(1.0f, 2, 3, 4), float4(half4(2.0h)));
        out[4] = metal::precise::rsqrt(4.0f) + metal::fast::exp(0.0f);
        out[5] = float(half(1.0h) + half(0.0004h));
        out[6] = float(popcount(0xF0u) + clz(1u) + ctz(8u) + max3(1, 7, 3));
    """
    header = "#include <metal_stdlib>\nusing namespace metal;\n"  # as Metal sources often start
    kernel = mx.fast.metal_kernel(name="types", input_names=["x"], output_names=["out"], source=body, header=header)
    out = kernel(
        inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(7,)], output_dtypes=[mx.float32]
    )
    assert out[0].tolist() == [65504.0, -65504.0, 1.0, 20.0, 1.5, 1.0, 4 + 31 + 3 + 7]


SIMD_FUNCTIONS_SOURCE = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    device float* o = out + i * 7;
    o[0] = simd_shuffle_xor(v, 5);
    o[1] = simd_shuffle_down(v, 3);
    o[2] = simd_broadcast(v, 2);
    o[3] = simd_prefix_exclusive_sum(v);
    o[4] = quad_sum(v);
    o[5] = simd_max(v);
    o[6] = simd_shuffle_up(v, 1);
"""


def simd_expected(n_threads: int) -> list:
    """What each lane gets on a 32-wide simdgroup; None where the source lane is absent."""
    rows = []
    for i in range(n_threads):
        base, lane = i // 32 * 32, i % 32
        live = min(32, n_threads - base)

        def lane_value(j):
            return float(base + j) if j < live else None

        quad = range(lane // 4 * 4, lane // 4 * 4 + 4)
        rows.append(
            [
                lane_value(lane ^ 5),
                lane_value(lane + 3) if lane + 3 < 32 else float(i),
                lane_value(2),
                float(sum(base + j for j in range(lane))),
                float(sum(base + j for j in quad if j < live)),
                float(base + live - 1),
                lane_value(lane - 1) if lane >= 1 else float(i),
            ]
        )
    return rows


def test_simd_functions_on_a_partial_simdgroup(metal_emulator):
    kernel = mx.fast.metal_kernel(
        name="simd_fns", input_names=["x"], output_names=["out"], source=SIMD_FUNCTIONS_SOURCE
    )
    n = 48  # the second simdgroup has 16 live lanes
    out = kernel(
        inputs=[mx.arange(n, dtype=mx.float32)],
        grid=(n, 1, 1),
        threadgroup=(n, 1, 1),
        output_shapes=[(n, 7)],
        output_dtypes=[mx.float32],
    )[0].tolist()
    for thread, (got, want) in enumerate(zip(out, simd_expected(n))):
        # An absent lane's value is undefined on the GPU; the emulator gives NaN.
        matches = [math.isnan(g) if w is None else g == w for g, w in zip(got, want)]
        assert all(matches), (thread, got, want)


def test_reverse_groups_exposes_a_group_that_reads_another_groups_output(metal_emulator):
    body = """
        uint g = threadgroup_position_in_grid.x;
        uint i = thread_index_in_threadgroup;
        if (g == 0) out[i] = x[i];
        if (g == 1) out[32 + i] = out[i] * 2;  // a race on the GPU: groups run in any order
    """
    kernel = mx.fast.metal_kernel(name="cross_group", input_names=["x"], output_names=["out"], source=body)

    def run():
        x = mx.arange(32, dtype=mx.float32)
        return kernel(
            inputs=[x], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32]
        )[0]

    assert mx.array_equal(run()[32:], 2 * mx.arange(32, dtype=mx.float32)).item()
    with metal_emulator.options(reverse_groups=True):
        assert mx.isnan(run()[32:]).all().item()


def test_argument_errors_are_mlxs_own(metal_emulator):
    from tests.metal_emulator.mlx_reference import _MLX_METAL_KERNEL

    arguments = dict(name="args", input_names=["x", "y"], output_names=["out"], source="out[0] = x[0];")
    calls = [
        dict(inputs=[mx.zeros((2,))], output_shapes=[(1,)], output_dtypes=[mx.float32]),
        dict(inputs=[mx.zeros((2,)), 1], output_shapes=[(1,), (1,)], output_dtypes=[mx.float32]),
        dict(inputs=[mx.zeros((2,)), 1], output_shapes=[(1,)], output_dtypes=[mx.float32], template=[("T", 1.5)]),
    ]
    for call in calls:
        call = dict(call, grid=(1, 1, 1), threadgroup=(1, 1, 1))
        with pytest.raises(ValueError) as theirs:
            _MLX_METAL_KERNEL(**arguments)(**call)
        with pytest.raises(ValueError) as ours:
            metal_emulator.metal_kernel(**arguments)(**call)
        assert str(ours.value).strip() == str(theirs.value).strip()
    with pytest.raises(ValueError, match="at least one output"):
        metal_emulator.metal_kernel(name="none", input_names=[], output_names=[], source="")


DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32, mx.int64, mx.uint8, mx.bool_]


def test_every_dtype_goes_through_buffers_and_arithmetic(metal_emulator):
    names = [f"in{k}" for k in range(len(DTYPES))]
    body = "uint i = thread_position_in_grid.x;\n" + "".join(
        f"out{k}[i] = in{k}[i] + 3;\n" for k in range(len(DTYPES) - 1)
    )
    body += f"out{len(DTYPES) - 1}[i] = !in{len(DTYPES) - 1}[i];\n"
    kernel = mx.fast.metal_kernel(
        name="dtypes", input_names=names, output_names=[f"out{k}" for k in range(len(DTYPES))], source=body
    )
    base = mx.arange(10) * 7 % 11
    inputs = [(base % 2 == 0) if d == mx.bool_ else base.astype(d) for d in DTYPES]
    outputs = kernel(
        inputs=inputs,
        grid=(10, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(10,)] * len(DTYPES),
        output_dtypes=DTYPES,
    )
    for dtype, x, y in zip(DTYPES, inputs, outputs):
        expected = mx.logical_not(x) if dtype == mx.bool_ else (x + 3).astype(dtype)
        assert y.dtype == dtype and mx.array_equal(y, expected).item(), dtype


def test_mlx_lm_norm_add_norm_kernels_match_ops_and_each_other(metal_emulator):
    # Two simdgroups per row: simd_sum, threadgroup memory and a barrier in a header function.
    module = fresh_module("mlx_lm.kernels.norm_add_norm")
    keys = iter(mx.random.split(mx.random.key(8), 6))
    D = 512
    branch, stream = (mx.random.normal((3, D), key=next(keys)) for _ in range(2))
    alpha, beta, post_w = (mx.random.uniform(0.5, 1.5, (D,), key=next(keys)) for _ in range(3))
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = mx.random.uniform(0.5, 1.5, (D,), key=next(keys))
    new_stream, normed = module.norm_add_norm(
        branch, stream, alpha=alpha, beta=beta, post_weight=post_w, post_eps=1e-6, next_norm=norm
    )
    expected_stream = alpha * stream + beta * rms_norm_ops(post_w * branch, 1e-6)
    assert max_error(new_stream, expected_stream) <= 1e-5
    assert max_error(normed, rms_norm_ops(expected_stream, 1e-5) * norm.weight) <= 1e-5
    # mlx-lm: "for a stream from norm_add_norm, the values are equal to its normed sum".
    assert mx.array_equal(module.pre_norm(new_stream, norm, dtype=mx.float32), normed).item()


def test_returned_lanes_drop_out_of_barriers_and_simd_sums(metal_emulator):
    body = """
        uint i = thread_index_in_threadgroup;
        if (i % 2 == 1 || i >= 40) return;  // the odd lanes, and all of the last simdgroup past 40
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = simd_sum(x[thread_position_in_grid.x]);
    """
    kernel = mx.fast.metal_kernel(name="early_return", input_names=["x"], output_names=["out"], source=body)
    out = kernel(
        inputs=[mx.arange(64, dtype=mx.float32)],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
        init_value=-1,
    )[0].tolist()
    assert out[0:32:2] == [float(sum(range(0, 32, 2)))] * 16
    assert out[32:40:2] == [float(sum(range(32, 40, 2)))] * 4
    assert out[1::2] == [-1.0] * 32 and out[40:] == [-1.0] * 24


# Attention for one query row per simdgroup: each lane takes every 32nd key with an online
# softmax, then the lanes combine with simd_max / simd_sum (the sdpa_vector pattern).
ATTENTION_SOURCE = """
    uint row = threadgroup_position_in_grid.y;
    uint lane = thread_index_in_simdgroup;
    const device T* q_row = q + row * D;
    float m = -metal::numeric_limits<float>::infinity(), l = 0.0f, acc[D];
    for (int d = 0; d < D; ++d) acc[d] = 0.0f;
    for (int n = lane; n < N; n += 32) {
        const device T* k_row = k + (row * N + n) * D;
        const device T* v_row = v + (row * N + n) * D;
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s += float(q_row[d]) * float(k_row[d]);
        s *= scale;
        float m_new = metal::max(m, s), correction = metal::fast::exp(m - m_new), p = metal::fast::exp(s - m_new);
        l = l * correction + p;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * correction + p * float(v_row[d]);
        m = m_new;
    }
    float m_all = simd_max(m);
    float factor = metal::fast::exp(m - m_all);
    float l_all = simd_sum(l * factor);
    for (int d = 0; d < D; ++d) {
        float o_d = simd_sum(acc[d] * factor);
        if (lane == 0) out[row * D + d] = static_cast<T>(o_d / l_all);
    }
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_an_attention_kernel_matches_scaled_dot_product_attention(metal_emulator, dtype):
    rows, keys, D, scale = 3, 45, 16, 16**-0.5  # 45 keys: lanes past 13 get one key fewer
    kernel = mx.fast.metal_kernel(
        name="row_attention", input_names=["q", "k", "v", "scale"], output_names=["out"], source=ATTENTION_SOURCE
    )
    q, k, v = (
        mx.random.normal(shape, key=mx.random.key(9 + i)).astype(dtype)
        for i, shape in enumerate([(rows, D), (rows, keys, D), (rows, keys, D)])
    )
    out = kernel(
        inputs=[q, k, v, scale],
        template=[("T", dtype), ("D", D), ("N", keys)],
        grid=(32, rows, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(rows, D)],
        output_dtypes=[dtype],
    )[0]
    f32 = [x.astype(mx.float32)[:, None, None] if x.ndim == 2 else x.astype(mx.float32)[:, None] for x in (q, k, v)]
    expected = mx.fast.scaled_dot_product_attention(*f32, scale=scale).reshape(rows, D)
    assert out.dtype == dtype and within_rounding(out, expected.astype(dtype), dtype)


def test_a_full_1024_thread_group_with_a_tree_reduction(metal_emulator):
    body = """
        threadgroup float buf[1024];
        uint l = thread_index_in_threadgroup;
        buf[l] = x[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint s = threads_per_threadgroup.x / 2; s > 0; s >>= 1) {
            if (l < s) buf[l] += buf[l + s];
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        if (l == 0) out[threadgroup_position_in_grid.x] = buf[0];
    """
    kernel = mx.fast.metal_kernel(name="tree_sum", input_names=["x"], output_names=["out"], source=body)
    x = mx.arange(2048, dtype=mx.float32) % 97
    out = kernel(
        inputs=[x], grid=(2048, 1, 1), threadgroup=(1024, 1, 1), output_shapes=[(2,)], output_dtypes=[mx.float32]
    )
    assert out[0].tolist() == x.reshape(2, 1024).sum(axis=1).tolist()
