"""Adapter over mlx-lm autoregressive models: layer-output capture, embed/lm_head, caches that roll back."""

import threading
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from ..kernels.patterns import Pattern
from .positioned import positioned
from .rollback import SpeculativeCache, speculative_cache


class _RecordingLayer:
    """Stands in for one decoder layer in its model's `layers` list during one target forward."""

    def __init__(self, layer: nn.Module, outputs: Dict[int, mx.array], layer_id: int):
        self._layer, self._outputs, self._layer_id = layer, outputs, layer_id

    def __call__(self, *args, **kwargs):
        out = self._layer(*args, **kwargs)
        self._outputs[self._layer_id] = out[0] if isinstance(out, tuple) else out
        return out

    def __getattr__(self, name):
        return getattr(self._layer, name)  # e.g. llama's `use_sliding`, read by its model loop


# One capture at a time: a forward from another thread waits instead of seeing a half-swapped list.
_CAPTURE_LOCK = threading.Lock()


@contextmanager
def recording_layers(layers: List, layer_ids: Sequence[int], outputs: Dict[int, mx.array]):
    """Put recorders in `layers` for the duration of one forward (which only builds the graph), then
    give the list its own layers back: no state outlives the call, so generators can share a model."""
    originals = {layer_id: layers[layer_id] for layer_id in layer_ids}
    with _CAPTURE_LOCK:
        try:
            for layer_id, layer in originals.items():
                layers[layer_id] = _RecordingLayer(layer, outputs, layer_id)
            yield
        finally:
            for layer_id, layer in originals.items():
                layers[layer_id] = layer


# Where mlx-lm families keep the backbone, its embedding table and its final norm (nemotron_h: `backbone`,
# `embeddings`, `norm_f`; lfm2 names its final norm `embedding_norm`).
BACKBONE_PATHS = ("model", "language_model.model", "language_model", "backbone")
EMBEDDING_NAMES = ("embed_tokens", "embeddings")
FINAL_NORM_NAMES = ("norm", "norm_f", "embedding_norm")


def _find_backbone(model: nn.Module) -> Optional[nn.Module]:
    for path in BACKBONE_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None) if isinstance(module, nn.Module) else None
        if isinstance(module, nn.Module) and _child(module, EMBEDDING_NAMES) is not None:
            return module
    return None


def _child(module: nn.Module, names) -> Optional[nn.Module]:
    found = [module[name] for name in names if isinstance(module.get(name), nn.Module)]
    return found[0] if found else None


