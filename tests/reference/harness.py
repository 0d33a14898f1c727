"""PyTorch reference side: tiny random checkpoints built by the transformers classes, and their outputs.

Runs on CUDA when available, else on the CPU. `python -m tests.reference.harness OUT` writes every
checkpoint (HF layout) and the reference greedy outputs into OUT, which is how fixtures regenerate.
"""

import json
import sys
from pathlib import Path
from typing import Dict, List

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MuseGlimmerAssistantConfig,
    MuseGlimmerAssistantModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 256
MASK_TOKEN_ID = VOCAB - 1  # a row of the embedding table that the tokenizer never produces
EOS_TOKEN_ID = 1
TARGET_LAYER_IDS = [0, 1, 2]
LAST_LAYER_IDS = [1, 3]  # includes the last layer, whose HF hidden state is the final-normed one
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # peaked logits keep greedy choices away from float ties
    eos_token_id=EOS_TOKEN_ID,
    bos_token_id=None,
    pad_token_id=0,
)

# name -> (config, model class); together they cover GQA with head_dim != hidden/heads, an untied head,
# a tied head and sliding-window layers (a window smaller than the generated text).
TARGETS = {
    "qwen3_gqa": (
        lambda: Qwen3Config(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False
        ),
        Qwen3ForCausalLM,
    ),
    "llama_tied": (
        lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
        LlamaForCausalLM,
    ),
    "ministral_sliding": (
        lambda: MinistralConfig(
            **COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            tie_word_embeddings=False,
        ),
        MinistralForCausalLM,
    ),
}


def save_tokenizer(out_dir: Path) -> None:
    """A word-level tokenizer over every id ("w2" ... "w255"), enough for the loader and detokenizer."""
    vocab = {"<pad>": 0, "</s>": EOS_TOKEN_ID}
    vocab.update({f"w{i}": i for i in range(2, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)


def build_target(name: str, out_dir: Path, seed: int = 0) -> torch.nn.Module:
    make_config, model_class = TARGETS[name]
    torch.manual_seed(seed)
    model = model_class(make_config()).to(DEVICE).eval()
    model.save_pretrained(out_dir)
    save_tokenizer(out_dir)
    return model


def build_draft(
    target_config,
    out_dir: Path,
    block_size: int = 8,
    seed: int = 1,
    layers: int = 2,
    layer_types=None,
    sliding_window=8,
    rope_parameters=None,
    target_layer_ids=TARGET_LAYER_IDS,
) -> torch.nn.Module:
    """The DFlash v1 drafter as transformers ships it (Muse Glimmer assistant), by default all full attention."""
    torch.manual_seed(seed)
    config = MuseGlimmerAssistantConfig(
        hidden_size=target_config.hidden_size,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-6,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=1024,
        layer_types=layer_types or ["full_attention"] * layers,
        sliding_window=sliding_window,
        block_size=block_size,
        mask_token_id=MASK_TOKEN_ID,
        target_layer_ids=target_layer_ids,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
    )
    model = MuseGlimmerAssistantModel(config).to(DEVICE).eval()
    model.save_pretrained(out_dir)
    return model


@torch.no_grad()
def reference_dflash_greedy(target, draft, prompt: List[int], max_new_tokens: int) -> List[int]:
    """transformers' own DFlash loop (assistant_model + speculation_type='dflash'), greedy."""
    ids = torch.tensor([prompt], device=DEVICE)
    config = GenerationConfig(
        speculation_type="dflash", do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0
    )
    out = target.generate(ids, assistant_model=draft, generation_config=config)
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def reference_greedy(target, prompt: List[int], max_new_tokens: int) -> List[int]:
    ids = torch.tensor([prompt], device=DEVICE)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return target.generate(ids, generation_config=config)[0, len(prompt) :].tolist()


@torch.no_grad()
def reference_draft_forward(draft, calls: List[Dict]) -> List[torch.Tensor]:
    """Run the drafter over successive (features, block embeddings) calls on one cache, as transformers'
    DFlash generator does: each call appends its context rows, then the block's K/V is cropped."""
    from transformers.cache_utils import DFlashCache

    cache = DFlashCache(config=draft.config)
    cache.activate_past_recording()  # lets crop() undo the block on sliding layers
    seen = 0
    outputs = []
    for call in calls:
        features = torch.as_tensor(call["features"], device=DEVICE)
        block = torch.as_tensor(call["block_embeddings"], device=DEVICE)
        S, B = features.shape[1], block.shape[1]
        cache.set_previous_accepted_tokens(S)
        positions = torch.arange(seen, seen + S + B, device=DEVICE)[None]
        out = draft(noise_embeds=block, context_hidden_states=features, position_ids=positions, cache=cache)
        cache.crop(-B)
        seen += S
        outputs.append(out.last_hidden_state.float().cpu())
    return outputs


def main(out: str) -> None:
    root = Path(out)
    prompts = [[5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12]]
    summary = {}
    for name in TARGETS:
        target = build_target(name, root / name / "target")
        draft = build_draft(target.config, root / name / "draft")
        summary[name] = {
            "prompts": prompts,
            "greedy": [reference_greedy(target, p, 24) for p in prompts],
            "dflash_greedy": [reference_dflash_greedy(target, draft, p, 24) for p in prompts],
        }
    (root / "reference_outputs.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote checkpoints and reference outputs for {', '.join(TARGETS)} under {root} ({DEVICE})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/reference/fixtures")
