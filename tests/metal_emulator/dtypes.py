"""MLX dtypes as Metal type names (MLX's get_type_string) and as raw bytes."""

import mlx.core as mx

TYPE_NAMES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

# Metal has no double and the shim no complex type.
UNSUPPORTED = {mx.float64, mx.complex64}

# Same-size unsigned types, to move any dtype's bits through numpy.
BITS_VIEW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def type_name(dtype: mx.Dtype) -> str:
    try:
        return TYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"Unsupported compilation type {dtype}") from None
