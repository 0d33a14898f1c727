"""What every conversion recipe shares: the options asked for, casting, quantizing, the NaN/Inf check, the chat
template check, and saving weights, config and tokenizer files (into the folder `mlx_dllm.staging.staged_folder`
provides)."""

import glob
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import quantize_model, save_config, save_model
from tqdm import tqdm

from mlx_dllm import loading
from mlx_dllm.chat_template import render
from mlx_dllm.checkpoint_files import (
    LORA_FOLDER,
    TOKENIZER_PATTERNS,
    fault_message,
    finite_screen,
    weight_fault,
    weight_files,
)
from mlx_dllm.configs import read_json, write_json
from mlx_dllm.errors import DLLMError
from mlx_dllm.output import echo
from mlx_dllm.staging import staged_folder

DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_GROUP_SIZE, DEFAULT_BITS = 64, 4  # MLX's affine defaults, as `mlx_lm.convert -q`


@dataclass(frozen=True)
class Options:
    """What a conversion was asked for, beside its source and its destination."""

    dtype: Optional[str] = None
    quantize: bool = False
    q_group_size: Optional[int] = None
    q_bits: Optional[int] = None
    quant_recipe: Optional[str] = None
    force: bool = False
    quiet: bool = False  # no [INFO] lines: a caller's stdout may be someone else's (the generated text)

    def info(self, line: str) -> None:
        if not self.quiet:
            echo(f"[INFO] {line}")


