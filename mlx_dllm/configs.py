"""Checkpoint JSON files read defensively, and config sizes checked before any model is built."""

import json
import re
import stat
from pathlib import Path
from typing import Dict, Iterable, Optional

from .errors import DLLMError

MAX_JSON_BYTES = 32 << 20  # a config of this size is not a config
# Size fields and their ceilings: far above any released model, low enough that building one cannot hang.
SIZE_LIMITS = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "num_global_key_value_heads": 1024,
    "head_dim": 4096,
    "global_head_dim": 4096,
    "vocab_size": 1 << 24,
    "num_experts": 1 << 14,
    "num_local_experts": 1 << 14,
    "num_experts_per_tok": 1 << 14,
    "top_k_experts": 1 << 14,
    "sliding_window": 1 << 26,
    "max_position_embeddings": 1 << 26,
    "block_size": 1 << 12,
}
ID_FIELDS = ("eos_token_id", "mask_token_id", "target_layer_ids")
NESTED_CONFIGS = ("text_config", "dflash_config")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def read_json(file: Path) -> Dict:
    """A JSON object from a regular file; anything else (a FIFO, bad bytes, deep nesting, a list) is one error."""
    try:
        mode = file.stat().st_mode
    except OSError as error:
        raise DLLMError(f"cannot read {file}: {error.strerror}") from error
    if not stat.S_ISREG(mode):
        raise DLLMError(f"{file} is not a regular file")
    if file.stat().st_size > MAX_JSON_BYTES:
        raise DLLMError(f"{file} is larger than {MAX_JSON_BYTES >> 20} MB")
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DLLMError(f"{file} is not UTF-8 text (byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise DLLMError(f"{file} is not valid JSON: {error.msg} (line {error.lineno})") from error
    except RecursionError as error:
        raise DLLMError(f"{file} is nested too deeply") from error
    except OSError as error:
        raise DLLMError(f"cannot read {file}: {error.strerror}") from error
    if not isinstance(value, dict):
        raise DLLMError(f"{file} must hold a JSON object, not {type(value).__name__}")
    return value


def check_sizes(config: Dict, where: str = "config.json") -> None:
    """Every size field present is a positive integer under its ceiling, every id field a non-negative integer
    or a list of them (also in the nested text and DFlash configs)."""
    for name, limit in SIZE_LIMITS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise DLLMError(f"{where}: {name} must be an integer, got {value!r}")
        if not 1 <= value <= limit:
            raise DLLMError(f"{where}: {name} must be between 1 and {limit}, got {value}")
    for name in ID_FIELDS:
        check_ids(config.get(name), name, where)
    for nested in NESTED_CONFIGS:
        section = config.get(nested)
        if section is not None:
            if not isinstance(section, dict):
                raise DLLMError(f"{where}: {nested} must be an object")
            check_sizes(section, f"{where} {nested}")


def check_layer_count(config: Dict, weight_names: Iterable[str]) -> None:
    """A config that claims more layers than the weights hold is refused before the layers are built."""
    layers = (config.get("text_config") or {}).get("num_hidden_layers") or config.get("num_hidden_layers")
    found = [int(match.group(1)) for name in weight_names for match in [LAYER_INDEX.search(name)] if match]
    if isinstance(layers, int) and found and layers > max(found) + 1:
        raise DLLMError(f"config.json says num_hidden_layers={layers}, but the weights hold {max(found) + 1} layers")


def check_ids(value, name: str, where: str) -> None:
    """An id field (eos_token_id, target_layer_ids...) is an int or a list of ints, never a string or a float."""
    ids = value if isinstance(value, list) else [value]
    if value is None:
        return
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise DLLMError(f"{where}: {name} must be a non-negative integer or a list of them, got {value!r}")


def rope_fields(config: Dict) -> Dict:
    """transformers 5 writes RoPE only under `rope_parameters`; mlx-lm's llama/qwen2/gemma3 (and others) read
    the legacy top-level `rope_theta`/`rope_scaling` (and silently default to theta 10000). Return those fields."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict) or not parameters:
        return {}
    if all(isinstance(value, dict) for value in parameters.values()):  # per layer type (gemma3)
        fields = _flat_rope_fields(config, parameters.get("full_attention") or {})
        local = (parameters.get("sliding_attention") or {}).get("rope_theta")
        if local is not None and "rope_local_base_freq" not in config:
            fields["rope_local_base_freq"] = local
        return fields
    return _flat_rope_fields(config, parameters)


def _flat_rope_fields(config: Dict, parameters: Dict) -> Dict:
    fields = {}
    theta: Optional[float] = parameters.get("rope_theta")
    if theta is not None and config.get("rope_theta") is None:
        fields["rope_theta"] = theta
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default" and config.get("rope_scaling") is None:
        fields["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
    return fields
