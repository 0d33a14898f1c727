"""Tiny random checkpoints for each family, built with MLX alone (no torch, no download), so CI can run
`mlx-dllm benchmark --tiny FAMILY`: they check plumbing, not speed (random weights accept ~1 token)."""

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ..errors import DLLMError

VOCAB = 256
EOS_TOKEN_ID = 1
MASK_TOKEN_ID = VOCAB - 1  # an embedding row the tokenizer never produces
WEIGHT_SCALE = 0.2  # peaked logits keep greedy choices away from float ties
LORA_RANK = 4
LORA_FOLDER = "linear_spec_lora"  # the loader attaches it: linear-spec then drafts with it
FAMILIES = ("dflash", "diffusion-gemma", "nemotron")

QWEN3_TARGET = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "eos_token_id": EOS_TOKEN_ID,
}
DFLASH_DRAFT = {
    "architectures": ["DFlashDraftModel"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1024,
    "block_size": 8,
    "mask_token_id": MASK_TOKEN_ID,
    "target_layer_ids": [0, 1, 2],
}
DIFFUSION_GEMMA = {
    "model_type": "diffusion_gemma",
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 8,
    "text_config": {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "global_head_dim": 16,
        "num_global_key_value_heads": 1,
        "num_experts": 4,
        "top_k_experts": 2,
        "sliding_window": 16,
        "rms_norm_eps": 1e-6,
        "eos_token_id": EOS_TOKEN_ID,
    },
    "eos_token_id": EOS_TOKEN_ID,
}
NEMOTRON = {
    "model_type": "nemotron_labs_diffusion",
    "architectures": ["NemotronLabsDiffusionModel"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "mask_token_id": MASK_TOKEN_ID,
    "block_size": 8,
    "eos_token_id": EOS_TOKEN_ID,
}


def model_classes(config: Dict):
    """Our model classes for the config (the loader's choice), or mlx-lm's for an AR target."""
    from mlx_lm.utils import _get_classes

    from ..loading import own_module

    module = own_module(config)
    return (module.Model, module.ModelArgs) if module is not None else _get_classes(config)


def random_weights(model, seed: int) -> Dict[str, mx.array]:
    """Normal(0, WEIGHT_SCALE) matrices; vectors (norm scales, layer scalars) near one."""
    keys = iter(mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters()))))

    def draw(value):
        noise = mx.random.normal(value.shape, key=next(keys))
        return WEIGHT_SCALE * noise if value.ndim > 1 else 1 + 0.1 * noise

    return dict(tree_flatten(tree_map(draw, model.parameters())))


def save_checkpoint(config: Dict, folder: Path, seed: int, tokenizer: bool = True) -> None:
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), random_weights(model, seed), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": EOS_TOKEN_ID, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer:
        save_tokenizer(folder)


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over every id ("w2" ... "w255"): enough for the loader and the detokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": EOS_TOKEN_ID, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))


def save_lora(config: Dict, folder: Path, seed: int) -> None:
    """A PEFT LoRA on every o_proj, as Nemotron-Labs-Diffusion ships its linear-spec drafter."""
    lora = folder / LORA_FOLDER
    lora.mkdir(parents=True, exist_ok=True)
    heads_width = config["num_attention_heads"] * config["head_dim"]
    keys = iter(mx.random.split(mx.random.key(seed), 2 * config["num_hidden_layers"]))
    weights = {}
    for index in range(config["num_hidden_layers"]):
        stem = f"base_model.model.encoder.layers.{index}.self_attn.o_proj"
        weights[f"{stem}.lora_A.weight"] = (
            mx.random.normal((LORA_RANK, heads_width), key=next(keys)) * heads_width**-0.5
        )
        weights[f"{stem}.lora_B.weight"] = 0.05 * mx.random.normal((config["hidden_size"], LORA_RANK), key=next(keys))
    mx.save_safetensors(str(lora / "adapter_model.safetensors"), weights)
    adapter = {"peft_type": "LORA", "target_modules": ["o_proj"], "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK}
    (lora / "adapter_config.json").write_text(json.dumps(adapter, indent=2))


def build_tiny(family: str, root: Path, seed: int = 0) -> Tuple[Path, Optional[Path]]:
    """(model folder, draft folder or None) of a tiny random checkpoint of `family` under `root`."""
    if family == "dflash":
        save_checkpoint(QWEN3_TARGET, root / "target", seed)
        save_checkpoint(DFLASH_DRAFT, root / "draft", seed + 1, tokenizer=False)
        return root / "target", root / "draft"
    configs = {"diffusion-gemma": DIFFUSION_GEMMA, "nemotron": NEMOTRON}
    if family not in configs:
        raise DLLMError(f"unknown tiny family '{family}' (choose from {', '.join(FAMILIES)})")
    save_checkpoint(configs[family], root / family, seed)
    if family == "nemotron":
        save_lora(NEMOTRON, root / family, seed + 2)
    return root / family, None
