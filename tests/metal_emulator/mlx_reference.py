"""MLX's own generated source for a kernel call, on a machine without Metal.

metal_kernel cannot run here, but mx.export_function traces a call to it, and
with verbose=True MLX prints the complete source to file descriptor 1 while it
traces. The test of our signature generation compares against this text."""

import contextlib
import os
import sys
import tempfile

import mlx.core as mx

_MLX_METAL_KERNEL = mx.fast.metal_kernel  # taken at import, before any monkeypatch


@contextlib.contextmanager
def _captured_fd1():
    """Yield a list that holds what was written to fd 1 once the block ends."""
    sys.stdout.flush()
    saved = os.dup(1)
    text = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield text
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode())


def mlx_generated_source(kernel_args: dict, call_args: dict) -> str:
    """The source MLX generates for metal_kernel(**kernel_args)(**call_args)."""
    if getattr(_MLX_METAL_KERNEL, "__module__", "").startswith("tests."):
        raise RuntimeError("mx.fast.metal_kernel was already patched when mlx_reference was imported")
    kernel = _MLX_METAL_KERNEL(**kernel_args)
    inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in call_args["inputs"]]
    rest = {k: v for k, v in call_args.items() if k not in ("inputs", "verbose")}

    def traced(*arrays):
        return kernel(inputs=list(arrays), verbose=True, **rest)

    with tempfile.TemporaryDirectory() as folder, _captured_fd1() as printed:
        mx.export_function(os.path.join(folder, "kernel.mlxfn"), traced, *inputs)
    output = printed[0]
    opening = f"Generated source code for `{kernel_args['name']}`:\n```\n"
    start = output.index(opening) + len(opening)
    return output[start : output.rindex("\n```")]
