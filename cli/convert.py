"""`mlx-dllm convert`: flags follow `mlx_lm.convert`."""

import click

from mlx_dllm.convert import convert as convert_checkpoint
from mlx_dllm.convert.common import DTYPES
from mlx_dllm.convert.diffusion_gemma import QUANT_RECIPES


@click.command("convert")
@click.option("--hf-path", "--model", "hf_path", required=True, help="Hugging Face folder, hub repo id or .gguf file.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Where to write the MLX model.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights.")
@click.option("--q-group-size", type=click.IntRange(min=1), default=None, help="Quantization group size (default 64).")
@click.option("--q-bits", type=click.IntRange(min=1), default=None, help="Bits per weight (default 4).")
@click.option(
    "--quant-recipe",
    type=click.Choice(QUANT_RECIPES),
    default=None,
    help="DiffusionGemma mixed-bit recipe (implies -q): 8-bit embeddings, attention, dense MLP and router; "
    "--q-bits for experts and self-conditioning.",
)
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weight dtype (default: the checkpoint's).")
@click.option("--force", is_flag=True, help="Replace a non-empty --mlx-path.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("-d", "--dequantize", is_flag=True, help="GGUF: store its Q4_0/Q4_1/Q8_0 tensors as floats too.")
def convert_command(
    hf_path, mlx_path, quantize, q_group_size, q_bits, quant_recipe, dtype, force, revision, dequantize
):
    """Convert a Hugging Face checkpoint (DFlash drafter, DiffusionGemma or mlx-lm target) to MLX."""
    convert_checkpoint(
        hf_path,
        mlx_path,
        quantize=quantize,
        q_group_size=q_group_size,
        q_bits=q_bits,
        dtype=dtype,
        force=force,
        revision=revision,
        quant_recipe=quant_recipe,
        dequantize=dequantize,
    )
