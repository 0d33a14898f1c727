"""Text for stdout, which is the user's file or pipe and can fail like any file.

A failed write (a full disk, an I/O error) is one DLLMError line, told apart from every other OSError by wrapping
the writes and nothing else. A closed pipe stays BrokenPipeError: click ends the command quietly, as `| head` expects.
"""

from contextlib import contextmanager
from typing import Iterator

import click

from .errors import DLLMError


@contextmanager
def writing_output() -> Iterator[None]:
    """Around writes to stdout only."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise DLLMError(f"cannot write the output: {error.strerror or error}") from error


def echo(text: str = "", nl: bool = True) -> None:
    """click.echo to stdout (it flushes, so a full disk fails here, not at exit)."""
    with writing_output():
        click.echo(text, nl=nl)
