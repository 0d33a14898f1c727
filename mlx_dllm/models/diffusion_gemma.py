"""DiffusionGemma (transformers `DiffusionGemmaForBlockDiffusion`): one Gemma-4 MoE text stack, two modes.

`encode` runs the stack causally and writes the KV cache (the prompt, then each committed canvas).
`denoise` runs the same layers bidirectionally over `[cached prefix ; canvas]`, reads the cache and never
writes it, and returns float32 softcapped logits. The only state carried between denoising steps is the
canvas and the self-conditioning logits.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import Router as Gemma4Router
from mlx_lm.models.gemma4_text import geglu, logit_softcap
from mlx_lm.models.rope_utils import ProportionalRoPE
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from ..errors import DLLMError
from ..kernels import attention, patterns
from .cache import WindowKVCache
from .family import TINY_EOS_TOKEN_ID, TINY_VOCAB, Family, Tiny

# 16x the released 256: one canvas is one forward whose float32 logits are canvas x vocab (4 GiB at 262k).
MAX_CANVAS_LENGTH = 4096
SORT_EXPERTS_FROM = 64  # routed (token, expert) pairs; mlx-lm's SwitchGLU threshold

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
LAYER_TYPES = tuple(DEFAULT_ROPE)
ROPE_TYPES = ("default", "proportional")


def rope_per_layer_type(parameters: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """rope_parameters as transformers reads them, one RoPE per layer type (the defaults for a type it omits); a flat
    one or an unknown rope_type would otherwise be silently replaced by the defaults."""
    parameters = parameters or {}
    if not set(parameters) <= set(LAYER_TYPES) or not all(isinstance(rope, dict) for rope in parameters.values()):
        raise DLLMError(
            f"DiffusionGemma text_config: rope_parameters must hold one RoPE per layer type "
            f"({', '.join(LAYER_TYPES)}), got {parameters!r}"
        )
    parameters = {**DEFAULT_ROPE, **parameters}
    for layer_type, rope in parameters.items():
        rope_type, theta = rope.get("rope_type", "default"), rope.get("rope_theta")
        if rope_type not in ROPE_TYPES:
            known = ", ".join(ROPE_TYPES)
            raise DLLMError(f"DiffusionGemma: rope_type {rope_type!r} is not supported (known: {known})")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            raise DLLMError(f"DiffusionGemma: the {layer_type} RoPE needs a positive rope_theta, got {theta!r}")
        factor = rope.get("partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise DLLMError(f"DiffusionGemma: partial_rotary_factor must be in (0, 1], got {factor!r}")
    return parameters


@dataclass
class TextArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: Optional[List[str]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    per_layer_config: Optional[Dict[str, Dict[str, int]]] = None
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    final_logit_softcapping: Optional[float] = 30.0
    use_bidirectional_attention: Optional[str] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False

    def __post_init__(self):
        missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if getattr(self, k) is None]
        if missing:
            raise DLLMError(f"DiffusionGemma text_config is missing the expert fields {', '.join(missing)}")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise DLLMError(
                f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
                "(only None or 'vision': the released encoder is causal over text)"
            )
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise DLLMError(f"hidden_activation {self.hidden_activation!r} is not supported")
        if self.attention_bias:
            raise DLLMError("attention_bias=true is not supported by DiffusionGemma")
        if self.layer_types is None:
            # transformers' default: every sixth layer is full, and the last layer always is.
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
            self.layer_types[-1] = "full_attention"
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise DLLMError("DiffusionGemma text_config: layer_types must have one entry per layer")
        unknown = [kind for kind in self.layer_types if kind not in LAYER_TYPES]
        if unknown:
            known = ", ".join(LAYER_TYPES)
            raise DLLMError(f"DiffusionGemma text_config: layer type {unknown[0]!r} is not supported (known: {known})")
        self.rope_parameters = rope_per_layer_type(self.rope_parameters)
        self.final_logit_softcapping = self.final_logit_softcapping or 30.0
        self.num_global_key_value_heads = self.num_global_key_value_heads or self.num_key_value_heads

    def attention_shape(self, layer: int):
        """(head_dim, kv_heads) of a layer: `per_layer_config` overrides the base values (a layer it omits,
        or an empty one, keeps them, as in transformers); legacy configs without it give full layers the
        global values."""
        if self.per_layer_config is not None:
            override = {int(k): v for k, v in self.per_layer_config.items()}.get(layer, {})
            kv_heads = override.get("num_key_value_heads", self.num_key_value_heads)
            return override.get("head_dim", self.head_dim), kv_heads
        if self.layer_types[layer] == "sliding_attention":
            return self.head_dim, self.num_key_value_heads
        return self.global_head_dim, self.num_global_key_value_heads


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: Optional[Dict[str, Any]] = None
    model_type: str = "diffusion_gemma"
    canvas_length: int = 256
    generation_config: Optional[Dict[str, Any]] = None  # generation_config.json, filled in by the loader
    text: TextArgs = field(init=False)

    def __post_init__(self):
        if not isinstance(self.text_config, dict):
            raise DLLMError(f"DiffusionGemma config.json needs a text_config object, got {self.text_config!r}")
        self.text = TextArgs.from_dict(self.text_config)
        canvas = self.canvas_length
        if not isinstance(canvas, int) or isinstance(canvas, bool) or not 1 <= canvas <= MAX_CANVAS_LENGTH:
            raise DLLMError(f"canvas_length must be an integer from 1 to {MAX_CANVAS_LENGTH}, got {canvas!r}")


def rms_norm_no_scale(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


def make_rope(head_dim: int, parameters: Dict[str, Any]):
    """The RoPE of one layer type (`rope_per_layer_type` checked its parameters)."""
    if parameters.get("rope_type", "default") == "default":
        return nn.RoPE(head_dim, traditional=False, base=parameters["rope_theta"])
    # proportional: transformers rotates int(factor * head_dim // 2) frequency pairs; the rest stay fixed.
    pairs = int(parameters.get("partial_rotary_factor", 1.0) * head_dim // 2)
    return ProportionalRoPE(head_dim, 2 * pairs, base=parameters["rope_theta"], factor=parameters.get("factor", 1.0))


class Attention(nn.Module):
    def __init__(self, args: TextArgs, layer: int):
        super().__init__()
        layer_type = args.layer_types[layer]
        self.head_dim, self.n_kv_heads = args.attention_shape(layer)
        self.n_heads = args.num_attention_heads
        self.eps = args.rms_norm_eps
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        H = args.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        if self.window is not None:  # full layers use K=V: values come from k_proj
            self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.rope = make_rope(self.head_dim, args.rope_parameters[layer_type])

    def _heads(self, x: mx.array, n_heads: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n_heads, self.head_dim)

    def __call__(self, x: mx.array, cache, write_cache: bool) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset
        queries = self.rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)).transpose(0, 2, 1, 3), offset)
        raw_keys = self._heads(self.k_proj(x), self.n_kv_heads)
        values = self._heads(self.v_proj(x), self.n_kv_heads) if "v_proj" in self else raw_keys
        keys = self.rope(self.k_norm(raw_keys).transpose(0, 2, 1, 3), offset)
        values = rms_norm_no_scale(values, self.eps).transpose(0, 2, 1, 3)
        if write_cache:  # encoder: causal (and windowed on sliding layers), appends to the cache
            pattern = patterns.causal(cache.offset) if self.window is None else cache.causal_pattern()
            keys, values = cache.update_and_fetch(keys, values)
            out = attention(queries, keys, values, 1.0, pattern)
        elif self.window is None:  # denoiser: the canvas sees the cached prefix and all of itself
            # Write-then-trim: the canvas lands in the preallocated buffer (no copy of the cache), then is forgotten.
            keys, values = cache.update_and_fetch(keys, values)
            out = attention(queries, keys, values, 1.0, patterns.bidirectional())
            cache.trim(L)
        elif cache.offset == 0:
            out = attention(queries, keys, values, 1.0, patterns.bidirectional())
        else:  # a sliding layer sees the last window-1 committed rows, read in place, then the canvas
            past_keys, past_values = (part[..., -(self.window - 1) :, :] for part in cache.keys_and_values())
            out = attention(queries, past_keys, past_values, 1.0, patterns.bidirectional(), keys, values)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def make_cache(self):
        return KVCache() if self.window is None else WindowKVCache(self.window)


class MLP(nn.Module):
    """GeGLU (gelu-tanh gate), used by the dense branch and by self-conditioning."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Router(Gemma4Router):
    """mlx-lm's Gemma-4 router, with transformers' float32 routing weights ("for numerical stability")."""

    def __call__(self, x: mx.array):
        scores = self.proj(mx.fast.rms_norm(x, self.scale * self._root_size, self.eps))
        k = self.config.top_k_experts
        indices = mx.stop_gradient(mx.argpartition(scores, kth=-k, axis=-1)[..., -k:])
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1).astype(mx.float32), axis=-1)
        return indices, weights * self.per_expert_scale[indices].astype(mx.float32)


