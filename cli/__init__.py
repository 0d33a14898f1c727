"""The `mlx-dllm` command line: `generate` and `convert`."""

import sys

import click
from click.exceptions import NoArgsIsHelpError

from mlx_dllm import __version__
from mlx_dllm.errors import DLLMError

from .convert import convert_command
from .generate import generate_command


class Group(click.Group):
    """A click group whose user errors (ours and click's usage errors) print as one `Error: ...` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except (DLLMError, click.ClickException) as error:
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            click.echo(f"Error: {message}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        # Non-standalone click returns a command's value or an Exit's code (--help, --version).
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-dllm")
def main():
    """Diffusion language models on Apple silicon with MLX."""


main.add_command(generate_command)
main.add_command(convert_command)

__all__ = ["main"]
