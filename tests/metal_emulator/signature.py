"""The Metal source MLX generates around a kernel body, by MLX's own rules
(mlx/backend/common/metal_kernel.cpp): the signature, the kernel's name and the
template instantiation. tests/test_metal_emulator.py checks the text against
what MLX itself prints."""

from dataclasses import dataclass

import mlx.core as mx

from .dtypes import type_name

# MLX passes fewer elements than this in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's table, in MLX's order: an attribute is passed when its name occurs in the source.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


@dataclass(frozen=True)
class Param:
    """One kernel argument. kind: input, shape, strides, ndim, output or attribute."""

    kind: str
    name: str
    c_type: str  # as written in the signature, e.g. "const constant float&"
    source: int = -1  # the input or output it belongs to


@dataclass(frozen=True)
class KernelSource:
    function_name: str
    template_args: str  # "<float, 3, 1>" or ""
    header: str
    signature: str  # from "template <...>" to the opening brace and newline
    body: str
    footer: str  # closing brace and the explicit instantiation
    params: tuple

    def text(self) -> str:
        """Exactly the kernel source MLX hands the Metal compiler (after its prelude)."""
        return self.header + self.signature + self.body + self.footer


@dataclass(frozen=True)
class InputInfo:
    dtype: mx.Dtype
    ndim: int
    size: int


def shape_infos(source: str, input_names) -> list:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def used_attributes(source: str) -> list:
    return [(name, c_type) for name, c_type in METAL_ATTRIBUTES if name in source]


def template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return type_name(value)


def template_text(template) -> str:
    return "<" + ", ".join(template_value(v) for _, v in template) + ">"


def template_hash(text: str) -> str:
    # MLX: '<' and '>' become '_', ", " becomes '_', and the last character goes.
    return text.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]


def kernel_name(name: str, template, inputs, output_dtypes) -> str:
    result = "custom_kernel_" + name
    if template:
        result += "_" + template_hash(template_text(template))
    for info in inputs:
        result += "_" + type_name(info.dtype)
        if info.ndim == 0:
            result += "s"
        elif info.size < MAX_CONSTANT_ARRAY_SIZE:
            result += "c"
    for dtype in output_dtypes:
        result += "_" + type_name(dtype)
    return result


def _template_params(template) -> str:
    kinds = []
    for name, value in template:
        kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "typename"
        kinds.append(f"{kind} {name}")
    return "template <" + ", ".join(kinds) + ">\n"


def _input_params(input_names, inputs, infos):
    params = []
    for i, (name, info, (shape, strides, ndim)) in enumerate(zip(input_names, inputs, infos)):
        location = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if info.ndim == 0 else "*"
        params.append(Param("input", name, f"const {location} {type_name(info.dtype)}{ref}", i))
        if info.ndim > 0:
            if shape:
                params.append(Param("shape", f"{name}_shape", "const constant int*", i))
            if strides:
                params.append(Param("strides", f"{name}_strides", "const constant int64_t*", i))
            if ndim:
                params.append(Param("ndim", f"{name}_ndim", "const constant int&", i))
    return params


def write_kernel_source(
    name, header, source, input_names, inputs, output_names, output_dtypes, template, atomic_outputs
) -> KernelSource:
    """inputs: InputInfo per input; template: [(name, Dtype | int | bool)]."""
    function_name = kernel_name(name, template, inputs, output_dtypes)
    params = _input_params(input_names, inputs, shape_infos(source, input_names))
    for i, (out_name, dtype) in enumerate(zip(output_names, output_dtypes)):
        element = f"atomic<{type_name(dtype)}>" if atomic_outputs else type_name(dtype)
        params.append(Param("output", out_name, f"device {element}*", i))
    params += [Param("attribute", attr, c_type) for attr, c_type in used_attributes(source)]

    # MLX's separators, including its test on the buffer index (which counts
    # shape/strides/ndim buffers too) after each output.
    signature = (_template_params(template) if template else "") + f"[[kernel]] void {function_name}(\n"
    buffers = [p for p in params if p.kind != "attribute"]
    attributes = [p for p in params if p.kind == "attribute"]
    last = len(inputs) + len(output_names) - 1
    for index, param in enumerate(buffers):
        signature += f"  {param.c_type} {param.name} [[buffer({index})]]"
        if param.kind != "output" or index < last or attributes:
            signature += ",\n"
        else:
            signature += ") {\n"
    for index, param in enumerate(attributes):
        signature += f"  {param.c_type} {param.name} [[{param.name}]]"
        signature += ",\n" if index < len(attributes) - 1 else ") {\n"

    footer = "\n}\n"
    template_args = template_text(template) if template else ""
    if template:
        instance = function_name + template_args
        footer += f'\ntemplate [[host_name("{function_name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return KernelSource(function_name, template_args, header, signature, source, footer, tuple(params))
