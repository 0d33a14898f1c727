"""Local folder or hub repo -> (model, tokenizer). Never runs code shipped with a checkpoint."""

import inspect
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from . import default_model
from .checkpoint_files import (
    ALLOW_PATTERNS,
    LORA_FOLDER,
    check_checkpoint_files,
    check_dtypes,
    evaluate_finite,
    parked_copies,
    read_weights,
)
from .configs import check_ids, check_layer_count, check_sizes, read_json, target_fields
from .errors import DLLMError, first_line
from .models import dflash
from .models.drafter import is_drafter
from .models.family import model_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tiktoken.model")


def resolve(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is, else a snapshot of the hub repo; either way its files are checked before any is read."""
    path_or_repo = default_model.resolve(path_or_repo, revision)  # `default` and its hub id: the one reading of them
    check_path_type(path_or_repo, "the model path")
    path_or_repo = os.fspath(path_or_repo)
    path = Path(path_or_repo)
    if path.exists():
        if not path.is_dir():
            raise DLLMError(f"{path_or_repo} is not a folder")
    elif parked := parked_copies(path):
        raise parked_error(path_or_repo, parked)
    elif path.is_absolute() or path_or_repo.startswith((".", "~")) or path_or_repo.count("/") != 1:
        raise DLLMError(f"{path_or_repo} does not exist (and is not a hub repo id)")
    else:
        path = download(path_or_repo, revision)
    check_checkpoint_files(path)
    return path


def parked_error(path_or_repo: str, parked) -> DLLMError:
    """`convert --force` killed between its two renames left the previous conversion aside (see staging)."""
    where = ", ".join(str(folder) for folder in parked)
    return DLLMError(
        f"{path_or_repo} does not exist: an interrupted conversion left its previous contents in {where}; "
        f"rename that folder back to {Path(path_or_repo).name} (the next convert into it does)"
    )


def check_path_type(value, what: str, kind: str = "a folder path or a hub repo id") -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise DLLMError(f"{what} must be {kind}, got {type(value).__name__}")
    try:
        os.fsdecode(value).encode("utf-8")  # MLX and tokenizers take UTF-8 paths only (MLX: "std::bad_cast")
    except UnicodeEncodeError:
        raise DLLMError(f"{what} {os.fsdecode(value)!r} is not UTF-8 text, which MLX cannot open; rename it") from None


def download(repo: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as error:
        raise DLLMError(f"cannot fetch {repo} from the hub: {hub_reason(error)}") from error


def hub_reason(error: Exception) -> str:
    """The hub's own reason in one line: its first line that says more than the HTTP status."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not re.fullmatch(r"\d{3} Client Error\.?( \(.*\))?", line)]
    reason = (informative or lines or [""])[0]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def read_config(path: Path) -> Dict:
    """config.json, its sizes checked (a zero, a string or a billion layers never reaches a model class)."""
    if not (path / "config.json").exists():
        raise DLLMError(f"no config.json in {path}")
    config = read_json(path / "config.json")
    check_sizes(config)
    return config


def read_generation_config(path: Path) -> Dict:
    """generation_config.json, checked, or {} when the folder has none (mlx-lm's loader reads it unchecked)."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    config = read_json(file)
    check_ids(config.get("eos_token_id"), "eos_token_id", "generation_config.json")
    return config


def is_dflash_config(config: Dict) -> bool:
    """DFlash drafters (v1 or DFlash2) are recognised by architecture or `dflash_config`, never by model_type
    (gpt-oss says gpt_oss)."""
    return dflash.FAMILY.named_in(config)


def check_architecture(config: Dict) -> None:
    architectures = config.get("architectures") or []
    if architectures and not is_dflash_config(config) and "dflash" in " ".join(architectures).lower():
        raise DLLMError(f"unknown DFlash architecture {architectures[0]}")


# Families mlx-lm lacks a file for but whose architecture it has under another name (transformers 5 saves the
# text-only Qwen3.5 checkpoints as `*_text`; mlx-lm's files read both layouts).
TARGET_REMAPPING = {"ministral": "llama", "qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}


EXPERT_WEIGHT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """One tensor per expert (`experts.3.up_proj.weight`) -> transformers' fused `experts.gate_up_proj` and
    `experts.down_proj`, the layout mlx-lm's qwen3_5_moe reads."""
    experts: Dict[str, Dict[str, Dict[int, mx.array]]] = {}
    for name in [name for name in weights if EXPERT_WEIGHT.match(name)]:
        prefix, index, kind = EXPERT_WEIGHT.match(name).groups()
        experts.setdefault(prefix, {}).setdefault(kind, {})[int(index)] = weights.pop(name)
    for prefix, kinds in experts.items():
        stacked = {kind: mx.stack([tensors[i] for i in sorted(tensors)]) for kind, tensors in kinds.items()}
        weights[f"{prefix}.gate_up_proj"] = mx.concatenate([stacked["gate"], stacked["up"]], axis=-2)
        weights[f"{prefix}.down_proj"] = stacked["down"]
    return weights


# transformers 5 saves a text-only Qwen3.5 MoE (`qwen3_5_moe_text`) with one tensor per expert, the conditional
# generation checkpoints fused; mlx-lm reads the fused layout only.
WEIGHT_LAYOUTS = {"qwen3_5_moe_text": fuse_experts}


def _target_classes(config: Dict):
    model_type = TARGET_REMAPPING.get(config["model_type"], config["model_type"])
    model_class, args_class = _get_classes({**config, "model_type": model_type})
    layout = WEIGHT_LAYOUTS.get(config["model_type"])
    if layout is None:
        return model_class, args_class
    # mlx-lm's class itself, reading our layout first; module and name stay mlx-lm's (the family is read from them).
    sanitize = lambda self, weights: model_class.sanitize(self, layout(weights))  # noqa: E731
    namespace = {"sanitize": sanitize, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    return type(model_class.__name__, (model_class,), namespace), args_class


def check_target_architecture(config: Dict) -> None:
    if "model_type" not in config:
        raise DLLMError("config.json has no model_type")
    try:
        _target_classes(config)
    except ValueError as error:
        architecture = (config.get("architectures") or ["(none)"])[0]
        raise DLLMError(
            f"unknown architecture {architecture} (model_type {config['model_type']}): mlx-lm has no model for it"
        ) from error


# What a model class raises on a config value of the wrong type or shape (a string where it reads a dict, ...).
BUILD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def construct(model_class, args_class, config: Dict, what: str) -> nn.Module:
    """`model_class` built from `config`; a value it cannot build from is one line naming `what`."""
    try:
        return model_class(args_class.from_dict(config))
    except DLLMError:
        raise
    except BUILD_ERRORS as error:
        raise DLLMError(f"{what}: {first_line(error)}") from error


def dtype_checked(model_class, path: Path):
    """`model_class` for one mlx-lm load: its load_weights first refuses a tensor of the wrong dtype (mlx-lm calls it
    on the freshly built, already quantized model, whose parameters say what each tensor must be), and the model is
    a plain `model_class` from then on."""

    def load_weights(self, weights, strict=True):
        check_dtypes(weights, dict(tree_flatten(self.parameters())), str(path))
        self.__class__ = model_class
        return self.load_weights(weights, strict)

    namespace = {"load_weights": load_weights, "__module__": model_class.__module__}
    return type(model_class.__name__, (model_class,), namespace)


def build_model(path: Path, config: Dict, lazy: bool = False) -> Tuple[nn.Module, Dict]:
    """The model in `path` with its weights, and the config mlx-lm saw (quantization included)."""
    module = model_file(config)
    if module is None:
        check_target_architecture(config)

    def get_classes(config: Dict):
        model_class, args_class = (module.Model, module.ModelArgs) if module is not None else _target_classes(config)
        return dtype_checked(model_class, path), args_class

    check_layer_count(config, read_weights(path))  # one-line errors before mlx-lm reads them
    generation_config = read_generation_config(path)
    # Our own models read their decoding defaults (e.g. DiffusionGemma's denoising knobs) from their args;
    # mlx-lm targets get the fields their families read that transformers 5 omits or stores elsewhere.
    if module is not None:
        extra = {"generation_config": generation_config}
    else:
        extra = target_fields(config, inspect.signature(_target_classes(config)[1]).parameters)
    try:
        return load_model(path, lazy=lazy, model_config=extra, get_model_classes=get_classes)
    except DLLMError:
        raise
    except BUILD_ERRORS as error:
        raise DLLMError(f"cannot build the model in {path}: {first_line(error)}") from error


def load_tokenizer_checked(path: Path, config: Dict) -> TokenizerWrapper:
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise DLLMError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
    # As in mlx-lm, the generation config's EOS ids win over the model config's.
    eos_token_ids = read_generation_config(path).get("eos_token_id", config.get("eos_token_id"))
    try:
        # trust_remote_code=False reaches AutoTokenizer and the AutoConfig inside it: `auto_map` never prompts or runs.
        return load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False}, eos_token_ids=eos_token_ids)
    except Exception as error:
        raise DLLMError(f"cannot load the tokenizer in {path}: {first_line(error)}") from error


