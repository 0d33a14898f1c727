"""MLX's kernel source -> one C++ translation unit for g++.

Two rewrites keep Metal text valid C++ without changing line numbers: each
`threadgroup T name[N];` declaration becomes a reference into the group's
shared (poisoned) memory, and half literals (1.0h) become ((half)1.0f).
#line directives make compiler errors, sanitizer reports and deadlock messages
point at "<name>.source" lines of the kernel body."""

import re

from .signature import KernelSource

_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?"
_DECLARATOR = r"[A-Za-z_]\w*\s*(?:\[[^\[\];]*\]\s*)*"
_THREADGROUP_DECL = re.compile(rf"\bthreadgroup\s+((?:const\s+)?{_TYPE})\s+({_DECLARATOR}(?:,\s*{_DECLARATOR})*);")
_NAME_AND_DIMS = re.compile(r"\s*([A-Za-z_]\w*)\s*((?:\[[^\[\];]*\]\s*)*)")
_HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")

# Text that means the threads of a group talk to each other.
_COOPERATION = ("barrier", "simd_", "quad_")


def _threadgroup_declaration(match: re.Match) -> str:
    element = match.group(1)
    parts = []
    for declarator in match.group(2).split(","):
        name, dims = _NAME_AND_DIMS.match(declarator).groups()
        parts.append(f"auto& {name} = *::emu::threadgroup_array<{element}{dims.strip()}>();")
    return " ".join(parts) + "\n" * match.group(0).count("\n")


def _half_literal(match: re.Match) -> str:
    number, exponent = match.group(1), match.group(2) or ""
    if "." not in number and not exponent:
        number += ".0"
    return f"((half){number}{exponent}f)"


def rewrite_body(text: str) -> str:
    text = _THREADGROUP_DECL.sub(_threadgroup_declaration, text)
    return _HALF_LITERAL.sub(_half_literal, text)


def needs_threads(kernel: KernelSource) -> bool:
    """Kernels without barriers or simd functions run serially, much faster."""
    text = kernel.header + kernel.body
    return any(word in text for word in _COOPERATION)


def _file_label(name: str, part: str) -> str:
    safe = re.sub(r"[^\w.-]", "_", name)
    return f"{safe}.{part}"


def _line(name: str, part: str, previous: str) -> str:
    # A directive must start a line; MLX's text does not always end one.
    start = "" if previous == "" or previous.endswith("\n") else "\n"
    return f'{start}#line 1 "{_file_label(name, part)}"\n'


def _argument(index: int, param) -> str:
    if param.kind == "attribute":
        if param.c_type == "uint3":
            return f"::emu::uint3_of(t->{param.name})"
        return f"t->{param.name}"
    pointer_type = param.c_type.rstrip("*&") + "*"
    cast = f"({pointer_type})b[{index}]"
    return f"*{cast}" if param.c_type.endswith("&") else cast


def _entry(kernel: KernelSource) -> str:
    buffers = [p for p in kernel.params if p.kind != "attribute"]
    arguments = [_argument(i, p) for i, p in enumerate(buffers)]
    arguments += [_argument(-1, p) for p in kernel.params if p.kind == "attribute"]
    call = kernel.function_name + kernel.template_args
    joined = ",\n      ".join(arguments)
    return (
        'extern "C" __attribute__((visibility("default"))) '
        "void emu_kernel_entry(void* const* b, const ::emu::ThreadIds* t) {\n"
        f"  (void)b;\n  (void)t;\n  {call}(\n      {joined});\n}}\n"
    )


def translation_unit(name: str, kernel: KernelSource) -> str:
    """The C++ the emulator compiles for one kernel instantiation."""
    header = rewrite_body(kernel.header)
    body = rewrite_body(kernel.body)
    return "".join(
        [
            '#include "msl_shim.h"\n',
            _line(name, "header", "\n"),
            header,
            _line(name, "signature", header),
            kernel.signature,
            _line(name, "source", kernel.signature),
            body,
            kernel.footer,
            _line(name, "entry", kernel.footer),
            _entry(kernel),
        ]
    )
