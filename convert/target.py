"""Autoregressive target recipe: mlx-lm's own model classes, with our family remapping (ministral -> llama)."""

from pathlib import Path
from typing import Dict

from mlx_dllm import loading

from .common import Options, load_tokenizer, write_model


def convert_checkpoint(source: Path, mlx_path: Path, config: Dict, options: Options) -> None:
    loading.check_target_architecture(config)
    load_tokenizer(source, config)  # `load` needs a target's tokenizer: refuse now, not after writing
    model, config = loading.build_model(source, config, lazy=True)  # mlx-lm may add `quantization` (packed weights)
    write_model(model, config, source, mlx_path, options)
