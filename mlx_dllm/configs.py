"""Checkpoint JSON files read defensively, and config sizes checked before any model is built."""

import json
import os
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
    "num_target_layers": 1024,
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
# Grouped-query attention shares each K/V head among a whole number of query heads (MLX's attention requires it).
HEAD_GROUPS = (("num_attention_heads", "num_key_value_heads"), ("num_attention_heads", "num_global_key_value_heads"))
# A top-k over experts picks at most all of them (more crashes the router's argpartition mid-generation).
EXPERT_CHOICES = (("top_k_experts", "num_experts"), ("num_experts_per_tok", "num_experts"),
                  ("num_experts_per_tok", "num_local_experts"))
NESTED_CONFIGS = ("text_config", "dflash_config")
# Fields model classes read as dictionaries (`.get`, `.items()`): a string there is an AttributeError deep inside.
OBJECT_FIELDS = ("rope_scaling", "rope_parameters", "per_layer_config", "quantization", "quantization_config")
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


def write_json(file: Path, content: Dict) -> None:
    """Atomic: a kill leaves the old file or none, never half of one."""
    partial = file.with_name(f".{file.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, file)


def check_sizes(config: Dict, where: str = "config.json") -> None:
    """Every size field present is a positive integer under its ceiling (heads and experts consistent), every id
    field a non-negative integer or a list of them, every name a string and every field read as a dictionary an
    object (also in the nested text and DFlash configs)."""
    for name, limit in SIZE_LIMITS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise DLLMError(f"{where}: {name} must be an integer, got {value!r}")
        if not 1 <= value <= limit:
            raise DLLMError(f"{where}: {name} must be between 1 and {limit}, got {value}")
    for heads, kv_heads in HEAD_GROUPS:
        if config.get(heads) is not None and config.get(kv_heads) is not None and config[heads] % config[kv_heads]:
            raise DLLMError(f"{where}: {heads} ({config[heads]}) is not a multiple of {kv_heads} ({config[kv_heads]})")
    for top_k, experts in EXPERT_CHOICES:
        if config.get(top_k) is not None and config.get(experts) is not None and config[top_k] > config[experts]:
            raise DLLMError(f"{where}: {top_k} ({config[top_k]}) exceeds {experts} ({config[experts]})")
    for name in ID_FIELDS:
        check_ids(config.get(name), name, where)
    check_names(config, where)
    for name in OBJECT_FIELDS:
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise DLLMError(f"{where}: {name} must be an object, got {config[name]!r}")
    for nested in NESTED_CONFIGS:
        if nested in config:  # even null: mlx-lm's loader reads a text_config that is there
            if not isinstance(config[nested], dict):
                raise DLLMError(f"{where}: {nested} must be an object, got {config[nested]!r}")
            check_sizes(config[nested], f"{where} {nested}")


def check_names(config: Dict, where: str) -> None:
    """model_type and architectures pick the model class (dictionary keys, joined names): strings, nothing else."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type is not None and not isinstance(model_type, str):
        raise DLLMError(f"{where}: model_type must be a name, got {model_type!r}")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
    ):
        raise DLLMError(f"{where}: architectures must be a list of names, got {architectures!r}")


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


def target_fields(config: Dict, accepted: Iterable[str]) -> Dict:
    """The fields an mlx-lm target family requires that a transformers config omits or stores elsewhere, as an
    override of `config` (a nested `text_config` comes back whole). `accepted` names the family's ModelArgs fields:
    legacy RoPE copies go only to families that read them (Gemma 4 reads `rope_parameters`, and transformers
    cannot read back the flat `proportional` `rope_scaling` a copy would write)."""
    accepted = set(accepted)
    fields = {key: value for key, value in rope_fields(config).items() if key in accepted}
    text = config.get("text_config")
    if not isinstance(text, dict):
        return {**fields, **_text_fields({**config, **fields})}
    filled = _text_fields(text)
    if filled:
        fields["text_config"] = {**text, **filled}
    if "vocab_size" in accepted and "vocab_size" not in config and "vocab_size" in text:
        fields["vocab_size"] = text["vocab_size"]  # mlx-lm's gemma4 imposes its own default on the text config
    return fields


def _text_fields(config: Dict) -> Dict:
    fill = FAMILY_FIELDS.get(config.get("model_type"))
    return fill(config) if fill else {}


def _gated_delta_fields(config: Dict) -> Dict:
    """Qwen3.5 and Qwen3-Next: transformers saves `layer_types` but not the `full_attention_interval` it came from,
    which is all mlx-lm reads (default 4); a pattern that is not every n-th layer cannot be built there."""
    layer_types = config.get("layer_types")
    if not isinstance(layer_types, list) or "full_attention_interval" in config:
        return {}
    interval = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else len(layer_types) + 1
    periodic = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(len(layer_types))]
    if layer_types != periodic:
        family = config.get("model_type")
        raise DLLMError(f"config.json: mlx-lm's {family} needs attention every n-th layer, not {layer_types}")
    return {"full_attention_interval": interval}


def _qwen3_next_fields(config: Dict) -> Dict:
    # Transformers 5 keeps both under `rope_parameters` (defaults 10000 and 0.25); mlx-lm requires them top level.
    parameters = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    fields = _gated_delta_fields(config)
    if config.get("rope_theta") is None:
        fields["rope_theta"] = parameters.get("rope_theta", 10000.0)
    if config.get("partial_rotary_factor") is None:
        fields["partial_rotary_factor"] = parameters.get("partial_rotary_factor", 0.25)
    return fields


def _lfm2_fields(config: Dict) -> Dict:
    # transformers' LFM2 feed-forward works at hidden_size, which mlx-lm requires as `block_dim`.
    return {} if "block_dim" in config else {"block_dim": config.get("hidden_size")}


def _gemma4_fields(config: Dict) -> Dict:
    """transformers 5 folds `global_head_dim` (and, with K = V, `num_global_key_value_heads`) into `per_layer_config`
    overrides of the global layers; mlx-lm reads the two fields (default 512 and None)."""
    per_layer = config.get("per_layer_config")
    layer_types = config.get("layer_types")
    if not isinstance(per_layer, dict) or not isinstance(layer_types, list) or "global_head_dim" in config:
        return {}
    overrides = [per_layer.get(str(i), per_layer.get(i)) or {} for i in range(len(layer_types))]
    global_layers = [override for override, kind in zip(overrides, layer_types) if kind == "full_attention"] or [{}]
    override = global_layers[0]
    readable = {"head_dim", "num_key_value_heads"} if config.get("attention_k_eq_v") else {"head_dim"}
    if sum(map(bool, overrides)) != sum(map(bool, global_layers)) or any(o != override for o in global_layers):
        raise DLLMError("config.json: mlx-lm's gemma4 needs one override for every global layer and none for others")
    if not set(override) <= readable:
        raise DLLMError(f"config.json: mlx-lm's gemma4 cannot override {sorted(set(override) - readable)} per layer")
    fields = {"global_head_dim": override.get("head_dim", config.get("head_dim"))}
    if "num_key_value_heads" in override:
        fields["num_global_key_value_heads"] = override["num_key_value_heads"]
    return fields


# model_type (of the config or its text_config) -> the fields mlx-lm requires for it.
FAMILY_FIELDS = {
    "qwen3_5": _gated_delta_fields,
    "qwen3_5_text": _gated_delta_fields,
    "qwen3_5_moe": _gated_delta_fields,
    "qwen3_5_moe_text": _gated_delta_fields,
    "qwen3_next": _qwen3_next_fields,
    "lfm2": _lfm2_fields,
    "gemma4_text": _gemma4_fields,
}
