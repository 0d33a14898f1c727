"""The `mlx-dllm` command line: `generate`, `convert`, `benchmark`, `train-drafter` and `serve`.

Commands are imported when they run (MLX takes seconds to import), so `--help` is instant and a Ctrl-C during
those imports ends like any other: one line and exit status 130. SIGTERM ends the same way, with status 143.
"""

import importlib
import sys

import click
from click.exceptions import NoArgsIsHelpError

from mlx_dllm import __version__
from mlx_dllm.errors import DLLMError
from mlx_dllm.signals import Terminated, terminate_unwinds

# module in this package -> its command
COMMANDS = {
    "generate": "generate_command",
    "convert": "convert_command",
    "benchmark": "benchmark_command",
    "train-drafter": "train_drafter_command",
    "serve": "serve_command",
}
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C stopped


class Group(click.Group):
    """A click group whose user errors (ours and click's usage errors) print as one `Error: ...` line."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(f"{__name__}.{name.replace('-', '_')}"), COMMANDS[name])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            with terminate_unwinds():
                code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except (DLLMError, click.ClickException) as error:
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            click.echo(f"Error: {message}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        except click.Abort as error:  # click turns Ctrl-C (and EOF at a prompt) into Abort
            click.echo("Aborted!", err=True)
            sys.exit(INTERRUPTED if isinstance(error.__cause__, KeyboardInterrupt) else 1)
        except Terminated as error:  # SIGTERM has unwound the command (a staged folder is gone) as Ctrl-C would
            click.echo("Aborted!", err=True)
            sys.exit(error.code)
        # Non-standalone click returns a command's value or an Exit's code (--help, --version).
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-dllm")
def main():
    """Diffusion language models on Apple silicon with MLX."""


# Commands whose speed on a Linux CPU is fp32 matmuls: the console script re-runs them with OpenBLAS preloaded
# when it is installed, as `benchmark` does with its --blas option (which it handles itself).
PRELOADS_OPENBLAS = ("generate", "serve", "train-drafter")


def entry():
    """The `mlx-dllm` console script. Only a real process re-execs (in-process callers of `main`, such as click's
    test runner, never do); MLX_DLLM_BLAS_PRELOADED=1 in the environment keeps the BLAS as it is."""
    args = sys.argv[1:]
    if args and args[0] in PRELOADS_OPENBLAS and not {"-h", "--help"} & set(args):
        from mlx_dllm import blas

        try:
            blas.ensure_blas("auto")
        except KeyboardInterrupt:  # during MLX's import, before the group's own handling
            click.echo("Aborted!", err=True)
            sys.exit(INTERRUPTED)
    main(prog_name="mlx-dllm")


__all__ = ["entry", "main"]
