"""A new drafter's config, in the z-lab layout `load` reads, sized from its target."""

from typing import Dict, List, Optional, Sequence

from ..errors import DLLMError

FEATURE_LAYERS = 5  # the published drafters read five target layers
ARCHITECTURES = {"dflash": "DFlashDraftModel", "dflash2": "DFlash2DraftModel"}
# DFlash2's architecture fields as z-lab's published Qwen3.8-27B-DFlash2 sets them: a new drafter's defaults.
DFLASH2_DEFAULTS = {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 256, "selector_top_k": 16}
SELECTOR_LOSS_WEIGHT = 1.0  # NeMo Automodel's DFlash2 trainer's default (a training option, not a field)


def default_target_layers(num_layers: int, count: int = FEATURE_LAYERS) -> List[int]:
    """`count` layers spread from layer 1 to L-3, as z-lab's `build_target_layer_ids` places them."""
    if num_layers < 4:
        return [num_layers // 2]
    if count == 1:
        return [num_layers // 2]
    ids = [round(1 + index * (num_layers - 4) / (count - 1)) for index in range(count)]
    return sorted(set(ids))


def check_target_layers(layer_ids: Sequence[int], num_layers: int) -> List[int]:
    ids = list(layer_ids)
    if not ids:
        raise DLLMError("--target-layers needs at least one layer")
    outside = [i for i in ids if not 0 <= i < num_layers]
    if outside:
        raise DLLMError(f"target layer {outside[0]} is outside the target's layers 0..{num_layers - 1}")
    if len(set(ids)) != len(ids):
        raise DLLMError("--target-layers lists a layer twice")
    return ids


def choose_mask_token(tokenizer, vocab_rows: int, requested: Optional[int], used: set) -> int:
    """The target's mask token, else a reserved special token that no training sequence contains."""
    if requested is not None:
        choice, source = requested, "--mask-token-id"
    elif getattr(tokenizer, "mask_token_id", None) is not None:
        choice, source = tokenizer.mask_token_id, "the tokenizer's mask token"
    else:
        taken = {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.eos_token_ids}
        reserved = [i for i in sorted(special_ids(tokenizer), reverse=True) if i not in taken and i not in used]
        if not reserved:
            raise DLLMError("the target has no mask token and no unused special token; pass --mask-token-id")
        choice, source = reserved[0], "a reserved special token"
    if not 0 <= choice < vocab_rows:
        raise DLLMError(f"mask token {choice} ({source}) is outside the target's embedding table ({vocab_rows} rows)")
    return choice


def special_ids(tokenizer) -> set:
    """Special tokens, including added ones no role names (SmolLM2's <repo_name>, <empty_output>, ...)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    return set(getattr(hf, "all_special_ids", []) or []) | {i for i, token in added.items() if token.special}


def drafter_config(target_args, num_layers: int, block_size: int, layer_ids: List[int], mask_token_id: int,
                   draft_vocab: Optional[List[int]] = None) -> Dict:
    """The target's width, heads and RoPE; `num_layers` decoder layers reading `layer_ids`; `draft_vocab`, the
    tokens it may propose (None: all)."""
    hidden = target_args.hidden_size
    heads = target_args.num_attention_heads
    config = {
        "architectures": [ARCHITECTURES["dflash"]],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(target_args, "num_key_value_heads", None) or heads,
        "head_dim": getattr(target_args, "head_dim", None) or hidden // heads,
        "intermediate_size": target_args.intermediate_size,
        "rms_norm_eps": float(f"{getattr(target_args, 'rms_norm_eps', 1e-6):.6g}"),  # not float32 noise
        "rope_theta": getattr(target_args, "rope_theta", 10000.0),
        "rope_scaling": getattr(target_args, "rope_scaling", None),
        "max_position_embeddings": getattr(target_args, "max_position_embeddings", 40960),
        "vocab_size": target_args.vocab_size,
        "attention_bias": False,
        "block_size": block_size,
        "dflash_config": {"target_layer_ids": layer_ids, "mask_token_id": mask_token_id, "block_size": block_size},
    }
    if draft_vocab is not None:
        config["dflash_config"]["draft_vocab"] = list(draft_vocab)
    return config


def as_dflash2(config: Dict, fields: Dict) -> Dict:
    """A drafter config made DFlash2's: its architecture, and its fields in `dflash_config` (where z-lab puts them)."""
    return {**config, "architectures": [ARCHITECTURES["dflash2"]],
            "dflash_config": {**config["dflash_config"], **fields}}
