"""`mlx-dllm benchmark`: every mode of a model against mlx-lm's plain generation, on the same weights."""

from pathlib import Path

import click

from mlx_dllm import blas
from mlx_dllm.benchmark.prompts import BUILT_IN
from mlx_dllm.benchmark.roofline import CHIPS


def split_modes(ctx, param, value):
    if value is None:
        return None
    modes = [m.strip() for m in value.split(",") if m.strip()]
    if not modes:
        raise click.BadParameter("give a comma-separated list of modes, e.g. ar,dflash")
    return modes


@click.command("benchmark")
@click.option("--model", help="Model folder or hub id; 'default': SmolLM2-135M-Instruct, as generate runs it.")
@click.option(
    "--draft-model",
    help="DFlash drafter folder or hub id (adds the dflash mode; default model: its shipped drafter; 'none': none).",
)
@click.option(
    "--tiny",
    metavar="FAMILY",
    help="Build a tiny random checkpoint of this model family instead (e.g. dflash; a wrong name lists them all).",
)
@click.option(
    "--modes",
    callback=split_modes,
    help="Comma-separated modes, each with options if wanted: dflash:speculation=tree:tree_budget=16 (default: every "
    "mode the model runs).",
)
@click.option(
    "--prompts", default="gsm8k", show_default=True, help=f"Built-in set ({', '.join(BUILT_IN)}) or a jsonl/text file."
)
@click.option("--num-prompts", type=click.IntRange(1), default=5, show_default=True)
@click.option("--max-tokens", "-m", type=click.IntRange(1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Interleaved repeats.")
@click.option(
    "--block-size", type=click.IntRange(2), help="DFlash: tokens per draft block, 2 up to the drafter's (default)."
)
@click.option(
    "--sweep",
    is_flag=True,
    help="DFlash: chains at every block from 2 to the drafter's, trees of 4, 8, 16 and 32 nodes, and auto.",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write tokens/s and acceptance to a PNG.")
@click.option("--project", type=click.Choice([*CHIPS, "all"]), help="Print a roofline projection for an Apple chip.")
@click.option("--forward-cost", is_flag=True, help="Print the cost of 1..64-token forwards over a 256-token cache.")
@click.option(
    "--kernels", is_flag=True, help="Time the Metal attention kernel against MLX's with the equivalent mask (a Mac)."
)
@click.option(
    "--blas",
    "blas_choice",
    type=click.Choice(blas.CHOICES),
    default="auto",
    show_default=True,
    help="Linux CPU: preload OpenBLAS when installed (auto), require it, or keep the reference BLAS.",
)
def benchmark_command(blas_choice, **flags):
    """Tokens/s, tokens per forward, acceptance and peak memory of each mode; a table and one JSON line."""
    from mlx_dllm.benchmark.session import Options, check_options, run

    from .generate import choose_drafter

    if flags["model"] is not None:  # the default model brings its shipped drafter, as in generate and serve
        flags["draft_model"] = choose_drafter(flags["model"], flags["draft_model"], False, None)
    options = Options(**flags)
    check_options(options)  # flag errors before the re-exec and the model load
    blas.ensure_blas(blas_choice)
    run(options)