def gather_linear(layer: nn.Module, x: mx.array, indices: mx.array, sort: bool) -> mx.array:
    """A (quantized) SwitchLinear; on the CPU a bf16/fp16 one runs in float32 and rounds back, since
    MLX's CPU GatherMM is float32-only (Metal, and gather_qmm everywhere, keep the model's dtype)."""
    if isinstance(layer, SwitchLinear) and x.dtype != mx.float32 and mx.default_device() == mx.cpu:
        weight = layer.weight.swapaxes(-1, -2).astype(mx.float32)
        out = mx.gather_mm(x.astype(mx.float32), weight, rhs_indices=indices, sorted_indices=sort)
        return out.astype(x.dtype)
    return layer(x, indices, sorted_indices=sort)


class Experts(nn.Module):
    """Top-k experts as gather matmuls; `gate_up_proj` is [E, 2I, H] with the gate rows first (HF layout)."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.intermediate = args.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(args.hidden_size, 2 * self.intermediate, args.num_experts, bias=False)
        self.down_proj = SwitchLinear(self.intermediate, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        # As mlx-lm's SwitchGLU: many rows go through the gathers sorted by expert (Metal's sorted kernels).
        sort = indices.size >= SORT_EXPERTS_FROM
        expert_ids, inverse = indices, None
        if sort:
            x, expert_ids, inverse = _gather_sort(x, indices)
        gate_up = gather_linear(self.gate_up_proj, x, expert_ids, sort)
        hidden = geglu(gate_up[..., : self.intermediate], gate_up[..., self.intermediate :])
        out = gather_linear(self.down_proj, hidden, expert_ids, sort)
        if sort:
            out = _scatter_unsort(out, inverse, indices.shape)
        # Weighted and summed in float32 (the weights are), rounded once to the model's dtype.
        return (out.squeeze(-2) * weights[..., None]).sum(axis=-2).astype(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, nn.RMSNorm(H, eps=eps))
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, cache, write_cache: bool, layer_scalar: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache, write_cache))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        indices, weights = self.router(h)  # routed on the raw residual, not a normalised one
        sparse = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(h), indices, weights))
        return (h + self.post_feedforward_layernorm(dense + sparse)) * layer_scalar


class SelfConditioning(MLP):
    """The previous step's soft embeddings -> pre_norm -> GeGLU, added to the canvas embeddings."""

    def __init__(self, args: TextArgs):
        super().__init__(args.hidden_size, args.intermediate_size)
        self.eps = args.rms_norm_eps
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=self.eps)

    def __call__(self, embeddings: mx.array, soft_embeddings: Optional[mx.array]) -> mx.array:
        if soft_embeddings is not None:
            embeddings = embeddings + super().__call__(self.pre_norm(soft_embeddings))
        return rms_norm_no_scale(embeddings, self.eps)  # also on the first step, without a signal


