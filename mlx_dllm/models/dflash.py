"""DFlash block-diffusion drafter (z-lab v1, and the transformers Muse Glimmer assistant layout).

The drafter owns no embedding and no LM head: the target embeds the block `[anchor, mask x (B-1)]`
and its lm_head reads the drafter's output positions 1..B-1. Target layer outputs, fused once by
`fc` + `hidden_norm`, give every layer extra K/V rows placed before the block's own K/V.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3 import MLP  # the drafter's SwiGLU MLP is Qwen3's
from mlx_lm.models.rope_utils import initialize_rope

from ..errors import DLLMError
from ..kernels import attention, masked_attention, patterns
from .cache import WindowKVCache
from .ragged import RaggedKVCache
from .family import TINY_EOS_TOKEN_ID, TINY_MASK_TOKEN_ID, TINY_VOCAB, Family, Tiny

DRAFT_ARCHITECTURES = ("DFlashDraftModel", "MuseGlimmerAssistantModel")
LAYER_TYPES = ("full_attention", "sliding_attention")


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_id_list(values) -> bool:
    """A non-empty list of ids, each once."""
    return isinstance(values, list) and bool(values) and all(map(is_index, values)) and len(set(values)) == len(values)


def is_increasing(values) -> bool:
    """A non-empty list of ids in order (draft_vocab)."""
    return is_id_list(values) and all(a < b for a, b in zip(values, values[1:]))


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    architectures: List[str] = field(default_factory=lambda: ["DFlashDraftModel"])
    rms_norm_eps: float = 1e-6
    head_dim: Optional[int] = None
    attention_bias: bool = False
    rope_theta: Optional[float] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 40960
    layer_types: Optional[List[str]] = None
    sliding_window: Optional[int] = None
    is_causal: Optional[bool] = None
    vocab_size: Optional[int] = None  # the target's, when the config says (z-lab's do; Muse Glimmer's do not)
    num_target_layers: Optional[int] = None  # the target's layer count, likewise
    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None
    target_layer_ids: Optional[List[int]] = None
    # The tokens the drafter may propose (sorted ids), or None for all: a drafter trained with
    # `--loss-vocab seen` drafts with only those rows of the target's head (EAGLE-3's draft vocabulary).
    draft_vocab: Optional[List[int]] = None
    # Read as z-lab's reference reads them (top level or `dflash_config`): the block's embeddings are scaled
    # before the first layer; the drafter's logits are multiplied, then soft-capped (Gemma-style).
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: Optional[float] = None
    dflash_config: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        nested = self.dflash_config or {}
        for key in ("target_layer_ids", "mask_token_id", "block_size", "draft_vocab", "input_embedding_scale",
                    "output_multiplier", "final_logit_softcapping", "num_target_layers"):
            if nested.get(key) is not None:
                setattr(self, key, nested[key])
        if nested.get("causal") is not None:
            self.is_causal = nested["causal"]
        missing = [k for k in ("target_layer_ids", "mask_token_id", "block_size") if getattr(self, k) is None]
        if missing:
            raise DLLMError(f"DFlash config is missing {', '.join(missing)}")
        if not is_index(self.block_size) or self.block_size < 2:
            raise DLLMError(f"DFlash block_size must be at least 2, got {self.block_size!r}")
        # The drafter has no vocabulary of its own: its ids index the target's, whose size its config may give.
        below = "" if self.vocab_size is None else f" below vocab_size {self.vocab_size}"
        if not self.in_vocabulary(self.mask_token_id):
            raise DLLMError(f"DFlash config: mask_token_id must be a token id{below}, got {self.mask_token_id!r}")
        layer_ids, layers = self.target_layer_ids, self.num_target_layers
        # Any order: the features are concatenated in the config's order, as the reference does.
        if not is_id_list(layer_ids) or (layers is not None and max(layer_ids) >= layers):
            bound = "" if layers is None else f" below num_target_layers {layers}"
            raise DLLMError(f"DFlash config: target_layer_ids must be distinct layer ids{bound}, got {layer_ids!r}")
        vocab = self.draft_vocab
        if vocab is not None and not (is_increasing(vocab) and self.in_vocabulary(vocab[-1])):
            raise DLLMError(f"DFlash config: draft_vocab must be a non-empty, increasing list of token ids{below}")
        for key in ("input_embedding_scale", "output_multiplier", "final_logit_softcapping"):
            value = getattr(self, key)
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if value is not None and not (number and (key != "final_logit_softcapping" or value > 0)):
                raise DLLMError(f"DFlash config: {key} must be a finite number (a cap > 0), got {value!r}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.layer_types = self.layer_types or ["full_attention"] * self.num_hidden_layers
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise DLLMError("DFlash config: layer_types must have one entry per layer")
        unknown = [kind for kind in self.layer_types if kind not in LAYER_TYPES]
        if unknown:
            known = ", ".join(LAYER_TYPES)
            raise DLLMError(f"DFlash config: layer type {unknown[0]!r} is not supported (known: {known})")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise DLLMError("DFlash config: sliding_attention layers need sliding_window")
        rope = dict(self.rope_parameters or self.rope_scaling or {})
        if any(isinstance(value, dict) for value in rope.values()):  # one RoPE for every layer, never per layer type
            raise DLLMError(f"DFlash config: RoPE per layer type ({', '.join(rope)}) is not supported")
        self.rope_theta = self.rope_theta or rope.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        self.rope_scaling = rope if rope_type != "default" else None

    def in_vocabulary(self, token) -> bool:
        return is_index(token) and (self.vocab_size is None or token < self.vocab_size)

    @property
    def is_muse_glimmer(self) -> bool:
        return "MuseGlimmerAssistantModel" in (self.architectures or [])


def sliding_mask(query_positions: mx.array, key_positions: mx.array, window: int, causal: bool) -> mx.array:
    """Bool [..., Tq, Tk] mask of a sliding layer from absolute positions (leading axes broadcast)."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    if causal:
        return (distance >= 0) & (distance < window)
    return mx.abs(distance) <= window  # the Muse Glimmer (transformers) bidirectional window


