"""mx.fast.metal_kernel, emulated: MLX's arguments, checks and results, run on the CPU."""

import math

import mlx.core as mx
import numpy as np

from . import compiler, launcher, settings
from .arrays import filled_bytes, from_bytes, input_layout
from .dtypes import UNSUPPORTED
from .errors import EmulatorError, KernelMemoryError
from .signature import InputInfo, write_kernel_source
from .translate import needs_threads, translation_unit

MAX_THREADS_PER_THREADGROUP = 1024
_MATH_MODES = ("safe", "relaxed", "fast")


def _check_size(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"[metal_kernel] Expected `{what}` to have size {expected} but got size {actual}.")


def _check_compile_options(options) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError("[metal_kernel] Expected `compile_options` to be a dict.")
    for key, value in options.items():
        if key != "math_mode":
            raise ValueError(f"[metal_kernel] Unknown compile option `{key}`.")
        if value not in _MATH_MODES:
            raise ValueError("[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'.")


def _check_stream(stream) -> None:
    if stream is None:
        return
    device = getattr(stream, "device", stream)
    if getattr(device, "type", device) != mx.gpu:
        raise ValueError("[metal_kernel] Only supports the GPU.")


def _template_args(template) -> list:
    checked = []
    for name, value in template or []:
        if not isinstance(value, (bool, int, mx.Dtype)):
            raise ValueError("[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`.")
        checked.append((name, value))
    return checked


def _dims(value, what: str) -> tuple:
    # nanobind takes tuple[int, int, int]: floats are a TypeError there too.
    if len(value) != 3 or not all(isinstance(n, int) for n in value):
        raise TypeError(f"[metal_kernel] `{what}` must be three ints, got {value!r}")
    return tuple(int(n) for n in value)


def _group(grid: tuple, threadgroup: tuple) -> tuple:
    """The threadgroup MLX dispatches: checked as given, then clipped to the grid."""
    threads = math.prod(threadgroup)
    if threads > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(
            f"Thread group size ({threads}) is greater than  the maximum allowed threads per "
            f"threadgroup ({MAX_THREADS_PER_THREADGROUP})."
        )
    if min(threadgroup) <= 0:
        raise ValueError(f"[metal_kernel] threadgroup sizes must be positive, got {threadgroup}")
    return tuple(min(t, g) for t, g in zip(threadgroup, grid))


class EmulatedKernel:
    """What metal_kernel returns: call it as MLX's kernel object."""

    def __init__(self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ) -> list:
        _check_size(len(inputs), len(self.input_names), "inputs")
        _check_size(len(output_shapes), len(self.output_names), "output_shapes")
        _check_size(len(output_dtypes), len(self.output_names), "output_dtypes")
        _check_stream(stream)
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        shapes = [tuple(int(n) for n in shape) for shape in output_shapes]
        kernel = self._kernel_source(arrays, list(output_dtypes), _template_args(template))
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{kernel.text()}\n```", flush=True)
        for dtype in [a.dtype for a in arrays] + list(output_dtypes):
            if dtype in UNSUPPORTED:
                raise EmulatorError(f"metal_kernel `{self.name}`: the emulator does not support {dtype}")
        grid = _dims(grid, "grid")
        group = _group(grid, _dims(threadgroup, "threadgroup"))
        buffers = self._buffers(arrays, kernel, shapes, output_dtypes, init_value)
        config = settings.current()
        dispatch = launcher.Dispatch(grid, group, needs_threads(kernel), config.reverse_threads, config.reverse_groups)
        produced = self._run(translation_unit(self.name, kernel), dispatch, buffers, config)
        return [from_bytes(data, shape, dtype) for data, shape, dtype in zip(produced, shapes, output_dtypes)]

    def _kernel_source(self, arrays, output_dtypes, template):
        inputs = [InputInfo(a.dtype, a.ndim, a.size) for a in arrays]
        return write_kernel_source(
            self.name,
            self.header,
            self.source,
            self.input_names,
            inputs,
            self.output_names,
            output_dtypes,
            template,
            self.atomic_outputs,
        )

    def _buffers(self, arrays, kernel, shapes, output_dtypes, init_value) -> list:
        layouts = [input_layout(a, self.ensure_row_contiguous) for a in arrays]
        buffers = []
        for param in kernel.params:
            i = param.source
            if param.kind == "input":
                buffers.append(launcher.Buffer(param.name, False, layouts[i].data, layouts[i].pointer_offset))
            elif param.kind == "shape":
                buffers.append(launcher.Buffer(param.name, False, np.array(arrays[i].shape, np.int32).tobytes()))
            elif param.kind == "strides":
                buffers.append(launcher.Buffer(param.name, False, np.array(layouts[i].strides, np.int64).tobytes()))
            elif param.kind == "ndim":
                buffers.append(launcher.Buffer(param.name, False, np.int32(arrays[i].ndim).tobytes()))
            elif param.kind == "output":
                buffers.append(launcher.Buffer(param.name, True, filled_bytes(shapes[i], output_dtypes[i], init_value)))
        return buffers

    def _run(self, unit, dispatch, buffers, config) -> list:
        cache = config.cache()
        executable = compiler.kernel_executable(self.name, unit, config.sanitizer, cache)
        try:
            return launcher.run(executable, self.name, dispatch, buffers, config.timeout)
        except KernelMemoryError as fault:
            if config.sanitizer is not None:
                raise
            # Rerun under ASan for the access and the body line.
            checked = compiler.kernel_executable(self.name, unit, "address", cache)
            try:
                launcher.run(checked, self.name, dispatch, buffers, config.timeout)
            except KernelMemoryError as report:
                raise KernelMemoryError(f"{fault}\nRerun with AddressSanitizer: {report}") from None
            raise fault


def metal_kernel(
    name,
    input_names,
    output_names,
    source,
    header="",
    ensure_row_contiguous=True,
    atomic_outputs=False,
    compile_options=None,
):
    """Same signature as mx.fast.metal_kernel (compile_options is checked, then ignored)."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    _check_compile_options(compile_options)
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)