def load(
    path_or_repo: str, revision: Optional[str] = None, lazy: bool = False
) -> Tuple[nn.Module, Optional[TokenizerWrapper]]:
    """Load a model of our families or an mlx-lm AR model (a drafter's tokenizer is optional: it uses the target's).

    Unless `lazy`, weights holding NaN or Inf are refused (the check rides the eval that reads them).
    """
    path = resolve(path_or_repo, revision)
    config = read_config(path)
    check_architecture(config)
    model, _ = build_model(path, config, lazy=True)
    if hasattr(model, "load_lora") and (path / LORA_FOLDER).is_dir():
        model.load_lora(path / LORA_FOLDER)
    if not lazy:
        evaluate_finite(model, path)
        model = default_model.as_run_here(model, path)  # the CPU backend's rules, for the API and every command
    if is_drafter(model) and not any((path / name).exists() for name in TOKENIZER_FILES):
        return model, None
    return model, load_tokenizer_checked(path, config)


def load_pair(
    model_path: str, draft_path: Optional[str] = None
) -> Tuple[nn.Module, TokenizerWrapper, Optional[nn.Module]]:
    """(target, its tokenizer, drafter or None), each checked for its role: the one loading policy of the CLI,
    the server, the benchmark and the trainer. The drafter uses the target's tokenizer."""
    model, tokenizer = load(model_path)
    if is_drafter(model):
        raise DLLMError(f"{model_path} is a DFlash drafter: pass it as --draft-model, with its target as --model")
    if draft_path is None:
        return model, tokenizer, None
    draft = load(draft_path)[0]
    if not is_drafter(draft):
        kind = getattr(draft, "model_type", type(draft).__name__)
        raise DLLMError(f"--draft-model {draft_path} is not a DFlash drafter (it is a {kind} model)")
    return model, tokenizer, draft
