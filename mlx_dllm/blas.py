"""Which BLAS the CPU backend runs, and preloading OpenBLAS on Linux in place of the wheel's reference BLAS.

MLX's Linux CPU wheel links the netlib reference BLAS (fp32 matmul ~6 GFLOP/s); OpenBLAS preloaded with
LD_PRELOAD runs the same calls ~50x faster. LD_PRELOAD only acts at process start, so the commands that run
matmuls re-run themselves once with it set. Nothing here acts on macOS (Accelerate). Used by the CLI, `load` (the
warning) and the benchmark alike, so it lives in the library.
"""

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

REEXEC_GUARD = "MLX_DLLM_BLAS_PRELOADED"  # set in the re-run's environment: never re-exec twice
CHOICES = ("auto", "openblas", "reference")
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
FIX = "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) and the mlx-dllm commands preload it"


def blas_kind(path: str) -> Optional[str]:
    """The BLAS a shared-library path is, None when it is none. numpy's `libscipy_openblas64_` exports
    suffixed symbols that MLX never calls, so it does not count; OpenBLAS may also install a libblas.so.3."""
    name = Path(path).name
    for prefix, kind in (("libopenblas", "openblas"), ("libmkl_rt", "mkl"), ("libblis", "blis")):
        if name.startswith(prefix):
            return kind
    if name.startswith("libblas"):
        return "openblas" if "openblas" in path else "reference"
    return None


def loaded_blas(maps_text: str) -> Dict[str, str]:
    """{kind: path} of the BLAS libraries mapped into a process, from its /proc/PID/maps text."""
    found = {}
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and ".so" in fields[5]:
            kind = blas_kind(fields[5].strip())
            if kind is not None:
                found.setdefault(kind, fields[5].strip())
    return found


def active_blas(loaded: Dict[str, str]) -> str:
    """The BLAS whose symbols win: a preloaded optimized one over the wheel's reference one."""
    for kind in ("openblas", "mkl", "blis", "reference"):
        if kind in loaded:
            return kind
    return "unknown"


def current_blas() -> str:
    """The BLAS this process runs: `accelerate` on macOS; on Linux MLX is imported first, so its BLAS is mapped."""
    if sys.platform == "darwin":
        return "accelerate"
    import mlx.core  # noqa: F401

    try:
        return active_blas(loaded_blas(Path("/proc/self/maps").read_text()))
    except OSError:
        return "unknown"


def find_openblas() -> Optional[str]:
    return next((path for path in OPENBLAS_CANDIDATES if os.path.exists(path)), None)


def preload_environment(choice: str, environ: Dict[str, str], platform: str, blas: str, openblas: Optional[str]):
    """The environment to re-run with OpenBLAS preloaded, or None to run as we are."""
    if platform != "linux" or choice == "reference" or REEXEC_GUARD in environ or blas != "reference":
        return None
    if openblas is None:
        return None
    preload = " ".join(filter(None, [openblas, environ.get("LD_PRELOAD")]))
    return {**environ, "LD_PRELOAD": preload, REEXEC_GUARD: "1"}


def rerun_command(argv: List[str]) -> List[str]:
    """This command again, through the interpreter (the console script or `python -m` alike)."""
    return [sys.executable, "-m", "mlx_dllm.cli", *argv[1:]]


def ensure_blas(choice: str) -> None:
    """Re-exec with OpenBLAS preloaded when asked (`auto`, `openblas`) and possible; else return."""
    from .errors import DLLMError

    openblas = find_openblas() if sys.platform == "linux" else None
    if choice == "openblas" and sys.platform == "linux" and openblas is None and current_blas() != "openblas":
        raise DLLMError(f"--blas openblas: no OpenBLAS found ({FIX})")
    environment = preload_environment(choice, dict(os.environ), sys.platform, current_blas(), openblas)
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, rerun_command(sys.argv), environment)


def reference_blas_warning(blas: str, device: str, openblas: Optional[str] = None) -> Optional[str]:
    """One line telling a Linux CPU user that fp32 matmuls run on the slow reference BLAS, and the fix: preloading
    the OpenBLAS that is installed (`openblas`), else installing it."""
    if blas != "reference" or "cpu" not in device:
        return None
    fix = f"preload it with LD_PRELOAD={openblas}" if openblas else FIX
    return f"warning: MLX runs the reference BLAS (fp32 matmul ~50x slower than OpenBLAS): {fix}"


@lru_cache(maxsize=None)
def warn_reference_blas() -> None:
    """The warning above on stderr, once per process, where MLX's CPU backend runs the reference BLAS."""
    import mlx.core as mx

    warning = reference_blas_warning(current_blas(), str(mx.default_device()), find_openblas())
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
