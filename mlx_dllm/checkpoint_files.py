"""Which files of a checkpoint folder may be read (regular files inside it; the index names the shards),
and reading its weights with NaN/Inf refused by name."""

import math
import os
import re
import stat
import uuid
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .configs import read_json
from .errors import DLLMError

# What a checkpoint needs; remote code (*.py) is deliberately not fetched.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "linear_spec_lora/*",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
]
# Every top-level file the loader, transformers' tokenizer (e.g. spiece.model) or the converter may open.
READ_PATTERNS = [pattern for pattern in ALLOW_PATTERNS if "/" not in pattern] + ["chat_template*", "*.model"]
INDEX_FILE = "model.safetensors.index.json"
LORA_FOLDER = "linear_spec_lora"  # Nemotron-Labs-Diffusion's drafter adapter, beside the weights
READ_FOLDERS = (LORA_FOLDER, "additional_chat_templates")  # the second: transformers reads its *.jinja
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


def sibling(folder: Path, kind: str) -> Path:
    """A new hidden name beside `folder` (same filesystem, so renames between them are atomic): `.NAME.<hex>.KIND`."""
    return folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.{kind}"


def parked_copies(folder: Path) -> List[Path]:
    """The `old` siblings of `folder`: a previous conversion that a replacement killed midway left aside."""
    name = re.compile(rf"\.{re.escape(folder.name)}\.[0-9a-f]{{8}}\.old")
    try:
        entries = [entry for entry in folder.parent.iterdir() if name.fullmatch(entry.name)]
    except OSError:
        return []
    return sorted(entry for entry in entries if entry.is_dir() and not entry.is_symlink())


def checkpoint_root(folder: Path) -> Path:
    """Where the folder's links may point: a hub snapshot links into its repo's cache folder (../../blobs)."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def check_checkpoint_files(folder: Path) -> None:
    """Each file we may read is a regular file inside the checkpoint (a link to a key or a FIFO is refused)."""
    root = checkpoint_root(folder)
    for entry in listing(folder):
        if any(fnmatch(entry.name, pattern) for pattern in READ_PATTERNS):
            check_regular_file(entry, root)
    for name in READ_FOLDERS:
        subfolder = folder / name
        if subfolder.is_symlink() or subfolder.is_dir():
            check_inside(subfolder, root)
            for entry in listing(subfolder):
                check_regular_file(entry, root)


def listing(folder: Path) -> List[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise DLLMError(f"cannot list {folder}: {error.strerror}") from error


def check_inside(file: Path, root: Path) -> Path:
    target = file.resolve()
    if not target.is_relative_to(root):
        raise DLLMError(f"{file} links outside the checkpoint folder (to {target}); it is not read")
    return target


def check_regular_file(file: Path, root: Path) -> None:
    target = check_inside(file, root)
    try:
        mode = os.stat(target).st_mode
    except OSError as error:
        raise DLLMError(f"cannot read {file}: {error.strerror}") from error
    if not stat.S_ISREG(mode):
        raise DLLMError(f"{file} is not a regular file (a folder, FIFO or device); it is not read")


def weight_files(path: Path) -> List[Path]:
    """The shards: exactly those the index names when there is one, else every `model*.safetensors`.

    mlx-lm's loader globs `model*.safetensors`, so a shard beside the index that it does not name is refused
    rather than skipped: that way the index wins in convert and in load alike.
    """
    on_disk = sorted(path.glob("model*.safetensors"))
    if not (path / INDEX_FILE).exists():
        if not on_disk:
            raise DLLMError(f"no model*.safetensors in {path}")
        return on_disk
    named = indexed_shards(path)
    missing = [name for name in named if not (path / name).exists()]
    if missing:
        raise DLLMError(f"{INDEX_FILE} names {missing[0]}, which is missing from {path}")
    stray = [file.name for file in on_disk if file.name not in named]
    if stray:
        raise DLLMError(f"{stray[0]} in {path} is not named in {INDEX_FILE}: remove it or fix the index")
    return [path / name for name in named]


def indexed_shards(path: Path) -> List[str]:
    weight_map = read_json(path / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DLLMError(f"{path / INDEX_FILE} has no weight_map")
    named = sorted({str(name) for name in weight_map.values()})
    for name in named:
        if Path(name).name != name or not fnmatch(name, "model*.safetensors"):
            raise DLLMError(f"{INDEX_FILE} names {name!r}: shards must be model*.safetensors files beside it")
    return named


def read_weights(path: Path) -> Dict[str, mx.array]:
    """All shard tensors (lazily); one line on missing or unreadable files (a truncated download)."""
    weights = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as error:
            raise DLLMError(f"cannot read {file.name}: {str(error).splitlines()[0]}") from error
    return weights


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def check_dtypes(tensors: Iterable[Tuple[str, mx.array]], parameters: Dict[str, mx.array], where: str) -> None:
    """Each tensor suits the parameter it fills: any float for a float parameter, exactly its integer type for a
    packed one (a quantized weight's uint32). An integer label on a float weight would load and generate garbage."""
    for name, value in tensors:
        parameter = parameters.get(name)
        if parameter is None or value.dtype == parameter.dtype:
            continue  # a name the model lacks is the loader's to refuse
        floating = mx.issubdtype(parameter.dtype, mx.floating)
        if not (floating and mx.issubdtype(value.dtype, mx.floating)):
            needed = "a float type" if floating else dtype_name(parameter.dtype)
            raise DLLMError(f"tensor {name} in {where} is {dtype_name(value.dtype)}, where the model needs {needed}")


# A weight beyond 2^64 overflows float32 once a norm squares it: activations turn into Inf, or into zeros
# that decode as token 0 ("w0 w0 w0"). No trained model comes near it.
MAX_WEIGHT = 2.0**64


def fault_message(name: str, where: str, fault: str) -> str:
    return f"tensor {name} in {where} {fault}"


def finite_screen(value: mx.array) -> mx.array:
    """The tensor's sum (lazily): one reduction, and NaN or Inf anywhere in the tensor makes it non-finite."""
    return mx.sum(value)


def weight_fault(value: mx.array, screen: mx.array) -> Optional[str]:
    """What makes a floating tensor unusable, or None. Exact; the element-wise passes are paid only when the screen
    fails, which a sum past the dtype's range (huge weights, or a float16 table's plain total) also does."""
    if math.isfinite(screen.item()):
        return None
    if not mx.isfinite(value).all().item():
        return "holds NaN or Inf"
    if mx.abs(value).max().item() > MAX_WEIGHT:
        return "holds values beyond 2^64, whose squares overflow float32"
    return None


def evaluate_finite(model: nn.Module, path: Path) -> None:
    """Evaluate the weights with each floating tensor's screen riding the same eval: the weights are read once."""
    floating = [(n, v) for n, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    screens = [finite_screen(value) for _, value in floating]
    mx.eval(model.parameters(), screens)
    for (name, value), screen in zip(floating, screens):
        fault = weight_fault(value, screen)
        if fault:
            raise DLLMError(fault_message(name, str(path), fault))
