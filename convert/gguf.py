"""GGUF file (llama.cpp) -> MLX folder: tensors and metadata through the `gguf` package's memory-mapped reader.

Q4_0, Q4_1 and Q8_0 tensors stay quantized: their blocks are exactly MLX affine (group 32, 4 or 8 bits, the
file's own float16 scales), the layout `mx.load` also gives them, so keeping them loses nothing and keeps the size.
Every other type (the K-quants, Q5_0, ...) has no exact MLX layout (and `mx.load` cannot open a file holding one),
so it is dequantized with `gguf`'s reference dequantizer (the values llama.cpp and transformers compute) and
stored at `--dtype` (float16 by default), or re-quantized with `-q`. Tensors are read one at a time.
"""

import stat
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import _get_classes, save_model

from mlx_dllm.checkpoint_files import evaluate_finite, weight_files
from mlx_dllm.configs import check_sizes
from mlx_dllm.errors import DLLMError, first_line
from mlx_dllm.staging import check_destination, staged_folder

from .common import Options, cast_parameters, check_chat_template, check_finite_files, quantize_weights, write_config

ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0
KEPT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # -> bits
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # float16 scale (and Q4_1's float16 min), then 32 values
DEFAULT_DTYPE = "float16"
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# The two architectures name the same GGUF norms differently (gemma3 has four per layer).
FFN_NORM = {"llama": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}
GEMMA_POST_ATTENTION_NORM = {"post_attention_norm": "post_attention_layernorm"}
PARTS = ("weight", "scales", "biases")


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def check_source_file(file: Path) -> Path:
    """A regular file (a link is followed to what it names, a FIFO or device is refused)."""
    if not file.exists():
        raise DLLMError(f"{file} does not exist")
    if not stat.S_ISREG(file.stat().st_mode):
        raise DLLMError(f"{file} is not a regular file; it is not read")
    return file.resolve()


def check_apart_from_file(mlx_path: Path, file: Path) -> None:
    if file.is_relative_to(mlx_path.resolve()):
        raise DLLMError(f"{mlx_path} holds the GGUF file {file}; give a folder that does not contain it")


