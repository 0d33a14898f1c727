"""Where a written model folder goes (a conversion, a trained drafter): destination checks, a staged folder,
and an atomic swap into place.

`--force` replaces only a previous conversion; a failure (an error, Ctrl-C, SIGTERM, a full disk) leaves the
old folder, or nothing, behind. Where no atomic exchange exists, a kill between the two renames of a replacement
leaves the old folder aside: the next conversion into `mlx_path` puts it back, and `load` says where it is.
"""

import ctypes
import errno
import os
import re
import shutil
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, Optional

from . import __version__, loading
from .checkpoint_files import INDEX_FILE, LORA_FOLDER, TOKENIZER_PATTERNS, checkpoint_root, parked_copies, sibling
from .configs import write_json
from .errors import DLLMError
from .signals import terminate_unwinds

# Written last into every conversion: `--force` replaces only a folder that has it (and nothing we did not write).
MARKER = "mlx_dllm_conversion.json"
CONVERSION_PATTERNS = (MARKER, "config.json", "model*.safetensors", INDEX_FILE, *TOKENIZER_PATTERNS)
CONVERSION_FOLDERS = (LORA_FOLDER,)
IGNORED_ENTRIES = (".DS_Store",)  # Finder's, not the user's
# Errors that are always about the folder being written, whichever file (a copy's source) they name.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# MLX's file writer throws these without errno (mlx/io/load.h, safetensors.cpp as of mlx 0.32).
MLX_WRITE_FAILURE = re.compile(r"\[write\] Unable to write (\d+) bytes")
MLX_OPEN_FAILURE = re.compile(r"\[save\w*\] Failed to open file (.+)")


def check_destination(mlx_path: Path, force: bool) -> None:
    """Refuse any `mlx_path` whose replacement could delete something that is not a previous conversion.

    A previous conversion that an interrupted replacement left aside is put back first, so it is never lost."""
    restored = restore_parked(mlx_path)
    if mlx_path.is_symlink():
        raise DLLMError(f"{mlx_path} is a symbolic link; give the folder it points to")
    if mlx_path.exists() and not mlx_path.is_dir():
        raise DLLMError(f"{mlx_path} is a file, not a folder; it is never replaced")
    here = Path.cwd().resolve()
    if here.is_relative_to(mlx_path.resolve()):
        raise DLLMError(f"{mlx_path} is (or holds) the current directory; give a new folder for the MLX model")
    if not mlx_path.is_dir() or not any(mlx_path.iterdir()):
        return
    if not force and restored is not None:
        raise DLLMError(f"{mlx_path} was restored from {restored.name}, where an interrupted --force had left it; "
                        "use --force to replace it")
    if not force:
        raise DLLMError(f"{mlx_path} already exists and is not empty (use --force to replace it)")
    check_previous_conversion(mlx_path)


def restore_parked(mlx_path: Path) -> Optional[Path]:
    """Put back the previous conversion that a replacement killed between its two renames left aside (see
    `_replace`); returns where it was, None when there was nothing to restore."""
    if os.path.lexists(mlx_path):
        return None
    parked = parked_copies(mlx_path)
    if len(parked) > 1:
        names = ", ".join(str(folder) for folder in parked)
        raise DLLMError(
            f"{mlx_path} is missing: interrupted replacements left earlier conversions of it in {names}; "
            f"rename the one to keep back to {mlx_path.name}"
        )
    if not parked:
        return None
    try:
        os.rename(parked[0], mlx_path)
    except OSError as error:
        raise DLLMError(
            f"{mlx_path} is missing and its previous conversion is in {parked[0]}, which cannot be renamed back: "
            f"{error.strerror}"
        ) from error
    return parked[0]


def check_previous_conversion(mlx_path: Path) -> None:
    """A previous conversion has our marker and only what a conversion writes, so replacing it loses nothing else."""
    if not (mlx_path / MARKER).is_file():
        raise DLLMError(f"{mlx_path} is not an mlx-dllm conversion (no {MARKER}); --force replaces only those")
    foreign = [entry.name for entry in sorted(mlx_path.iterdir()) if not is_conversion_entry(entry)]
    if foreign:
        raise DLLMError(f"{mlx_path} holds {foreign[0]}, which no conversion writes; --force will not delete it")


