"""How the emulator runs kernels: sanitizer, thread and group order, cache folder."""

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Optional

SANITIZERS = (None, "address", "thread")


@dataclasses.dataclass
class Settings:
    sanitizer: Optional[str] = None  # "address": ASan build; "thread": TSan build
    reverse_threads: bool = False  # hand the baton from the last thread of a group to the first
    reverse_groups: bool = False  # run the last threadgroup first
    timeout: float = 600.0  # seconds per kernel call
    cache_dir: Optional[Path] = None  # compiled kernels; None: a folder under the system temp dir

    def cache(self) -> Path:
        folder = self.cache_dir or Path(tempfile.gettempdir()) / f"mlx-dllm-metal-emulator-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


_current = Settings()


def current() -> Settings:
    return _current


@contextlib.contextmanager
def options(**changes):
    """with options(sanitizer="thread"): ... runs the calls inside that way."""
    global _current
    if changes.get("sanitizer") not in SANITIZERS:
        raise ValueError(f"sanitizer must be one of {SANITIZERS}, not {changes.get('sanitizer')!r}")
    saved = _current
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved


def set_cache_dir(folder) -> None:
    _current.cache_dir = Path(folder)
