"""DiffusionGemma recipe: HF shards -> MLX shards one tensor at a time, named like the mlx-community conversions.

The model is only built lazily, for its parameter shapes and module types (its weights are never evaluated),
so peak memory stays near one output shard plus one tensor, whatever the size of the checkpoint.
Vision weights are carried over as stored (unquantized, uncast) for when the vision tower is ported.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_dllm import loading
from mlx_dllm.checkpoint_files import check_dtypes, fault_message, finite_screen, weight_fault, weight_files
from mlx_dllm.errors import DLLMError
from mlx_dllm.models.diffusion_gemma import VISION_PREFIXES, Model, ModelArgs
from mlx_dllm.staging import staged_folder

from .common import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    Options,
    copy_tokenizer_files,
    load_tokenizer,
    nonfinite_hint,
    write_config,
)

QUANT_RECIPES = ("mixed",)
# The mixed recipe's 8-bit modules (mlx-vlm's): embed_tokens is also the LM head and the self-conditioning matrix.
EIGHT_BIT = {"group_size": 64, "bits": 8}


def is_eight_bit(path: str) -> bool:
    return (
        path == "model.decoder.embed_tokens"
        or ".self_attn." in path
        or ".mlp." in path
        or path.endswith(".router.proj")
    )


def quantization_plan(model: nn.Module, group_size: int, bits: int, recipe: Optional[str]) -> Dict[str, Dict]:
    """Module path -> `mx.quantize` params, for each Linear/Embedding/SwitchLinear whose input dim fits its group."""
    plan = {}
    for path, module in reversed(model.named_modules()):  # model order: embed_tokens, layers.0.self_attn.q_proj...
        if not hasattr(module, "to_quantized"):
            continue
        params = EIGHT_BIT if recipe == "mixed" and is_eight_bit(path) else {"group_size": group_size, "bits": bits}
        if module.weight.shape[-1] % params["group_size"] == 0:  # same rule as mlx-lm: others stay float
            plan[path] = dict(params)
    return plan


def quantization_config(plan: Dict[str, Dict], group_size: int, bits: int, recipe: Optional[str]) -> Dict:
    """mlx-lm's `quantization` entry: the defaults plus one override per 8-bit module (the loader's class_predicate
    reads `config["quantization"][path]`); modules left float have no `.scales` and stay float on load."""
    config = {"group_size": group_size, "bits": bits, "mode": "affine"}
    if recipe == "mixed":
        config.update({path: params for path, params in plan.items() if is_eight_bit(path)})
    return config


def read_shard(file: Path, model: Model) -> Dict[str, mx.array]:
    """The shard's tensors, lazily: text ones under our names, vision ones as stored."""
    try:
        tensors = mx.load(str(file))
    except Exception as error:
        raise DLLMError(f"cannot read {file.name}: {str(error).splitlines()[0]}") from error
    vision = {name: value for name, value in tensors.items() if name.startswith(VISION_PREFIXES)}
    return {**model.sanitize(tensors), **vision}


def check_shards(files: List[Path], model: Model) -> List[int]:
    """Every tensor's name, shape and dtype against the model before anything is written; the tensor count per
    shard."""
    parameters = dict(tree_flatten(model.parameters()))
    expected = {name: tuple(value.shape) for name, value in parameters.items()}
    seen, counts = set(), []
    for file in files:
        tensors = read_shard(file, model)
        for name, value in tensors.items():
            if name.startswith(VISION_PREFIXES):
                continue
            if name not in expected:
                raise DLLMError(f"unexpected tensor {name} {tuple(value.shape)} in {file.name}")
            if tuple(value.shape) != expected[name]:
                raise DLLMError(f"tensor {name} has shape {tuple(value.shape)}, the model expects {expected[name]}")
        check_dtypes(tensors.items(), parameters, file.name)
        seen.update(tensors)
        counts.append(len(tensors))
    missing = [name for name in expected if name not in seen]
    if missing:
        raise DLLMError(f"the checkpoint lacks {missing[0]} {expected[missing[0]]}")
    return counts


def cast_tensor(name: str, value: mx.array, dtype: Optional[str]) -> mx.array:
    if name.startswith(VISION_PREFIXES) or dtype is None or not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(getattr(mx, dtype)) if value.dtype != getattr(mx, dtype) else value


