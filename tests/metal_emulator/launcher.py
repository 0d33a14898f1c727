"""Run a kernel executable on a set of buffers and turn its failures into errors."""

import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelMemoryError, KernelRaceError, KernelRunError


@dataclass(frozen=True)
class Buffer:
    name: str
    output: bool
    data: bytes  # an output's starting contents
    pointer_offset: int = 0


@dataclass(frozen=True)
class Dispatch:
    grid: tuple
    threadgroup: tuple  # already clipped to the grid, as MLX does
    threaded: bool
    reverse_threads: bool = False
    reverse_groups: bool = False


_SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:exitcode=65:abort_on_error=0",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0:history_size=4",
}
_RACE, _ASAN, _FAULT = 66, 65, 4  # TSan, ASan, the runtime's fault handler
_SHADOW_CLASH = "unexpected memory mapping"


def _work_dir() -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _job_text(dispatch: Dispatch, buffers, offsets) -> str:
    lines = [
        f"threaded {int(dispatch.threaded)}",
        f"reverse_threads {int(dispatch.reverse_threads)}",
        f"reverse_groups {int(dispatch.reverse_groups)}",
        "grid {} {} {}".format(*dispatch.grid),
        "threadgroup {} {} {}".format(*dispatch.threadgroup),
    ]
    for buffer, offset in zip(buffers, offsets):
        kind = "output" if buffer.output else "input"
        lines.append(f"buffer {kind} {buffer.name} {len(buffer.data)} {offset} {buffer.pointer_offset}")
    return "\n".join(lines) + "\n"


def _excerpt(report: str, start: str, limit: int = 40) -> str:
    lines = report[report.find(start) :].splitlines() if start in report else report.splitlines()
    lines = [line for line in lines if "libtsan" not in line and "libasan" not in line]
    return "\n".join(lines[:limit])


def _asan_buffer(stderr: str) -> str:
    """Which kernel buffer an ASan report is about, from the addresses the runtime printed."""
    blocks = {
        int(a, 16): f"{kind} `{name}`"
        for kind, name, a in re.findall(r"metal-emulator-buffer (\w+) (\w+) (0x[0-9a-f]+)", stderr)
    }
    region = re.search(r"region \[(0x[0-9a-f]+),", stderr)
    if region and int(region.group(1), 16) in blocks:
        return f" (next to {blocks[int(region.group(1), 16)]})"
    return ""


def _failure(name: str, result: subprocess.CompletedProcess) -> Exception:
    stderr = result.stderr
    ours = [line[len("metal-emulator: ") :] for line in stderr.splitlines() if line.startswith("metal-emulator: ")]
    if result.returncode == _RACE:
        excerpt = _excerpt(stderr, "WARNING: ThreadSanitizer")
        return KernelRaceError(f"metal_kernel `{name}`: data race (a missing threadgroup_barrier?):\n{excerpt}")
    if result.returncode == _ASAN:
        excerpt = _excerpt(re.sub(r"metal-emulator-buffer .*\n", "", stderr), "ERROR: AddressSanitizer")
        return KernelMemoryError(f"metal_kernel `{name}`: invalid memory access{_asan_buffer(stderr)}:\n{excerpt}")
    if ours and result.returncode == _FAULT:
        return KernelMemoryError(f"metal_kernel `{name}`: " + "\n".join(ours))
    if ours:
        return KernelRunError(f"metal_kernel `{name}`: " + "\n".join(ours))
    if result.returncode < 0:
        signame = signal.Signals(-result.returncode).name
        return KernelMemoryError(f"metal_kernel `{name}` crashed with {signame}:\n{stderr[-4000:]}")
    return KernelRunError(f"metal_kernel `{name}` failed (exit code {result.returncode}):\n{stderr[-4000:]}")


def _execute(name: str, command: list, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **_SANITIZER_ENV}
        )
    except subprocess.TimeoutExpired:
        raise KernelRunError(f"metal_kernel `{name}` did not finish in {timeout:.0f} s") from None


def run(executable: Path, name: str, dispatch: Dispatch, buffers, timeout: float) -> list:
    """The final bytes of every output buffer, in order."""
    offsets, position = [], 0
    for buffer in buffers:
        offsets.append(position)
        position += len(buffer.data)
    with tempfile.TemporaryDirectory(prefix="metal-emulator-", dir=_work_dir()) as folder:
        job, data, out = (os.path.join(folder, f) for f in ("job.txt", "data.bin", "out.bin"))
        Path(job).write_text(_job_text(dispatch, buffers, offsets))
        with open(data, "wb") as sink:
            for buffer in buffers:
                sink.write(buffer.data)
        command = [str(executable), job, data, out]
        result = _execute(name, command, timeout)
        if _SHADOW_CLASH in result.stderr and shutil.which("setarch"):
            # Kernels with 32 bits of mmap randomisation (Ubuntu 24.04) break GCC's sanitizers.
            result = _execute(name, ["setarch", platform.machine(), "-R", *command], timeout)
        if result.returncode != 0:
            raise _failure(name, result)
        produced = Path(out).read_bytes()
    outputs, position = [], 0
    for buffer in buffers:
        if buffer.output:
            outputs.append(produced[position : position + len(buffer.data)])
            position += len(buffer.data)
    return outputs
