"""What every conversion recipe shares: weight reading, casting, quantizing, saving into a staged folder."""

import glob
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import quantize_model, save_config, save_model
from tqdm import tqdm

from mlx_dllm.errors import DLLMError

DTYPES = ("float16", "bfloat16", "float32")
# Everything beside the weights and config that a folder needs to serve text; remote code (*.py) never.
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "tiktoken.model",
    "generation_config.json",
    "chat_template*",
)


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
        for file in glob.glob(str(source / pattern)):
            shutil.copy(file, destination)  # follows hub-cache symlinks


def save(destination: Path, model: nn.Module, config: Dict, source: Path) -> None:
    # Multimodal targets keep their vision tower, so they need vision_config to load again.
    keep_vision_config = "vision_tower" in getattr(model, "model", {})
    save_model(destination, model, donate_model=True)
    save_config(config, destination / "config.json", keep_vision_config=keep_vision_config)
    copy_tokenizer_files(source, destination)


def check_destination(mlx_path: Path, force: bool) -> None:
    if not force and (mlx_path.is_file() or (mlx_path.is_dir() and any(mlx_path.iterdir()))):
        raise DLLMError(f"{mlx_path} already exists and is not empty (use --force to replace it)")


def _sibling(mlx_path: Path, kind: str) -> Path:
    # Same parent, same filesystem: the final rename is atomic.
    return mlx_path.parent / f".{mlx_path.name}.{uuid.uuid4().hex[:8]}.{kind}"


@contextmanager
def staged_folder(mlx_path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `mlx_path`; on success it becomes `mlx_path`, on any failure it goes."""
    check_destination(mlx_path, force)
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(mlx_path, "partial")
    staging.mkdir()  # unlike mkdtemp, honours the umask: the folder ends up as mlx_path
    try:
        yield staging
        _replace(staging, mlx_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, mlx_path: Path) -> None:
    """Move the finished folder into place; an old `mlx_path` is set aside until the move succeeded."""
    if not os.path.lexists(mlx_path):
        os.rename(staging, mlx_path)
        return
    old = _sibling(mlx_path, "old")
    os.rename(mlx_path, old)
    try:
        os.rename(staging, mlx_path)
    except BaseException:
        os.rename(old, mlx_path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
