"""Autoregressive target recipe: mlx-lm's own model classes, with our family remapping (ministral -> llama)."""

from pathlib import Path
from typing import Dict, Tuple

import mlx.nn as nn

from mlx_dllm import loading


def load_target(path: Path, config: Dict) -> Tuple[nn.Module, Dict]:
    """The model (weights lazy) and mlx-lm's view of the config (it may add `quantization` for packed checkpoints)."""
    loading.check_target_architecture(config)
    loading.load_tokenizer_checked(path, config)  # `load` needs a target's tokenizer: refuse now, not after writing
    return loading.build_model(path, config, lazy=True)