def is_conversion_entry(entry: Path) -> bool:
    if entry.name in IGNORED_ENTRIES:
        return True
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return entry.name in CONVERSION_FOLDERS
    return entry.is_file() and any(fnmatch(entry.name, pattern) for pattern in CONVERSION_PATTERNS)


def check_apart_from_source(mlx_path: Path, source: Path) -> None:
    """The output may neither be nor hold nor sit inside the checkpoint (a hub snapshot: its whole cache folder)."""
    output, checkpoint = mlx_path.resolve(), checkpoint_root(source)
    if output.is_relative_to(checkpoint) or checkpoint.is_relative_to(output):
        raise DLLMError(f"{mlx_path} overlaps the checkpoint in {source}; give a folder outside it")


@contextmanager
def staged_folder(mlx_path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `mlx_path`; once filled and loadable it becomes `mlx_path`, else it goes.

    A full disk (MLX's writers included), a read-only folder or an I/O error is one line naming `mlx_path`;
    SIGTERM unwinds like Ctrl-C.
    """
    check_destination(mlx_path, force)
    with terminate_unwinds():
        try:
            mlx_path.parent.mkdir(parents=True, exist_ok=True)
            staging = sibling(mlx_path, "partial")
            staging.mkdir()  # unlike mkdtemp, honours the umask: the folder ends up as mlx_path
        except OSError as error:
            raise write_error(mlx_path, error) from error
        try:
            yield staging
            write_json(staging / MARKER, {"format": "mlx-dllm conversion", "version": __version__})
            check_loads(staging, mlx_path)
            _replace(staging, mlx_path)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            failure = write_failure(error)
            if failure is None:
                raise
            raise write_error(mlx_path, failure, staging) from error


def write_failure(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: itself, or the one MLX's writers report as a bare RuntimeError."""
    if isinstance(error, OSError):
        return error
    if not isinstance(error, RuntimeError):
        return None
    message = str(error)
    written = MLX_WRITE_FAILURE.match(message)
    if written is not None:  # write() failed: on a local file a full disk, rarely a quota or I/O error
        reason = f"No space left on device (or an I/O error: MLX could not write {written[1]} bytes)"
        return OSError(errno.ENOSPC, reason)
    opened = MLX_OPEN_FAILURE.match(message)
    if opened is not None:
        return OSError(f"MLX could not create {Path(opened[1]).name}")
    return None


def write_error(mlx_path: Path, error: OSError, staging: Optional[Path] = None) -> DLLMError:
    """One line for a full disk, read-only folder or I/O error; it names the source file when reading failed."""
    reason = error.strerror or str(error).splitlines()[0]
    culprit = str(error.filename) if error.filename is not None else None
    # A copy that fills the disk names its source (shutil), but the disk being written is the culprit.
    read_failure = culprit is not None and error.errno not in WRITE_ERRNOS
    if read_failure and (staging is None or not culprit.startswith(str(staging))):
        return DLLMError(f"cannot convert into {mlx_path}: {culprit}: {reason}; nothing was written there")
    return DLLMError(f"cannot write {mlx_path}: {reason}; nothing was written there")


def check_loads(staging: Path, mlx_path: Path) -> None:
    """`--force` must never swap a good conversion for one that cannot load: load this one first (lazily)."""
    try:
        loading.load(str(staging), lazy=True)
    except DLLMError as error:
        message = str(error).replace(str(staging), str(mlx_path))
        raise DLLMError(f"the conversion would not load, so {mlx_path} is left as it was: {message}") from error


def _replace(staging: Path, mlx_path: Path) -> None:
    """Put the finished folder at `mlx_path`; an old one is swapped out in one step, so it never goes missing."""
    if not os.path.lexists(mlx_path):
        os.rename(staging, mlx_path)
        return
    if exchange(staging, mlx_path):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old conversion
        return
    # No atomic exchange here: a kill between the renames leaves the old folder at `old`, where `restore_parked`
    # (the next conversion) and `load` (which names it) find it.
    old = sibling(mlx_path, "old")
    os.rename(mlx_path, old)
    try:
        os.rename(staging, mlx_path)
    except BaseException:
        os.rename(old, mlx_path)
        raise
    shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE = 2  # Linux renameat2 flag
RENAME_SWAP = 2  # macOS renamex_np flag
AT_FDCWD = -100
UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2, macOS renamex_np); False where the system or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    elif hasattr(libc, "renamex_np"):
        result = libc.renamex_np(os.fsencode(first), os.fsencode(second), RENAME_SWAP)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))