def quantize_tensor(name: str, value: mx.array, plan: Dict[str, Dict]) -> Dict[str, mx.array]:
    """A cast tensor -> the tensors `load` reads: itself, or its packed weight, scales and biases."""
    path = name.removesuffix(".weight")
    if name.startswith(VISION_PREFIXES) or path == name or path not in plan:
        return {name: value}
    weight, scales, biases = mx.quantize(value, mode="affine", **plan[path])
    return {name: weight, f"{path}.scales": scales, f"{path}.biases": biases}


def tensor_screen(value: mx.array) -> mx.array:
    """The NaN/Inf screen of a floating tensor; integer tensors pass."""
    return finite_screen(value) if mx.issubdtype(value.dtype, mx.floating) else mx.array(0.0)


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shards(
    files: List[Path], counts: List[int], model: Model, destination: Path, dtype: Optional[str], plan: Dict
) -> Dict:
    """One output shard per input shard that keeps tensors; returns the index (weight_map, total_size)."""
    files = [file for file, count in zip(files, counts) if count]  # e.g. a shard holding only lm_head
    index = {"metadata": {"total_size": 0, "total_parameters": 0}, "weight_map": {}}
    with tqdm(total=sum(counts), desc="Converting", unit="tensor") as progress:
        for file, shard_name in zip(files, shard_names(len(files))):
            tensors, shard = read_shard(file, model), {}
            while tensors:
                name, value = tensors.popitem()  # the shard no longer holds the source once it is converted
                cast = cast_tensor(name, value, dtype)
                converted, screen = quantize_tensor(name, cast, plan), tensor_screen(cast)  # quantizing hides a NaN
                try:
                    mx.eval(converted, screen)
                except Exception as error:
                    raise DLLMError(f"cannot read {name} from {file.name}: {str(error).splitlines()[0]}") from error
                fault = weight_fault(cast, screen)
                if fault:
                    raise DLLMError(fault_message(name, file.name, fault) + nonfinite_hint(dtype))
                index["metadata"]["total_parameters"] += value.size
                shard.update(converted)
                del value
                progress.update()
            mx.save_safetensors(str(destination / shard_name), shard, metadata={"format": "mlx"})
            index["metadata"]["total_size"] += sum(value.nbytes for value in shard.values())
            index["weight_map"].update(dict.fromkeys(shard, shard_name))
            del shard
            mx.clear_cache()  # freed buffers go back to the system, not to MLX's cache
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    return index


def record_dtype(config: Dict, dtype: Optional[str]) -> None:
    if dtype is None:
        return
    for section in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key] = dtype


def build_lazy_model(config: Dict) -> Model:
    """Our model with unevaluated weights: its shapes and module types cost no memory (measured: 39 KB for 26B)."""
    if "quantization" in config or "quantization_config" in config:
        raise DLLMError("the checkpoint is already quantized; convert the original one")
    return loading.construct(Model, ModelArgs, config, "DiffusionGemma config")


def convert_checkpoint(source: Path, mlx_path: Path, config: Dict, options: Options) -> None:
    """Stream `source` into `mlx_path`; a quantization recipe implies quantization (it is one)."""
    model = build_lazy_model(config)
    load_tokenizer(source, config)  # `load` needs it: refuse now, not after writing
    plan = {}
    if options.quantize or options.quant_recipe is not None:
        group_size, bits = options.q_group_size or DEFAULT_GROUP_SIZE, options.q_bits or DEFAULT_BITS
        plan = quantization_plan(model, group_size, bits, options.quant_recipe)
        config["quantization"] = quantization_config(plan, group_size, bits, options.quant_recipe)
    record_dtype(config, options.dtype)
    files = weight_files(source)
    counts = check_shards(files, model)
    with staged_folder(mlx_path, options.force) as staging:
        index = write_shards(files, counts, model, staging, options.dtype, plan)
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        write_config(config, staging / "config.json", keep_vision_config=True)
        copy_tokenizer_files(source, staging)
    if plan:
        bits_per_weight = 8 * index["metadata"]["total_size"] / index["metadata"]["total_parameters"]
        options.info(f"Quantized model with {bits_per_weight:.3f} bits per weight.")