@dataclass
class AnchorBlocks:
    """Training layout, passed where inference passes a cache: batch row j is the block anchored at absolute
    position `anchors[j]`, and it sees the context rows before its anchor and its own block, nothing else.
    All blocks of one sequence then go through the drafter in one forward."""

    anchors: mx.array  # [J] int32


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            self.head_dim,
            base=args.rope_theta,
            traditional=False,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        # z-lab/vLLM/SGLang: sliding draft layers are causal unless the config says otherwise.
        self.causal = not args.is_muse_glimmer and args.is_causal is not False

    def _heads(self, x: mx.array, n_heads: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _keys_values(self, x: mx.array, offset) -> tuple:
        """Normed, rotated keys and values of `x` (block or context: the same weights serve both)."""
        keys = self.rope(self.k_norm(self._heads(self.k_proj(x), self.n_kv_heads)), offset=offset)
        return keys, self._heads(self.v_proj(x), self.n_kv_heads)

    def _output(self, out: mx.array) -> mx.array:
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x: mx.array, context: mx.array, cache) -> mx.array:
        if isinstance(cache, AnchorBlocks):
            return self._anchor_blocks(x, context, cache.anchors)
        if isinstance(cache, RaggedKVCache):
            return self._ragged(x, context, cache)
        L, S = x.shape[1], context.shape[1]
        start = cache.offset  # absolute position of the first new context row
        queries = self.rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), offset=start + S)
        block_keys, block_values = self._keys_values(x, start + S)
        context_keys, context_values = self._keys_values(context, start)
        # Write-then-trim: the new context rows and the block land in the cache's buffer (the cache itself
        # is not copied), then the block is trimmed off: only context rows persist.
        keys, values = cache.update_and_fetch(
            mx.concatenate([context_keys, block_keys], axis=2), mx.concatenate([context_values, block_values], axis=2)
        )
        pattern = patterns.bidirectional()
        if self.window is not None:  # the keys are the cache's rows at positions offset - stored .. offset - 1
            key_start = cache.offset - keys.shape[2]
            pattern = patterns.window(self.window, self.causal, query_start=start + S, key_start=key_start)
        out = attention(queries, keys, values, self.scale, pattern)
        cache.trim(L)
        return self._output(out)

    def _anchor_blocks(self, x: mx.array, context: mx.array, anchors: mx.array) -> mx.array:
        """x [J, B, H] blocks, context [1, N, H] of the whole sequence; block j starts at `anchors[j]`."""
        J, L, _ = x.shape
        N = context.shape[1]
        queries = self.rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), offset=anchors)
        block_keys, block_values = self._keys_values(x, anchors)
        context_keys, context_values = self._keys_values(context, 0)
        context_shape = (J,) + context_keys.shape[1:]
        keys = mx.concatenate([mx.broadcast_to(context_keys, context_shape), block_keys], axis=2)
        values = mx.concatenate([mx.broadcast_to(context_values, context_shape), block_values], axis=2)
        query_positions = anchors[:, None] + mx.arange(L)  # [J, B]
        key_positions = mx.concatenate([mx.broadcast_to(mx.arange(N), (J, N)), query_positions], axis=1)
        visible = mx.concatenate([mx.arange(N)[None] < anchors[:, None], mx.ones((J, L), dtype=mx.bool_)], axis=1)
        mask = visible[:, None, :]  # [J, 1 (query), N + B]
        if self.window is not None:
            mask = mask & sliding_mask(query_positions, key_positions, self.window, self.causal)
        return self._output(masked_attention(queries, keys, values, self.scale, mask[:, None]))

    def _ragged(self, x: mx.array, context: mx.array, cache: RaggedKVCache) -> mx.array:
        """A batch of rows of their own lengths (sampler/batch.py): row b's new context rows are
        context[b, :cache.context_rows[b]] and its block x[b, :cache.block_rows[b]]; the rest is padding, which no
        real row sees. As one row's forward: the context rows stay in the cache, the block does not."""
        L = x.shape[1]
        start = cache.offset  # [B]: each row's first new context position
        block_start = start + mx.array(cache.context_rows)
        queries = self.rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), offset=block_start)
        block_keys, block_values = self._keys_values(x, block_start)
        cache.write(*self._keys_values(context, start))
        cache.advance(cache.context_rows)
        keys, values = cache.write(block_keys, block_values)  # after each row's context, where the next one goes
        query_positions = cache.offset[:, None] + mx.arange(L)  # [B, L]; a key's position is its index
        key_positions = mx.broadcast_to(mx.arange(keys.shape[2]), (x.shape[0], keys.shape[2]))
        mask = key_positions[:, None, :] < (cache.offset + mx.array(cache.block_rows))[:, None, None]
        if self.window is not None:
            mask = mask & sliding_mask(query_positions, key_positions, self.window, self.causal)
        return self._output(masked_attention(queries, keys, values, self.scale, mask[:, None]))

    def make_cache(self):
        if self.window is None:
            return KVCache()
        # A causal window needs window-1 earlier rows; the bidirectional one needs window.
        return WindowKVCache(self.window if self.causal else self.window + 1)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, context: mx.array, cache) -> mx.array:
        # The context is already normalised by hidden_norm: it skips input_layernorm.
        h = x + self.self_attn(self.input_layernorm(x), context, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    """The drafter. `__call__` maps block embeddings + new target features to normalised hidden states."""

    modes = {"dflash": "dflash"}  # mode -> its strategy file in sampler/
    default_mode = "dflash"
    layer_class = DecoderLayer  # DFlash2 (models/dflash2.py) wraps its attention and MLP in convolutions

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = "dflash"
        feature_size = len(args.target_layer_ids) * args.hidden_size
        self.fc = nn.Linear(feature_size, args.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.layers = [self.layer_class(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, block_embeddings: mx.array, target_features: mx.array, cache, start: int = 0) -> mx.array:
        """block_embeddings [1, B, H]; target_features [1, S, K*H] for context rows not yet cached.
        (Training passes `AnchorBlocks` as the cache: [J, B, H] blocks over a whole sequence's [1, N, K*H].)

        Returns the final-normed hidden states of block positions `start..B-1`.
        """
        context = self.hidden_norm(self.fc(target_features))
        scale = self.args.input_embedding_scale
        h = block_embeddings if scale == 1.0 else block_embeddings * scale
        caches = [cache] * len(self.layers) if isinstance(cache, AnchorBlocks) else cache
        for layer, layer_cache in zip(self.layers, caches):
            h = layer(h, context, layer_cache)
        return self.norm(h[:, start:])

    # The drafter interface (models/drafter.py), read from the config.
    block_size = property(lambda self: self.args.block_size)
    mask_token_id = property(lambda self: self.args.mask_token_id)
    target_layer_ids = property(lambda self: self.args.target_layer_ids)
    hidden_size = property(lambda self: self.args.hidden_size)
    draft_vocab = property(lambda self: self.args.draft_vocab)

    def make_cache(self) -> List:
        return [layer.self_attn.make_cache() for layer in self.layers]

    def logits(self, head_logits: mx.array) -> mx.array:
        """The drafter's logits from the target head's output on its hidden states (z-lab's `compute_logits`)."""
        if self.args.output_multiplier != 1.0:
            head_logits = head_logits * self.args.output_multiplier
        cap = self.args.final_logit_softcapping
        return head_logits if not cap else mx.tanh(head_logits / cap) * cap

    @staticmethod
    def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        renames = (("encoder.fc.", "fc."), ("encoder.output_norm_enc.", "hidden_norm."))
        sanitized = {}
        for name, value in weights.items():
            if "rotary_emb" in name:
                continue
            name = name.removeprefix("model.")
            for old, new in renames:
                if name.startswith(old):
                    name = new + name[len(old) :]
            sanitized[name] = value
        return sanitized


FAMILY = Family(
    name="dflash",
    architectures=DRAFT_ARCHITECTURES,
    config_key="dflash_config",  # never a model_type: z-lab's drafters carry their target's (qwen3, gpt_oss)
    tiny=Tiny(
        config={
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
            "mask_token_id": TINY_MASK_TOKEN_ID,
            "target_layer_ids": [0, 1, 2],
        },
        target={
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": TINY_VOCAB,
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
            "eos_token_id": TINY_EOS_TOKEN_ID,
        },
    ),
)
