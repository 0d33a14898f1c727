"""A Metal emulator for tests: runs mx.fast.metal_kernel bodies on a Linux CPU.

Use it through the `metal_emulator` pytest fixture (tests/conftest.py), which
puts `metal_kernel` in place of mx.fast.metal_kernel. See README.md for the
design and for what it cannot catch."""

from .compiler import unavailable_reason
from .errors import EmulatorError, KernelCompileError, KernelMemoryError, KernelRaceError, KernelRunError
from .kernel import metal_kernel
from .settings import current, options, set_cache_dir

__all__ = [
    "EmulatorError",
    "KernelCompileError",
    "KernelMemoryError",
    "KernelRaceError",
    "KernelRunError",
    "current",
    "metal_kernel",
    "options",
    "set_cache_dir",
    "unavailable_reason",
]
