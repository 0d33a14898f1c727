"""Tiny random checkpoints of the hybrid and multimodal target families, built by the transformers classes.

Each builder saves a float32 checkpoint in Hugging Face layout (weights, config, tokenizer) and returns the
PyTorch model. Every hybrid family mixes at least two recurrent layers (gated delta net, short convolution,
Mamba-2) with attention; Gemma 4 has no recurrent layer and mixes sliding-window with global attention.
"""

from pathlib import Path
from typing import Callable, Dict

import torch
from transformers import (
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    Lfm2Config,
    Lfm2ForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3_5VisionConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from .harness import DEVICE, EOS_TOKEN_ID, VOCAB, save_tokenizer

WINDOW = 8  # Gemma 4's sliding window, smaller than the text a test generates
TOKENS = dict(vocab_size=VOCAB, eos_token_id=EOS_TOKEN_ID, bos_token_id=None, pad_token_id=0)
SMALL = dict(
    **TOKENS,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=1024,
    initializer_range=0.2,  # peaked logits keep greedy choices away from float ties
)
# Gated delta net (Qwen3.5, Qwen3-Next): two key heads shared by four value heads.
GATED_DELTA = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# The layer pattern transformers derives from `full_attention_interval=3` (which it does not save).
INTERVAL_3 = ["linear_attention", "linear_attention", "full_attention", "linear_attention", "linear_attention"]
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


def qwen3_5_text_config(rope_parameters=QWEN3_5_ROPE) -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        **SMALL, **GATED_DELTA, num_hidden_layers=5, layer_types=INTERVAL_3, rope_parameters=rope_parameters
    )


def qwen3_5_vlm_config() -> Qwen3_5Config:
    vision = Qwen3_5VisionConfig(
        depth=1,
        hidden_size=32,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,
        initializer_range=0.2,
    )
    rope = {**QWEN3_5_ROPE, "mrope_section": [1, 1, 0], "mrope_interleaved": True}
    return Qwen3_5Config(
        text_config=qwen3_5_text_config(rope_parameters=rope).to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=VOCAB - 2,
        video_token_id=VOCAB - 3,
        vision_start_token_id=VOCAB - 4,
        vision_end_token_id=VOCAB - 5,
        tie_word_embeddings=False,
    )


def qwen3_5_moe_config() -> Qwen3_5MoeTextConfig:
    return Qwen3_5MoeTextConfig(
        **SMALL, **GATED_DELTA, **MOE, num_hidden_layers=5, layer_types=INTERVAL_3, rope_parameters=QWEN3_5_ROPE
    )


def qwen3_next_config() -> Qwen3NextConfig:
    # Qwen3-Next as released: every layer sparse, a shared expert, no `rope_theta`/`partial_rotary_factor` saved.
    return Qwen3NextConfig(
        **SMALL,
        **GATED_DELTA,
        **MOE,
        num_hidden_layers=5,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        layer_types=INTERVAL_3,
    )


GEMMA4_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA4_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


def gemma4_text_config(**overrides) -> Gemma4TextConfig:
    """Gemma 4 E-series style: per-layer input embeddings, the last layers reusing earlier layers' K/V."""
    fields = dict(
        **SMALL,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        rms_norm_eps=1e-6,
        sliding_window=WINDOW,
        layer_types=GEMMA4_LAYERS,
        rope_parameters=GEMMA4_ROPE,
        final_logit_softcapping=30.0,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        tie_word_embeddings=True,
    )
    return Gemma4TextConfig(**{**fields, **overrides})


def gemma4_vlm_config() -> Gemma4Config:
    """Gemma 4 26B/31B style (no per-layer inputs, global layers with K = V and their own K/V head count, MoE)
    in the conditional-generation layout, with a tiny vision tower."""
    text = gemma4_text_config(
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        num_key_value_heads=2,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
    )
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
        initializer_range=0.2,
    )
    return Gemma4Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        audio_config=None,
        boi_token_id=VOCAB - 2,
        eoi_token_id=VOCAB - 3,
        image_token_id=VOCAB - 4,
        video_token_id=VOCAB - 5,
        boa_token_id=VOCAB - 6,
        eoa_token_index=VOCAB - 7,
        audio_token_id=VOCAB - 8,
        initializer_range=0.2,
    )


def lfm2_config() -> Lfm2Config:
    # Attention first, a convolution last: the first layer's cache is not the recurrent one.
    return Lfm2Config(
        **SMALL,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        norm_eps=1e-5,
        conv_L_cache=3,
        block_multiple_of=16,
        block_auto_adjust_ff_dim=True,
        layer_types=["full_attention", "conv", "conv", "full_attention", "conv"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
    )


def nemotron_h_config() -> NemotronHConfig:
    # Attention first, Mamba-2 last, with a dense MLP and a MoE layer (no cache) between them.
    return NemotronHConfig(
        **SMALL,
        layers_block_type=["full_attention", "mamba", "moe", "mlp", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        use_mamba_kernels=False,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )


def text_config(config):
    """The decoder's config: the nested `text_config` of a conditional-generation checkpoint, else the config."""
    return config.get_text_config(decoder=True)


def _builder(make_config: Callable, model_class) -> Callable[..., torch.nn.Module]:
    def build(out_dir: Path, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = model_class(make_config()).to(device=DEVICE, dtype=torch.float32).eval()
        model.save_pretrained(out_dir)
        save_tokenizer(out_dir)
        return model

    return build


HYBRID_TARGETS: Dict[str, Callable[..., torch.nn.Module]] = {
    "qwen3_5": _builder(qwen3_5_text_config, Qwen3_5ForCausalLM),
    "qwen3_5_vlm": _builder(qwen3_5_vlm_config, Qwen3_5ForConditionalGeneration),
    "qwen3_5_moe": _builder(qwen3_5_moe_config, Qwen3_5MoeForCausalLM),
    "qwen3_next": _builder(qwen3_next_config, Qwen3NextForCausalLM),
    "gemma4_text": _builder(gemma4_text_config, Gemma4ForCausalLM),
    "gemma4": _builder(gemma4_vlm_config, Gemma4ForConditionalGeneration),
    "lfm2": _builder(lfm2_config, Lfm2ForCausalLM),
    "nemotron_h": _builder(nemotron_h_config, NemotronHForCausalLM),
}
