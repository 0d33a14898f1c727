"""Tiny random checkpoints of each family (its FAMILY's recipe), built with MLX alone (no torch, no download), so
CI can run `mlx-dllm benchmark --tiny FAMILY`: they check plumbing, not speed (random weights accept ~1 token)."""

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ..checkpoint_files import LORA_FOLDER
from ..errors import DLLMError
from ..models.family import TINY_EOS_TOKEN_ID as EOS_TOKEN_ID
from ..models.family import TINY_VOCAB as VOCAB
from ..models.family import Family, families, model_file

WEIGHT_SCALE = 0.2  # peaked logits keep greedy choices away from float ties
LORA_RANK = 4


def model_classes(config: Dict):
    """Our model classes for the config (the loader's choice), or mlx-lm's for an AR target."""
    from mlx_lm.utils import _get_classes

    module = model_file(config)
    return (module.Model, module.ModelArgs) if module is not None else _get_classes(config)


def random_weights(model, seed: int) -> Dict[str, mx.array]:
    """Normal(0, WEIGHT_SCALE) matrices; vectors (norm scales, layer scalars) near one."""
    keys = iter(mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters()))))

    def draw(value):
        noise = mx.random.normal(value.shape, key=next(keys))
        return WEIGHT_SCALE * noise if value.ndim > 1 else 1 + 0.1 * noise

    return dict(tree_flatten(tree_map(draw, model.parameters())))


def save_checkpoint(config: Dict, folder: Path, seed: int, tokenizer: bool = True):
    """The random model written as a checkpoint folder; returned for recipes that read its shapes."""
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), random_weights(model, seed), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": EOS_TOKEN_ID, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer:
        save_tokenizer(folder)
    return model


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over every id ("w2" ... "w255"): enough for the loader and the detokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": EOS_TOKEN_ID, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))


def save_lora(model, module: str, folder: Path, seed: int) -> None:
    """A PEFT LoRA on `module` of every layer (`{}`: the layer's index), as Nemotron-Labs-Diffusion ships its
    linear-spec drafter."""
    lora = folder / LORA_FOLDER
    lora.mkdir(parents=True, exist_ok=True)
    shapes = {name: value.shape for name, value in tree_flatten(model.parameters())}
    keys = iter(mx.random.split(mx.random.key(seed), 2 * len(model.layers)))
    weights = {}
    for index in range(len(model.layers)):
        stem = module.format(index)
        width_out, width_in = shapes[f"{stem}.weight"]
        peft_stem = f"base_model.model.{stem}"
        weights[f"{peft_stem}.lora_A.weight"] = mx.random.normal((LORA_RANK, width_in), key=next(keys)) * width_in**-0.5
        weights[f"{peft_stem}.lora_B.weight"] = 0.05 * mx.random.normal((width_out, LORA_RANK), key=next(keys))
    mx.save_safetensors(str(lora / "adapter_model.safetensors"), weights)
    adapter = {
        "peft_type": "LORA",
        "target_modules": [module.rpartition(".")[2]],
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
    }
    (lora / "adapter_config.json").write_text(json.dumps(adapter, indent=2))


def tiny_family(name: str) -> Family:
    found = {family.name: family for family in families() if family.tiny is not None}
    if name not in found:
        raise DLLMError(f"unknown tiny family '{name}' (choose from {', '.join(found)})")
    return found[name]


def build_tiny(name: str, root: Path, seed: int = 0) -> Tuple[Path, Optional[Path]]:
    """(model folder, draft folder or None) of a tiny random checkpoint of the family `name` under `root`."""
    tiny = tiny_family(name).tiny
    if tiny.target is not None:  # a drafter: its target holds the tokenizer
        save_checkpoint(tiny.target, root / "target", seed)
        save_checkpoint(tiny.config, root / "draft", seed + 1, tokenizer=False)
        return root / "target", root / "draft"
    model = save_checkpoint(tiny.config, root / name, seed)
    if tiny.lora is not None:
        save_lora(model, tiny.lora, root / name, seed + 2)
    return root / name, None
