"""g++ builds of kernels, cached by a hash of everything that goes into them.

A kernel is its own executable (kernel translation unit + the runtime objects),
so a crash cannot take pytest down, and the same kernel can be rebuilt with
AddressSanitizer or ThreadSanitizer."""

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import EmulatorError, KernelCompileError

CPP_DIR = Path(__file__).with_name("cpp")
RUNTIME_SOURCES = ("runtime_main.cpp", "scheduler.cpp", "guard_pages.cpp")
KERNEL_FLAGS = (
    "-std=c++20",
    "-O1",
    "-g",
    "-w",  # the kernel text is Metal's; host-compiler warnings about it are noise
    "-Wno-attributes",  # [[kernel]], [[buffer(0)]], ...
    "-Wno-unknown-pragmas",
    "-fsingle-precision-constant",  # 2.0 is a float in Metal
    "-fexcess-precision=fast",  # round every half operation (g++ 13 defaults to float intermediates)
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-fvisibility=hidden",
    "-fno-gnu-unique",
    "-pthread",
)
# The runtime is never instrumented: TSan must not see its hand-offs.
RUNTIME_FLAGS = ("-std=c++20", "-O2", "-g", "-Wall", "-pthread")
SANITIZER_FLAGS = {
    None: (),
    "address": ("-fsanitize=address", "-fno-omit-frame-pointer"),
    "thread": ("-fsanitize=thread",),
}


def compiler() -> str:
    """The C++ compiler to use (METAL_EMULATOR_CXX, default g++), or an EmulatorError."""
    name = os.environ.get("METAL_EMULATOR_CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise EmulatorError(f"the Metal emulator needs a C++20 compiler with _Float16: `{name}` is not on PATH")
    return path


@functools.lru_cache(maxsize=None)
def _identity(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode())
    for path in sorted(p for p in CPP_DIR.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(CPP_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


def _build(command: list, output: Path, failure) -> None:
    partial = output.with_name(f"{output.name}.{os.getpid()}.partial")
    result = subprocess.run(command + ["-o", str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise failure(result.stderr)
    os.replace(partial, output)  # atomic: parallel test runs never see half a file


def _runtime_objects(cxx: str, cache: Path) -> list:
    objects = []
    for source in RUNTIME_SOURCES:
        target = cache / f"runtime-{_key(_identity(cxx), source, RUNTIME_FLAGS)}.o"
        if not target.exists():

            def failure(stderr, source=source):
                return EmulatorError(f"the emulator runtime ({source}) does not compile:\n{stderr}")

            _build([cxx, *RUNTIME_FLAGS, "-c", str(CPP_DIR / source)], target, failure)
        objects.append(target)
    return objects


def _precompiled_shim(cxx: str, flags: tuple, cache: Path) -> Path:
    """A folder holding msl_shim.h.gch for these flags; searched before cpp/, it halves each
    kernel's compile time (g++ falls back to the header itself if the PCH does not fit)."""
    folder = cache / f"pch-{_key(_identity(cxx), flags)}"
    target = folder / "msl_shim.h.gch"
    if not target.exists():
        folder.mkdir(exist_ok=True)

        def failure(stderr):
            return EmulatorError(f"the MSL shim does not compile:\n{stderr}")

        _build([cxx, *flags, "-x", "c++-header", str(CPP_DIR / "msl_shim.h")], target, failure)
    return folder


def _compile_error(name: str, stderr: str, source_file: Path) -> KernelCompileError:
    text = stderr.replace(str(source_file), f"{name}.cpp")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 60:
        lines = lines[:60] + [f"... ({len(lines) - 60} more lines)"]
    return KernelCompileError(f"metal_kernel `{name}` does not compile:\n" + "\n".join(lines))


def kernel_executable(name: str, unit: str, sanitizer, cache: Path) -> Path:
    """Build (or find in the cache) the executable for one translation unit."""
    cxx = compiler()
    flags = KERNEL_FLAGS + SANITIZER_FLAGS[sanitizer]
    safe_name = re.sub(r"[^\w-]", "_", name)[:40]
    executable = cache / f"{safe_name}-{_key(_identity(cxx), flags, unit)}{'-' + sanitizer if sanitizer else ''}"
    if executable.exists():
        return executable
    objects = _runtime_objects(cxx, cache)
    source_file = executable.with_name(f"{executable.name}.{os.getpid()}.cpp")
    source_file.write_text(unit)
    shim = _precompiled_shim(cxx, flags, cache)
    includes = [f"-I{shim}", f"-I{CPP_DIR}", f"-I{CPP_DIR / 'metal_headers'}"]  # the last: #include <metal_stdlib>
    command = [cxx, *flags, *includes, str(source_file), *map(str, objects)]
    try:
        _build(command, executable, lambda stderr: _compile_error(name, stderr, source_file))
    finally:
        source_file.unlink(missing_ok=True)
    return executable


def unavailable_reason():
    """Why the emulator cannot run here, or None. On macOS the real Metal backend runs kernels."""
    if sys.platform == "darwin":
        return "on macOS the real Metal backend runs the kernels; the emulator is for Linux"
    name = os.environ.get("METAL_EMULATOR_CXX", "g++")
    if shutil.which(name) is None:
        return f"`{name}` is not installed: the Metal emulator compiles kernels with it"
    return None