def open_gguf(file: Path):
    """The file's header and a memory map of its tensors (nothing is read into memory yet)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(file))
    except Exception as error:
        raise DLLMError(f"cannot read {file.name} as GGUF: {str(error).splitlines()[0]}") from error


def read_metadata(reader) -> Dict:
    """The key/value metadata as Python values (long token lists included)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def affine_from_blocks(blocks: np.ndarray, kind: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q8_0 tensor's blocks (rows, groups, bytes) as MLX affine (weight, scales, biases), exactly:
    w = d * q + m in the file is scale * q + bias in MLX, with q made unsigned (-8 and -128 fold into the bias)."""
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        values = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = scales * np.float16(-128)
    else:
        packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # low nibbles hold the first 16
        biases = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else scales * np.float16(-8)
    bits = KEPT_TYPES[kind]
    per_word = 32 // bits
    values = values.reshape(values.shape[0], -1, per_word).astype(np.uint32)
    weight = np.zeros(values.shape[:2], dtype=np.uint32)
    for index in range(per_word):
        weight |= values[..., index] << np.uint32(bits * index)
    return weight, scales, biases


def read_tensor(tensor, dequantize_all: bool = False) -> Dict[str, mx.array]:
    """One tensor under its GGUF name: kept types as MLX affine parts (unless `dequantize_all`), any other as
    float32 (gguf's reference dequantizer, the values llama.cpp and transformers compute)."""
    from gguf.quants import dequantize

    kind, stem = tensor.tensor_type.name, tensor.name.rpartition(".")[0]
    shape = tuple(reversed(tensor.shape.tolist()))
    if kind in KEPT_TYPES and not dequantize_all:
        rows = shape[0]
        weight, scales, biases = affine_from_blocks(tensor.data.reshape(rows, -1, BLOCK_BYTES[kind]), kind)
        parts = {"weight": weight, "scales": scales, "biases": biases}
        return {f"{stem}.{part}": mx.array(value) for part, value in parts.items()}
    try:
        value = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    except (NotImplementedError, ValueError) as error:  # integer types (I8...I64), F64, malformed blocks
        message = f"GGUF tensor {tensor.name} of type {kind} is not a weight we can read: {first_line(error)}"
        raise DLLMError(message) from error
    return {tensor.name: mx.array(value.reshape(shape))}


def architecture_of(metadata: Dict) -> str:
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise DLLMError(f"GGUF architecture {architecture!r} is not supported (supported: {known})")
    return architecture


def read_field(metadata: Dict, key: str, default=None, required: bool = True):
    if key in metadata:
        return metadata[key]
    if default is None and required:
        raise DLLMError(f"the GGUF file has no {key}")
    return default


def gguf_config(metadata: Dict, tensors) -> Dict:
    """config.json for mlx-lm's model class, from llama.cpp's metadata keys (as transformers maps them)."""
    architecture = architecture_of(metadata)
    model_type, class_name = ARCHITECTURES[architecture]

    def field(key, default=None, required=True):
        return read_field(metadata, f"{architecture}.{key}", default, required)

    heads = field("attention.head_count")
    hidden = field("embedding_length")
    config = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": field("block_count"),
        "intermediate_size": field("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv", heads),
        "head_dim": field("attention.key_length", hidden // heads if heads else None),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": field("context_length"),
        "vocab_size": field("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])) or None),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if architecture == "llama":
        check_plain_rope(metadata, tensors)
        config["rope_theta"] = field("rope.freq_base", 10000.0)
    else:
        config.update(gemma3_fields(field, config))
    config = {key: value for key, value in config.items() if value is not None}
    check_sizes(config)
    return config


def check_plain_rope(metadata: Dict, tensors) -> None:
    """Scaled RoPE (linear, YaRN, Llama 3's rope_freqs) is not mapped yet: refuse rather than run it wrong."""
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise DLLMError(f"GGUF llama files with scaled RoPE ({scaling}) are not supported yet")


def gemma3_fields(field, config: Dict) -> Dict:
    """Gemma 3's extras; where the file is silent, llama.cpp's fixed values (local RoPE base 1e4, 5:1 pattern)."""
    head_dim = config["head_dim"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(hidden / heads).
    scalar = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 else head_dim
    return {
        "rope_theta": field("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": field("rope.freq_base_swa", 10_000.0),
        "sliding_window": field("attention.sliding_window", 512),
        "sliding_window_pattern": sliding_period(field("attention.sliding_window_pattern", 6), config),
        "query_pre_attn_scalar": scalar,
    }


def sliding_period(pattern, config: Dict) -> int:
    """mlx-lm's gemma3 takes a period (every n-th layer global); newer files may list each layer (True: sliding)."""
    if isinstance(pattern, int):
        return pattern
    period = pattern.index(False) + 1 if False in pattern else 0
    layers = config["num_hidden_layers"]
    if period == 0 or list(pattern) != [(index + 1) % period != 0 for index in range(layers)]:
        raise DLLMError("this GGUF's sliding-window layer pattern is not periodic; mlx-lm's gemma3 cannot run it")
    return period


def mlx_name(gguf_name: str, architecture: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown tensor is refused by name."""
    stem, _, part = gguf_name.rpartition(".")
    if part in PARTS:
        if stem in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[stem]}.{part}"
        pieces = stem.split(".")
        if len(pieces) == 3 and pieces[0] == "blk" and pieces[1].isdigit():
            names = {**LAYER_NAMES, "ffn_norm": FFN_NORM[architecture]}
            if architecture == "gemma3":
                names.update(GEMMA_POST_ATTENTION_NORM)
            if pieces[2] in names:
                return f"model.layers.{pieces[1]}.{names[pieces[2]]}.{part}"
    raise DLLMError(f"GGUF tensor {gguf_name} has no {architecture} counterpart in mlx-lm")


def unpermute_rows(value: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (pairs -> halves per head): the HF rotate-half layout mlx-lm uses."""
    rows = value.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise DLLMError(f"a Q/K projection has {rows} rows, which {heads} heads cannot split into rotary pairs")
    half = rows // heads // 2
    return value.reshape(heads, half, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)


def mlx_weights(reader, config: Dict, architecture: str, dequantize: bool) -> Dict[str, mx.array]:
    weights = {}
    for tensor in reader.tensors:
        for name, value in read_tensor(tensor, dequantize).items():
            if architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
                value = unpermute_rows(value, heads)
            if architecture == "gemma3" and name.endswith("norm.weight"):
                value = value - 1  # the file stores Gemma's (1 + w); mlx-lm adds the 1
            weights[mlx_name(name, architecture)] = value
    return weights


def quantized_modules(weights: Dict[str, mx.array]) -> Dict[str, Dict]:
    """Each kept-quantized module's group size and bits (bits from the packed width: 32-bit words per group)."""
    modules = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            path = name[: -len(".scales")]
            in_features = scales.shape[-1] * GROUP_SIZE
            bits = weights[f"{path}.weight"].shape[-1] * 32 // in_features
            modules[path] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return modules


def quantization_config(modules: Dict[str, Dict]) -> Optional[Dict]:
    """mlx-lm's `quantization`: the commonest bits at the top, the modules that differ (e.g. an 8-bit embedding)
    named with their own."""
    if not modules:
        return None
    bits = Counter(params["bits"] for params in modules.values()).most_common(1)[0][0]
    overrides = {path: params for path, params in modules.items() if params["bits"] != bits}
    return {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine", **overrides}


def build_model(weights: Dict[str, mx.array], config: Dict) -> Tuple[nn.Module, Dict[str, Dict]]:
    """mlx-lm's model with the tensors loaded, and the modules that stay quantized."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(weights)
    modules = quantized_modules(weights)
    if modules:
        nn.quantize(model, class_predicate=lambda path, module: modules.get(path, False))
    try:
        model.load_weights(list(weights.items()))
    except ValueError as error:
        raise DLLMError(f"the GGUF tensors do not fit the {config['model_type']} model: {error}") from error
    return model, modules


SPECIAL_TOKEN_IDS = {  # tokenizer setting -> GGUF key
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def save_tokenizer(metadata: Dict, file: Path, folder: Path) -> None:
    """The file's tokenizer (vocabulary, merges, special tokens, chat template) as tokenizer.json +
    tokenizer_config.json in `folder`, which already holds the config.json that picks the tokenizer class.

    transformers converts the vocabulary, fed with the metadata `gguf` read: its own GGUF reader imports torch,
    which a user's install does not have."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    groups = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, settings = groups["tokenizer"], groups["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":
        settings.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary by default
    try:
        for name, key in SPECIAL_TOKEN_IDS.items():
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            settings[name] = None if token_id is None else vocabulary["tokens"][token_id]
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), tokenizer_object=backend, trust_remote_code=False, **settings, **extra
        )
    except Exception as error:
        raise DLLMError(f"cannot rebuild the tokenizer of {file.name}: {first_line(error)}") from error
    check_chat_template(tokenizer, f"{file} (tokenizer.chat_template)")
    tokenizer.save_pretrained(str(folder))


def convert_gguf(gguf_path: Path, mlx_path: Path, options: Options, dequantize: bool = False) -> None:
    """`dequantize` (mlx-lm's -d) stores the kept Q4_0/Q4_1/Q8_0 tensors as floats too, e.g. a float32 baseline."""
    file = check_source_file(Path(gguf_path))
    check_apart_from_file(mlx_path, file)
    check_destination(mlx_path, options.force)
    reader = open_gguf(file)
    metadata = read_metadata(reader)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = gguf_config(metadata, tensor_names)
    architecture = architecture_of(metadata)
    options.info(f"Loading {file} ({architecture}, {len(tensor_names)} tensors)")
    model, modules = build_model(mlx_weights(reader, config, architecture, dequantize), config)
    if modules:
        config["quantization"] = quantization_config(modules)
    evaluate_finite(model, file)  # before casting or quantizing turns a NaN into a number
    dtype = options.dtype or DEFAULT_DTYPE
    cast_parameters(model, dtype, config)
    config["torch_dtype"] = dtype
    if options.quantize:
        options.info("Quantizing")
        model, config = quantize_weights(model, config, options.q_group_size, options.q_bits)
    with staged_folder(mlx_path, options.force) as staging:
        save_model(staging, model, donate_model=True)
        check_finite_files(weight_files(staging), options.dtype)
        write_config(config, staging / "config.json", keep_vision_config=False)
        save_tokenizer(metadata, file, staging)


__all__ = ["convert_gguf", "is_gguf"]
