"""SIGTERM unwinds like Ctrl-C: `Terminated` is raised where the process is, so `finally` blocks run (a staged
folder is removed) and the CLI prints the line Ctrl-C prints. Imports nothing heavy: the CLI installs it first."""

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(SystemExit):
    """SIGTERM arrived; its code is 128 + SIGTERM, as a shell reports a process that SIGTERM stopped."""


@contextmanager
def terminate_unwinds() -> Iterator[None]:
    """SIGTERM raises `Terminated` like Ctrl-C raises KeyboardInterrupt, then the previous handler is back."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _raise_terminated(signum, frame) -> None:
    raise Terminated(128 + signum)