class Decoder(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class LayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderText(nn.Module):
    """The encoder's own text tensors: only its layer scalars (everything else is tied to the decoder)."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.layers = [LayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.language_model = EncoderText(args)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)


class Model(nn.Module):
    modes = {"diffusion": "diffusion"}  # mode -> its strategy file in sampler/
    default_mode = "diffusion"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.text = args.text
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args.text)

    @property
    def layers(self):
        return self.model.decoder.layers

    @property
    def canvas_length(self) -> int:
        return self.args.canvas_length

    @property
    def embedding_dtype(self):
        table = self.model.decoder.embed_tokens
        return table.scales.dtype if isinstance(table, nn.QuantizedEmbedding) else table.weight.dtype

    def _embed_scale(self, dtype) -> mx.array:
        # transformers rounds sqrt(H) to the weight dtype (53.0 in bf16, not 53.07).
        return mx.array(math.sqrt(self.text.hidden_size)).astype(dtype)

    def embed(self, ids: mx.array) -> mx.array:
        embeddings = self.model.decoder.embed_tokens(ids)
        return embeddings * self._embed_scale(embeddings.dtype)

    def soft_embed(self, logits: mx.array, dtype) -> mx.array:
        """softmax(logits) @ E * sqrt(H): one (quantized) matmul with the embedding table."""
        probs = mx.softmax(logits.astype(mx.float32), axis=-1).astype(dtype)
        table = self.model.decoder.embed_tokens
        if isinstance(table, nn.QuantizedEmbedding):
            soft = mx.quantized_matmul(
                probs,
                table.weight,
                table.scales,
                table.biases,
                transpose=False,
                group_size=table.group_size,
                bits=table.bits,
                mode=table.mode,
            )
        else:
            soft = probs @ table.weight
        return soft * self._embed_scale(dtype)

    def make_cache(self) -> List:
        return [layer.self_attn.make_cache() for layer in self.layers]

    def encode(self, ids: mx.array, cache: List) -> mx.array:
        """Run `ids` [B, L] causally at positions after the cache, writing their K/V; returns hidden states."""
        h = self.embed(ids)
        scalars = self.model.encoder.language_model.layers
        for layer, scalar, layer_cache in zip(self.layers, scalars, cache):
            h = layer(h, layer_cache, True, scalar.layer_scalar)
        return h

    def denoise(self, canvas: mx.array, cache: List, self_conditioning_logits: Optional[mx.array] = None) -> mx.array:
        """Float32 softcapped logits [B, L, V] for `canvas`, conditioned on the cache, which is not written."""
        h = self.embed(canvas)
        soft = None if self_conditioning_logits is None else self.soft_embed(self_conditioning_logits, h.dtype)
        h = self.model.decoder.self_conditioning(h, soft)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, False, layer.layer_scalar)
        logits = self.model.decoder.embed_tokens.as_linear(self.model.decoder.norm(h)).astype(mx.float32)
        return logit_softcap(self.text.final_logit_softcapping, logits)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """HF names -> ours (the mlx-vlm layout of the mlx-community conversions); vision weights are set aside."""
        sanitized = {}
        for name, value in weights.items():
            if "rotary_emb" in name or name == "lm_head.weight" or name.startswith(VISION_PREFIXES):
                continue
            if name.startswith("model.encoder.language_model.") and not name.endswith(".layer_scalar"):
                continue  # tied to the decoder
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                name += ".weight"
            sanitized[name] = value
        return sanitized


VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


FAMILY = Family(
    name="diffusion-gemma",
    architectures=("DiffusionGemmaForBlockDiffusion",),
    model_types=("diffusion_gemma",),
    tiny=Tiny(
        config={
            "model_type": "diffusion_gemma",
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "canvas_length": 8,
            "text_config": {
                "vocab_size": TINY_VOCAB,
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
                "eos_token_id": TINY_EOS_TOKEN_ID,
            },
            "eos_token_id": TINY_EOS_TOKEN_ID,
        }
    ),
)
