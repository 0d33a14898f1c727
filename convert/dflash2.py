"""DFlash2 drafter recipe: v1's (sanitized, shape-checked, dtype-checked), building `mlx_dllm.models.dflash2.Model`.

z-lab's bare codebook tensors get their `.weight` in `Model.sanitize`, so the folder written holds MLX names.
"""

from pathlib import Path
from typing import Dict

from mlx_dllm.models.dflash2 import Model, ModelArgs

from .common import Options, write_model
from .dflash import load_draft


def convert_checkpoint(source: Path, mlx_path: Path, config: Dict, options: Options) -> None:
    write_model(load_draft(source, config, Model, ModelArgs), config, source, mlx_path, options)