class Target:
    """An mlx-lm model seen as a DFlash target.

    `capture_layer_ids` are 0-based decoder layers whose outputs are concatenated, in the given order,
    into the features the drafter reads: the residual stream, and for the last layer the final-normed
    one (transformers' and z-lab's `hidden_states[layer_id + 1]`).
    """

    def __init__(self, model: nn.Module, capture_layer_ids: Sequence[int] = ()):
        self.model = model
        self.family = getattr(model, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
        backbone = _find_backbone(model)
        layers = getattr(model, "layers", None)
        missing = []
        if backbone is None:
            missing.append("an embedding table (`embed_tokens` or `embeddings`) under its backbone")
        if not isinstance(layers, list) or not layers:
            missing.append("a `layers` list")
        if missing:
            raise DLLMError(f"target family '{self.family}' is not supported: it lacks {' and '.join(missing)}")
        self.embed_tokens = _child(backbone, EMBEDDING_NAMES)
        # Gemma-style targets scale their embeddings inside the forward; the drafter's block must see the same.
        self.embed_scale = getattr(backbone, "embed_scale", None)
        self.layers = layers
        # The list the backbone loops over (qwen3_moe's `model.layers` is a fresh slice of it).
        self._running_layers = backbone.layers if isinstance(getattr(backbone, "layers", None), list) else layers
        language_model = getattr(model, "language_model", None)
        self._lm_head = getattr(model, "lm_head", None)
        if self._lm_head is None and language_model is not None:
            self._lm_head = getattr(language_model, "lm_head", None)  # VLM layouts (qwen3_5, gemma4)
        self.num_layers = len(layers)
        self.capture_layer_ids = list(capture_layer_ids)
        outside = [i for i in self.capture_layer_ids if not 0 <= i < self.num_layers]
        if outside:
            raise DLLMError(f"target layer id {outside[0]} is outside the target's {self.num_layers} layers")
        self._final_norm = _child(backbone, FINAL_NORM_NAMES)
        if self.num_layers - 1 in self.capture_layer_ids and self._final_norm is None:
            raise DLLMError(f"target '{self.family}' has no final norm for its last layer's features")
        self.make_cache()  # fail early on caches that cannot roll back

    @property
    def final_norm(self) -> Optional[nn.Module]:
        return self._final_norm

    @property
    def head_module(self) -> nn.Module:
        """The module holding the LM head's rows: `lm_head`, or the tied embedding table."""
        return self._lm_head if self._lm_head is not None else self.embed_tokens

    def head_rows(self, tokens: Sequence[int]):
        """(weight [len(tokens), H], bias or None): the LM head's rows for `tokens`, dequantized, in the head's
        compute dtype; `hidden @ weight.T (+ bias)` equals `lm_head(hidden)[..., tokens]`."""
        module = self.head_module
        index = mx.array(list(tokens), dtype=mx.int32)
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            biases = module.biases[index] if getattr(module, "biases", None) is not None else None
            weight = mx.dequantize(module.weight[index], module.scales[index], biases, module.group_size,
                                   module.bits, mode=getattr(module, "mode", "affine")).astype(module.scales.dtype)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight[index]
        else:
            raise DLLMError(f"target '{self.family}': a head of type {type(module).__name__} has no rows to take")
        return weight, module.bias[index] if "bias" in module else None

    def embed(self, ids: mx.array) -> mx.array:
        embeddings = self.embed_tokens(ids)
        return embeddings if self.embed_scale is None else embeddings * self.embed_scale

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self._lm_head is not None:
            return self._lm_head(hidden)
        return self.embed_tokens.as_linear(hidden)

    def __call__(
        self, ids: mx.array, cache: List, pattern: Optional[Pattern] = None, positions: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """(logits, features) for `ids` [1, N]: the features concatenate the captured layers' outputs (None
        without any). With a `pattern` and `positions` (a tree verify), row k sits at positions[k] and sees what
        the pattern says. A marked `SpeculativeCache` records what its recurrent layers need to roll back."""
        outputs = {}
        recording = cache.recording() if isinstance(cache, SpeculativeCache) else nullcontext()
        placed = positioned(self.model, cache, pattern, positions) if pattern is not None else nullcontext()
        # Placed first: it finds the attention modules before the layers are wrapped for capture.
        with placed, recording_layers(self._running_layers, set(self.capture_layer_ids), outputs), recording:
            logits = self.model(ids, cache=cache)
        unseen = [i for i in self.capture_layer_ids if i not in outputs]
        if unseen:
            raise DLLMError(f"target '{self.family}' did not run layer {unseen[0]} from its `layers` list")
        return logits, self._concatenate_features(outputs)

    def _concatenate_features(self, outputs: Dict[int, mx.array]) -> Optional[mx.array]:
        if not self.capture_layer_ids:
            return None
        last = self.num_layers - 1
        if last in outputs:
            outputs[last] = self._final_norm(outputs[last])
        return mx.concatenate([outputs[i] for i in self.capture_layer_ids], axis=-1)

    def make_cache(self, caches: Optional[List] = None) -> SpeculativeCache:
        """A prompt cache whose every layer can roll back a rejected block (`mark` before a verify, `keep` after):
        fresh, or around the layer caches `caches` (a resumed state)."""
        return speculative_cache(self.model, self._running_layers, self.family, caches)
