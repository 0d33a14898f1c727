"""Hugging Face checkpoint -> MLX folder that `mlx_dllm.load` reads (one recipe per architecture).

A recipe is a module of this package with `convert_checkpoint(source, mlx_path, config, options)`. A family's
recipe has its model file's name (`dflash.py` for `models/dflash.py`); families without one go through
`own_model.py`, mlx-lm targets through `target.py`, and GGUF files through `gguf.py`.
"""

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Dict, Optional, Union

from mlx_dllm.errors import DLLMError


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path] = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
    quant_recipe: Optional[str] = None,
    dequantize: bool = False,
    quiet: bool = False,
) -> Path:
    """Convert `hf_path` (folder, hub repo or `.gguf` file) into `mlx_path`; nothing is left behind if it fails.

    `quant_recipe="mixed"` (DiffusionGemma only) implies `quantize`: 8-bit embeddings, attention, dense MLP and
    router, `q_bits` (default 4) for the experts and self-conditioning. `dequantize` (GGUF files only) stores the
    tensors a GGUF keeps quantized (Q4_0, Q4_1, Q8_0) as floats too. `quiet` prints no `[INFO]` lines.
    """
    # Imported on first use, not with the package: `import mlx_dllm` stays instant (CLI --help, Ctrl-C).
    from dataclasses import replace

    from mlx_dllm import loading
    from mlx_dllm.staging import check_apart_from_source, check_destination

    from .common import Options, check_quantization, resolve_dtype
    from .diffusion_gemma import QUANT_RECIPES
    from .gguf import convert_gguf, is_gguf

    loading.check_path_type(hf_path, "hf_path")
    loading.check_path_type(mlx_path, "mlx_path", "a folder path")
    check_quantization(q_group_size, q_bits)
    given, mlx_path = Path(mlx_path), Path(os.path.abspath(mlx_path))  # `a/..` and `.` get a real name and parent
    options = Options(dtype, quantize, q_group_size, q_bits, quant_recipe, force, quiet)
    if is_gguf(hf_path):
        if quant_recipe is not None or revision is not None:
            raise DLLMError("--quant-recipe and --revision do not apply to a GGUF file")
        convert_gguf(Path(hf_path), mlx_path, options, dequantize)
        options.info(f"Saved to {given}")
        return given
    if dequantize:
        raise DLLMError("--dequantize applies to GGUF files (other checkpoints are converted from their floats)")
    if Path(hf_path).is_dir():  # name an overlap with a local source before any other objection
        check_apart_from_source(mlx_path, Path(hf_path))
    check_destination(mlx_path, force)
    if quant_recipe is not None and quant_recipe not in QUANT_RECIPES:
        raise DLLMError(f"unknown quantization recipe {quant_recipe!r} (known: {', '.join(QUANT_RECIPES)})")
    source = loading.resolve(str(hf_path), revision)
    check_apart_from_source(mlx_path, source)
    config = loading.read_config(source)
    loading.check_architecture(config)
    options = replace(options, dtype=resolve_dtype(dtype, config))

    options.info(f"Loading {source}")
    recipe = recipe_for(config)
    if quant_recipe is not None and quant_recipe not in getattr(recipe, "QUANT_RECIPES", ()):
        raise DLLMError(f"the {quant_recipe} quantization recipe is for DiffusionGemma checkpoints only")
    recipe.convert_checkpoint(source, mlx_path, config, options)
    options.info(f"Saved to {given}")
    return given


def recipe_for(config: Dict):
    """The recipe module for this config.json: its family's own, else the generic one for our families or mlx-lm's."""
    from mlx_dllm.models.family import model_file

    module = model_file(config)
    if module is None:
        return importlib.import_module(".target", __name__)
    name = module.__name__.rpartition(".")[2]
    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        name = "own_model"
    return importlib.import_module(f".{name}", __name__)


__all__ = ["convert"]