def check_quantization(group_size, bits) -> None:
    """`q_group_size` and `q_bits` (None: the default) as MLX's affine quantization takes them, asked of MLX itself
    on a one-group array, before any work."""
    for name, value in (("q_group_size", group_size), ("q_bits", bits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise DLLMError(f"{name} must be a whole number, got {value!r}")
        if value is not None and value < 1:  # MLX divides by the group size: a zero kills the process (SIGFPE)
            raise DLLMError(f"{name} must be at least 1, got {value}")
    group_size, bits = group_size or DEFAULT_GROUP_SIZE, bits or DEFAULT_BITS
    try:
        mx.quantize(mx.zeros((1, group_size)), group_size, bits)
    except (ValueError, OverflowError) as error:
        raise DLLMError(f"cannot quantize: {str(error).splitlines()[0]}") from error


def resolve_dtype(dtype: Optional[str], config: Dict) -> Optional[str]:
    """The asked dtype, else the checkpoint's own (when it is one we write), else None: keep as stored."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise DLLMError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    stored = config.get("torch_dtype") or config.get("dtype")
    return stored if stored in DTYPES else None


def cast_parameters(model: nn.Module, dtype: Optional[str], config: Dict) -> None:
    """Cast floating parameters (those the model's `cast_predicate` allows) and record the dtype."""
    if dtype is None:
        return
    target = getattr(mx, dtype)
    allowed = getattr(model, "cast_predicate", lambda _: True)
    parameters = tree_flatten(model.parameters())
    cast = [
        (name, value.astype(target) if allowed(name) and mx.issubdtype(value.dtype, mx.floating) else value)
        for name, value in tqdm(parameters, desc=f"Casting to {dtype}", unit="tensor")
    ]
    model.update(tree_unflatten(cast))
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype


def quantize_weights(
    model: nn.Module, config: Dict, group_size: Optional[int], bits: Optional[int]
) -> Tuple[nn.Module, Dict]:
    try:
        return quantize_model(model, config, group_size, bits)
    except ValueError as error:
        raise DLLMError(f"cannot quantize: {str(error).splitlines()[0]}") from error


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for pattern in TOKENIZER_PATTERNS:
        for file in map(Path, glob.glob(str(source / pattern))):
            content = read_json(file) if file.name == "tokenizer_config.json" else {}
            if "auto_map" in content:
                write_json(destination / file.name, without_remote_code(content))
            else:
                shutil.copy(file, destination)  # follows hub-cache symlinks, which `resolve` checked stay inside


def without_remote_code(config: Dict) -> Dict:
    """`auto_map` points transformers at the checkpoint's own Python files; a conversion never carries it."""
    return {key: value for key, value in config.items() if key != "auto_map"}


def write_config(config: Dict, file: Path, keep_vision_config: bool) -> None:
    save_config(without_remote_code(config), file, keep_vision_config=keep_vision_config)


def copy_lora(source: Path, destination: Path) -> None:
    """The drafter adapter's files (each one checked by `resolve`: regular, inside the checkpoint)."""
    (destination / LORA_FOLDER).mkdir()
    for file in sorted((source / LORA_FOLDER).iterdir()):
        shutil.copy(file, destination / LORA_FOLDER / file.name)


def load_tokenizer(source: Path, config: Dict):
    """The tokenizer `load` will need, its chat template rendered once: either is refused now, not after writing."""
    tokenizer = loading.load_tokenizer_checked(source, config)
    check_chat_template(tokenizer, template_origin(source))
    return tokenizer


def template_origin(source: Path) -> str:
    """Where transformers read the chat template from: its own file wins over tokenizer_config.json's entry."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (source / name).is_file():
            return str(source / name)
    return f"{source / 'tokenizer_config.json'} (chat_template)"


def check_chat_template(tokenizer, origin: str) -> None:
    """`generate` renders the template for every prompt, so one that fails, hangs or floods on a plain user message
    is refused now, under the same budget: a copy would only fail later (mlx-lm's convert copies it unread)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return
    try:
        render(tokenizer, [{"role": "user", "content": "hello"}])
    except DLLMError as error:
        raise DLLMError(f"{origin}: {error}; fix or remove it to convert") from error


def write_model(model: nn.Module, config: Dict, source: Path, mlx_path: Path, options: Options) -> None:
    """Cast, quantize and save a whole (lazily read) model into `mlx_path`, atomically."""
    if (source / LORA_FOLDER).is_dir():  # copied as is, so only a look before can refuse its NaN
        check_finite_files(sorted((source / LORA_FOLDER).glob("*.safetensors")), root=source)
    cast_parameters(model, options.dtype, config)
    if options.quantize:
        check_finite_files(weight_files(source))  # quantizing turns a NaN into a number: look before
        options.info("Quantizing")
        model, config = quantize_weights(model, config, options.q_group_size, options.q_bits)
    with staged_folder(mlx_path, options.force) as staging:
        save(staging, model, config, source, options.dtype)


def save(destination: Path, model: nn.Module, config: Dict, source: Path, dtype: Optional[str] = None) -> None:
    # Multimodal targets keep their vision tower, so they need vision_config to load again.
    keep_vision_config = "vision_tower" in getattr(model, "model", {})
    save_model(destination, model, donate_model=True)
    check_finite_files(weight_files(destination), dtype)
    write_config(config, destination / "config.json", keep_vision_config=keep_vision_config)
    copy_tokenizer_files(source, destination)
    if (source / LORA_FOLDER).is_dir():  # the drafter adapter travels beside the weights
        copy_lora(source, destination)


def nonfinite_hint(dtype: Optional[str]) -> str:
    return " (float16 overflows beyond 65504: keep bfloat16 or float32)" if dtype == "float16" else ""


def check_finite_files(files: List[Path], dtype: Optional[str] = None, root: Optional[Path] = None) -> None:
    """Refuse a NaN/Inf tensor by name (and its file's, from `root`), reading one tensor at a time (peak memory:
    the largest tensor)."""
    for file in files:
        where = str(file.relative_to(root)) if root is not None else file.name
        tensors = mx.load(str(file))
        while tensors:
            name, value = tensors.popitem()
            fault = weight_fault(value, finite_screen(value)) if mx.issubdtype(value.dtype, mx.floating) else None
            if fault:
                raise DLLMError(fault_message(name, where, fault) + nonfinite_hint(dtype))
