"""Nemotron-Labs-Diffusion: a Ministral3 decoder (`encoder`) with an untied `diffusion_head`, three ways.

Every forward states its attention pattern and cache policy:
- `causal` (AR decoding, prefill, verify, commit): lower-right causal over cache + new tokens, K/V written;
- `bidirectional` (denoise, draft): the new tokens see the whole cache and all of themselves, nothing written;
- a boolean mask with per-row positions (the quadratic self-speculation layout), K/V written.
Causal logits at position i predict token i+1; bidirectional logits at position i predict token i.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache
from mlx_lm.models.ministral3 import MLP, _get_llama_4_attn_scale
from mlx_lm.models.rope_utils import initialize_rope

from ..checkpoint_files import dtype_name
from ..errors import DLLMError
from ..kernels import attention, patterns
from .dtypes import compute_dtype
from .family import TINY_EOS_TOKEN_ID, TINY_MASK_TOKEN_ID, TINY_VOCAB, Family, Tiny

Pattern = Union[str, patterns.Pattern]  # "causal", "bidirectional", or a kernels pattern (the quadratic layout)
LORA_MODULE = "encoder.layers.{}.self_attn.o_proj"  # what the linear-spec drafter's LoRA adapts, in every layer


def attention_pattern(pattern: Pattern, queries: int, keys: int) -> patterns.Pattern:
    """The kernels pattern of `queries` new rows over `keys` (the cache, then themselves)."""
    if isinstance(pattern, patterns.Pattern):
        return pattern
    return patterns.bidirectional() if pattern == "bidirectional" else patterns.causal(keys - queries)


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    head_dim: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    rope_theta: Optional[float] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    mask_token_id: int = 100
    block_size: int = 32
    model_type: str = "nemotron_labs_diffusion"
    generation_config: Optional[Dict[str, Any]] = None  # filled in by the loader

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        # head_dim is explicit in these checkpoints (14B: 128, not hidden / heads).
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        rope = dict(self.rope_parameters or self.rope_scaling or {})
        rope.setdefault("rope_theta", self.rope_theta or 1e6)
        rope.setdefault("llama_4_scaling_beta", 0.0)
        rope.setdefault("original_max_position_embeddings", self.max_position_embeddings or 1)
        self.rope_parameters = rope
        # The default block length of every mode, which refuses blocks under 2 (sampler/blocks.py): refuse it here.
        block = self.block_size
        if isinstance(block, bool) or not isinstance(block, int) or block < 2:
            raise DLLMError(f"Nemotron-Labs-Diffusion block_size must be an integer of at least 2, got {block!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DLLMError(f"mask_token_id {self.mask_token_id} is outside the vocabulary of {self.vocab_size}")


class LoRA(nn.Module):
    """A PEFT LoRA on one projection: `delta(x) = scale * x @ A.T @ B.T`, added only when asked for."""

    def __init__(self, lora_a: mx.array, lora_b: mx.array, scale: float):
        super().__init__()
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale

    def __call__(self, x: mx.array) -> mx.array:
        return self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        H = args.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        rope = args.rope_parameters
        self.rope = initialize_rope(self.head_dim, rope["rope_theta"], False, rope, args.max_position_embeddings)
        self.q_scale_beta = rope["llama_4_scaling_beta"]
        self.q_scale_period = rope["original_max_position_embeddings"]
        self.lora: Optional[LoRA] = None

    def _rope(self, x: mx.array, offset, rows: Optional[int]) -> mx.array:
        """RoPE at `offset + arange(L)`, or, with `rows`, per row of a [rows x L/rows] layout from row offsets."""
        if rows is None:
            return self.rope(x, offset=offset)
        B, H, L, D = x.shape
        per_row = x.reshape(H, rows, L // rows, D).transpose(1, 0, 2, 3)
        return self.rope(per_row, offset=offset).transpose(1, 0, 2, 3).reshape(B, H, L, D)

    def _query_scale(self, L: int, offset, rows: Optional[int]) -> mx.array:
        """Llama-4 query temperature from true positions (1.0 below the original context)."""
        if rows is None:
            return _get_llama_4_attn_scale(L, offset, self.q_scale_beta, self.q_scale_period)
        scale = _get_llama_4_attn_scale(L // rows, offset, self.q_scale_beta, self.q_scale_period)
        return scale.reshape(1, 1, L, 1)

    def __call__(self, x, cache, pattern: Pattern, write_cache: bool, row_offsets=None, lora: bool = False):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        rows = None if row_offsets is None else row_offsets.shape[0]
        offset = cache.offset if row_offsets is None else row_offsets
        q, k = self._rope(q, offset, rows), self._rope(k, offset, rows)
        q = q * self._query_scale(L, offset, rows).astype(q.dtype)
        # Write-then-trim (mlx-lm's idiom): the block lands in the cache's preallocated buffer, so attention
        # reads a slice of it instead of a concatenated copy of the whole cache; trim then forgets the block.
        k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, attention_pattern(pattern, L, k.shape[2]))
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if not write_cache:
            cache.trim(L)
        projected = self.o_proj(out)
        if lora and self.lora is not None:
            projected = projected + self.lora(out)
        return projected


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, cache, pattern, write_cache, row_offsets=None, lora=False):
        h = x + self.self_attn(self.input_layernorm(x), cache, pattern, write_cache, row_offsets, lora)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    # mode -> its strategy file in sampler/; diffusion is confidence unmasking, not DiffusionGemma's uniform noise
    modes = {"ar": "ar", "diffusion": "mask_diffusion", "linear-spec": "linear_spec",
             "quadratic-spec": "quadratic_spec"}
    default_mode = "linear-spec"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.encoder = Backbone(args)
        self.diffusion_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.encoder.layers

    @property
    def has_lora(self) -> bool:
        return self.layers[0].self_attn.lora is not None

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[List] = None,
        pattern: Pattern = "causal",
        write_cache: bool = True,
        row_offsets: Optional[mx.array] = None,
        lora: bool = False,
        head: bool = True,
    ) -> mx.array:
        """Logits for `inputs` [1, L] (final-normed hidden states with `head=False`, to apply the head to
        chosen rows only). The default (causal, writing) is mlx-lm's AR call."""
        cache = cache if cache is not None else self.make_cache()
        h = self.encoder.embed_tokens(inputs)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, pattern, write_cache, row_offsets, lora)
        h = self.encoder.norm(h)
        return self.diffusion_head(h) if head else h

    def make_cache(self) -> List:
        return [KVCache() for _ in self.layers]

    def load_lora(self, folder: Union[str, Path]) -> None:
        """Attach a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, o_proj only)."""
        folder = Path(folder)
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.exists() or not weights_file.exists():
            raise DLLMError(f"no LoRA adapter in {folder} (expected adapter_config.json and adapter_model.safetensors)")
        rank, alpha = read_lora_config(config_file)
        try:
            weights = mx.load(str(weights_file))
        except (RuntimeError, ValueError, OSError) as error:
            raise DLLMError(f"cannot read the LoRA weights {weights_file}: {error}") from None
        adapters = []
        for index, layer in enumerate(self.layers):
            self_attn = layer.self_attn
            lora_a, lora_b = lora_pair(weights, LORA_MODULE.format(index), folder)
            integer = [dtype_name(t.dtype) for t in (lora_a, lora_b) if not mx.issubdtype(t.dtype, mx.floating)]
            if integer:  # cast below, an integer label would turn the adapter into garbage
                raise DLLMError(f"the LoRA adapter in {folder}: layer {index} holds {integer[0]} tensors, not floats")
            expected_a = (rank, self_attn.n_heads * self_attn.head_dim)
            expected_b = (self.args.hidden_size, rank)
            if lora_a.shape != expected_a or lora_b.shape != expected_b:
                raise DLLMError(
                    f"the LoRA adapter in {folder}: layer {index} has A {lora_a.shape} and B {lora_b.shape}, "
                    f"expected {expected_a} and {expected_b} (r={rank})"
                )
            dtype = compute_dtype(self_attn.o_proj)  # an fp32 adapter must not promote a bf16 or quantized model
            adapters.append(LoRA(lora_a.astype(dtype), lora_b.astype(dtype), alpha / rank))
        for layer, adapter in zip(self.layers, adapters):  # all or nothing
            layer.self_attn.lora = adapter

    @staticmethod
    def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        return {k: v for k, v in weights.items() if "rotary_emb" not in k}


