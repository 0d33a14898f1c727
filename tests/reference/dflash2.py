"""PyTorch reference side for DFlash2: z-lab's `DFlash2DraftModel` (`dflash==0.1.0`), tiny and random, saved in
z-lab's checkpoint layout, and its outputs. Importing this module needs torch, transformers and `dflash`."""

from pathlib import Path
from typing import Dict, List

import torch
from dflash.model import DFlash2DraftModel, _crop_to, _make_cache
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from .harness import DEVICE, EOS_TOKEN_ID, MASK_TOKEN_ID, TARGET_LAYER_IDS

SELECTOR = {"conv_kernel_size": 3, "conv_group_size": 16, "selector_rank": 8, "selector_top_k": 4}
CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


def build_draft(target_config, out_dir: Path, block_size: int = 8, seed: int = 1) -> DFlash2DraftModel:
    """A DFlash2 drafter for `target_config`, saved as z-lab ships them: Qwen3 fields, the DFlash and DFlash2 fields
    in `dflash_config`, one safetensors file whose codebooks have no `.weight`."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=target_config.vocab_size,
        hidden_size=target_config.hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=1024,
        initializer_range=0.2,
        num_target_layers=target_config.num_hidden_layers,
        block_size=block_size,
        dflash_config={"target_layer_ids": TARGET_LAYER_IDS, "mask_token_id": MASK_TOKEN_ID, **SELECTOR},
        architectures=["DFlash2DraftModel"],
        bos_token_id=None,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
    )
    model = DFlash2DraftModel(config).to(DEVICE).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("base_kernel"):  # the reference initialises it to zero: the base taps would go unchecked
                parameter.normal_(0.0, 0.3)
            elif name.endswith("kernel_projection.weight"):  # dynamic taps ~0.4: larger ones blow up float32 error
                parameter.normal_(0.0, 0.05)
            elif parameter.ndim == 1:  # norms start at one: perturbed, a norm in the wrong place shows
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(out_dir)
    file = Path(out_dir) / "model.safetensors"
    weights = load_file(file)
    for name in CODEBOOKS:
        weights[name] = weights.pop(f"{name}.weight")
    save_file(weights, file, metadata={"format": "pt"})
    return model


@torch.no_grad()
def draft_forward(draft: DFlash2DraftModel, calls: List[Dict]) -> List[torch.Tensor]:
    """Hidden states of every block position over successive (features, block embeddings) calls on one cache, as
    `dflash_generate` drives the drafter: each call appends its context rows, then the cache is cropped to them."""
    cache = _make_cache(draft.config)
    seen, outputs = 0, []
    for call in calls:
        features = torch.as_tensor(call["features"], device=DEVICE)
        block = torch.as_tensor(call["block_embeddings"], device=DEVICE)
        positions = torch.arange(seen, seen + features.shape[1] + block.shape[1], device=DEVICE)[None]
        hidden = draft(
            target_hidden=features, noise_embedding=block, position_ids=positions, past_key_values=cache, use_cache=True
        )
        seen += features.shape[1]
        _crop_to(cache, seen)
        outputs.append(hidden.float().cpu())
    return outputs


@torch.no_grad()
def selected_path(draft: DFlash2DraftModel, target, hidden: torch.Tensor, anchor: int) -> List[int]:
    """The selector's greedy path for the hidden states [1, P, H] of positions 1..P after `anchor`."""
    anchor_ids = torch.tensor([anchor], device=DEVICE)
    path, _, _ = draft.propose(hidden.to(DEVICE), anchor_ids, target.lm_head, 0.0)
    return path[0].tolist()
