"""The recipe of our families that have none of their own (Nemotron-Labs-Diffusion): our class reads the
checkpoint's own tensor names, and the folder is written as the loader reads it."""

from pathlib import Path
from typing import Dict

from mlx_dllm import loading

from .common import Options, load_tokenizer, write_model


def convert_checkpoint(source: Path, mlx_path: Path, config: Dict, options: Options) -> None:
    load_tokenizer(source, config)  # `load` needs it: refuse now, not after writing
    model, config = loading.build_model(source, config, lazy=True)
    config.pop("generation_config", None)  # the loader's copy of generation_config.json, which is copied as is
    write_model(model, config, source, mlx_path, options)