def read_lora_config(config_file: Path):
    """(r, lora_alpha) of a PEFT adapter_config.json that targets o_proj only."""
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError) as error:
        raise DLLMError(f"{config_file} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise DLLMError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    targets = config.get("target_modules") or []
    if not isinstance(targets, list) or set(targets) != {"o_proj"}:
        raise DLLMError(f"LoRA targets {targets!r} are not supported (only o_proj)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DLLMError(f"{config_file}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise DLLMError(f"{config_file}: lora_alpha must be a positive number, got {alpha!r}")
    return rank, alpha


def lora_pair(weights: Dict[str, mx.array], stem: str, folder: Path):
    """The one A and one B tensor of `stem`, whatever prefix PEFT put before it."""
    found = [[v for k, v in weights.items() if k.endswith(f"{stem}.lora_{part}.weight")] for part in "AB"]
    if len(found[0]) != 1 or len(found[1]) != 1:
        raise DLLMError(f"the LoRA adapter in {folder} lacks {stem}.lora_A/lora_B")
    return found[0][0], found[1][0]


FAMILY = Family(
    name="nemotron",
    architectures=("NemotronLabsDiffusionModel",),
    model_types=("nemotron_labs_diffusion",),
    tiny=Tiny(
        config={
            "model_type": "nemotron_labs_diffusion",
            "architectures": ["NemotronLabsDiffusionModel"],
            "vocab_size": TINY_VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "mask_token_id": TINY_MASK_TOKEN_ID,
            "block_size": 8,
            "eos_token_id": TINY_EOS_TOKEN_ID,
        },
        lora=LORA_MODULE,
    ),
)
