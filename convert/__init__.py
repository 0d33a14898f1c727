"""Hugging Face checkpoint -> MLX folder that `mlx_dllm.load` reads (one recipe per architecture)."""

import os
from pathlib import Path
from typing import Optional, Union

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
) -> Path:
    """Convert `hf_path` (folder, hub repo or `.gguf` file) into `mlx_path`; nothing is left behind if it fails.

    `quant_recipe="mixed"` (DiffusionGemma only) implies `quantize`: 8-bit embeddings, attention, dense MLP and
    router, `q_bits` (default 4) for the experts and self-conditioning. `dequantize` (GGUF files only) stores the
    tensors a GGUF keeps quantized (Q4_0, Q4_1, Q8_0) as floats too.
    """
    # Imported on first use, not with the package: `import mlx_dllm` stays instant (CLI --help, Ctrl-C).
    from mlx_dllm import checkpoint_files, loading

    from .common import cast_parameters, check_finite_files, quantize_weights, resolve_dtype, save
    from mlx_dllm.staging import check_apart_from_source, check_destination, staged_folder
    from .dflash import load_draft
    from .diffusion_gemma import RECIPES, convert_diffusion_gemma, is_diffusion_gemma
    from .gguf import convert_gguf, is_gguf
    from .target import load_target

    loading.check_path_type(hf_path, "hf_path")
    loading.check_path_type(mlx_path, "mlx_path", "a folder path")
    given, mlx_path = Path(mlx_path), Path(os.path.abspath(mlx_path))  # `a/..` and `.` get a real name and parent
    if is_gguf(hf_path):
        if quant_recipe is not None or revision is not None:
            raise DLLMError("--quant-recipe and --revision do not apply to a GGUF file")
        convert_gguf(Path(hf_path), mlx_path, quantize, q_group_size, q_bits, dtype, force, dequantize)
        print(f"[INFO] Saved to {given}")
        return given
    if dequantize:
        raise DLLMError("--dequantize applies to GGUF files (other checkpoints are converted from their floats)")
    if Path(hf_path).is_dir():  # name an overlap with a local source before any other objection
        check_apart_from_source(mlx_path, Path(hf_path))
    check_destination(mlx_path, force)
    if quant_recipe is not None and quant_recipe not in RECIPES:
        raise DLLMError(f"unknown quantization recipe {quant_recipe!r} (known: {', '.join(RECIPES)})")
    source = loading.resolve(str(hf_path), revision)
    check_apart_from_source(mlx_path, source)
    config = loading.read_config(source)
    loading.check_architecture(config)
    dtype = resolve_dtype(dtype, config)

    print(f"[INFO] Loading {source}")
    if is_diffusion_gemma(config):
        convert_diffusion_gemma(source, mlx_path, config, dtype, quantize, q_group_size, q_bits, quant_recipe, force)
        print(f"[INFO] Saved to {given}")
        return given
    if quant_recipe is not None:
        raise DLLMError(f"the {quant_recipe} quantization recipe is for DiffusionGemma checkpoints only")
    if loading.is_dflash_config(config):
        model = load_draft(source, config)
    elif loading.own_module(config) is not None:  # Nemotron-Labs-Diffusion: our class, the checkpoint's names
        loading.load_tokenizer_checked(source, config)  # `load` needs it: refuse now, not after writing
        model, config = loading.build_model(source, config, lazy=True)
        config.pop("generation_config", None)  # the loader's copy of generation_config.json, which is copied as is
    else:
        model, config = load_target(source, config)
    cast_parameters(model, dtype, config)
    if quantize:
        check_finite_files(checkpoint_files.weight_files(source))  # quantizing turns a NaN into a number: look before
        print("[INFO] Quantizing")
        model, config = quantize_weights(model, config, q_group_size, q_bits)

    with staged_folder(mlx_path, force) as staging:
        save(staging, model, config, source, dtype)
    print(f"[INFO] Saved to {given}")
    return given


__all__ = ["convert"]
