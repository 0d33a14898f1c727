"""Tiny GGUF files written with the `gguf` package from tiny random transformers checkpoints, as llama.cpp's
convert_hf_to_gguf.py lays them out (names, llama Q/K row permutation, Gemma's stored 1 + w norms, tokenizer
metadata), with chosen tensors stored in quantized GGML types."""

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. def main(argv):\n    return sorted(set(argv))\n"
    "In 1905 Einstein published four papers; the third one, on special relativity, changed physics. "
    "Numbers: 3.14159, 2718, 42 and -7. user: what is the capital of France? assistant: Paris.\n"
) * 20
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm",
}
Q = GGMLQuantizationType
# Which GGML type each tensor gets: both kept types and a dequantized one appear in each file.
LLAMA_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q5_0}
GEMMA_TYPES = {"token_embd": Q.Q8_0, "attn_v": Q.Q8_0, "attn_q": Q.Q5_0, "ffn_gate": Q.Q4_1, "ffn_down": Q.F16}


def gguf_name(hf_name: str, architecture: str) -> str:
    stem, _, part = hf_name.rpartition(".")
    globals_ = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in globals_:
        return f"{globals_[stem]}.{part}"
    _, _, index, rest = stem.split(".", 3)
    names = dict(LAYER_NAMES)
    names["post_attention_layernorm"] = "ffn_norm" if architecture == "llama" else "post_attention_norm"
    return f"blk.{index}.{names[rest]}.{part}"


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (HF halves -> interleaved pairs)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def bpe_vocabulary(special: List[str]):
    """A small byte-level BPE (GPT-2 style, as SmolLM2's): tokens by id and merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    state = tokenizer.to_str()
    model = json.loads(state)["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
    return tokens, merges


def sentencepiece_vocabulary(special: List[str]):
    """A small sentencepiece-style vocabulary (Gemma style): specials, byte fallback pieces, scored pieces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=300, max_token_length=6)
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    pieces = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    tokens = special + byte_pieces + pieces
    scores = [0.0] * (len(special) + 256) + [-float(rank) for rank in range(len(pieces))]
    types = [TokenType.CONTROL] * len(special) + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
    types[special.index("<unk>")] = TokenType.UNKNOWN
    return tokens, scores, types


def write_tensor(writer: GGUFWriter, name: str, value: np.ndarray, kind: Q) -> None:
    if kind in (Q.F32, Q.F16):
        writer.add_tensor(name, value.astype(np.float32 if kind == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, quantize(value, kind), raw_dtype=kind)


def tensor_kind(name: str, types: Dict[str, Q]) -> Q:
    stem = name.rpartition(".")[0].split(".")[-1]
    return types.get(stem, Q.F32) if not name.endswith("norm.weight") else Q.F32


def write_common(writer: GGUFWriter, config, context: int) -> None:
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_llama(path: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF with a ChatML BPE tokenizer (tied embeddings, GQA, Q8_0/Q4_0/Q4_1/Q5_0/F32 tensors)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, merges = bpe_vocabulary(special)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        initializer_range=0.2, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    writer = GGUFWriter(str(path), "llama")
    write_common(writer, config, 512)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * len(special) + [TokenType.NORMAL] * (len(tokens) - len(special)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output tensor
        value = value.float().numpy()
        if name.endswith("norm.weight"):
            value = 1 + 0.3 * np.random.default_rng(len(name)).standard_normal(value.shape).astype(np.float32)
        if ".q_proj." in name:
            value = llama_permute(value, config.num_attention_heads)
        if ".k_proj." in name:
            value = llama_permute(value, config.num_key_value_heads)
        target = gguf_name(name, "llama")
        write_tensor(writer, target, value, tensor_kind(target, LLAMA_TYPES))
    finish(writer)
    return path


def write_gemma3(path: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """A tiny gemma3 GGUF: 7 layers (sliding, every 6th global), window 8, head_dim 256, sentencepiece vocabulary."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens, scores, types = sentencepiece_vocabulary(special)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, sliding_window=8, rms_norm_eps=1e-6, initializer_range=0.2,
        max_position_embeddings=512,
    )
    model = Gemma3ForCausalLM(config)
    writer = GGUFWriter(str(path), "gemma3")
    write_common(writer, config, 512)
    writer.add_key_length(256)
    writer.add_value_length(256)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(8)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(GEMMA_TEMPLATE)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        value = value.float().numpy()
        if name.endswith("norm.weight"):  # HF keeps w, llama.cpp stores 1 + w
            value = 1 + 0.3 * np.random.default_rng(len(name)).standard_normal(value.shape).astype(np.float32)
        target = gguf_name(name, "gemma3")
        write_tensor(writer, target, value, tensor_kind(target, GEMMA_TYPES))
    finish(writer)
    return path


def finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
