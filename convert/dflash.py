"""DFlash drafter recipe: HF safetensors -> sanitized, shape-checked `mlx_dllm.models.dflash.Model`."""

from pathlib import Path
from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_dllm.checkpoint_files import check_dtypes, read_weights
from mlx_dllm.errors import DLLMError
from mlx_dllm.loading import construct
from mlx_dllm.models.dflash import Model, ModelArgs

from .common import Options, write_model


def check_weights(weights: Dict[str, mx.array], expected: Dict[str, mx.array]) -> None:
    """Every expected tensor present with its shape, nothing else; the error names the first culprit."""
    for name, value in tqdm(weights.items(), desc="Checking weights", unit="tensor"):
        if name not in expected:
            raise DLLMError(f"unexpected tensor {name} {tuple(value.shape)} in the checkpoint")
        if value.shape != expected[name].shape:
            raise DLLMError(
                f"tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    missing = [name for name in expected if name not in weights]
    if missing:
        raise DLLMError(f"the checkpoint lacks {missing[0]} {tuple(expected[missing[0]].shape)}")


def load_draft(path: Path, config: Dict, model_class=Model, args_class=ModelArgs) -> Model:
    """The drafter of `model_class` (v1's, or DFlash2's, a subclass) with the checkpoint's weights, checked."""
    if "quantization" in config:
        raise DLLMError(f"{path} is already a quantized MLX drafter; convert the original checkpoint")
    model = construct(model_class, args_class, config, "DFlash config")
    weights = model_class.sanitize(read_weights(path))
    parameters = dict(tree_flatten(model.parameters()))
    check_weights(weights, parameters)
    check_dtypes(weights.items(), parameters, str(path))
    model.load_weights(list(weights.items()))
    return model


def convert_checkpoint(source: Path, mlx_path: Path, config: Dict, options: Options) -> None:
    write_model(load_draft(source, config), config, source, mlx_path, options)
