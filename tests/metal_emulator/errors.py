"""Errors the emulator raises; wrong arguments raise MLX's own ValueError/TypeError instead."""


class EmulatorError(Exception):
    """Base class: the kernel itself is wrong (or the emulator cannot run it)."""


class KernelCompileError(EmulatorError):
    """The kernel does not compile; the message holds the compiler's output."""


class KernelRunError(EmulatorError):
    """The kernel failed while running: deadlock, canary, limit, crash or timeout."""


class KernelRaceError(KernelRunError):
    """ThreadSanitizer found a data race (sanitizer="thread")."""


class KernelMemoryError(KernelRunError):
    """An out-of-bounds or invalid memory access (AddressSanitizer or a crash)."""
