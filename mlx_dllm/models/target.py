"""Adapter over mlx-lm autoregressive models: layer-output capture, embed/lm_head, cache rollback."""

from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from ..errors import DLLMError
from .cache import WindowKVCache


class _CaptureSlot:
    """Holds the latest outputs of the captured layers (kept outside the module tree)."""

    def __init__(self):
        self.outputs = {}


_CAPTURING_CLASSES = {}


def _capturing_class(cls):
    """A subclass of `cls` whose call records its output; the parameter tree is unchanged."""
    if cls in _CAPTURING_CLASSES.values():  # already captured by an earlier binding
        return cls
    if cls in _CAPTURING_CLASSES:
        return _CAPTURING_CLASSES[cls]

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        self._capture_slot.outputs[self._capture_index] = out[0] if isinstance(out, tuple) else out
        return out

    _CAPTURING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _CAPTURING_CLASSES[cls]


def _find_backbone(model: nn.Module) -> Optional[nn.Module]:
    for path in ("model", "language_model.model", "language_model"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None) if isinstance(module, nn.Module) else None
        if isinstance(module, nn.Module) and hasattr(module, "embed_tokens"):
            return module
    return None


class Target:
    """An mlx-lm model seen as a DFlash target.

    `capture_layer_ids` are 0-based decoder layers whose outputs (residual stream, before the final
    norm) are concatenated, in the given order, into the features the drafter reads.
    """

    def __init__(self, model: nn.Module, capture_layer_ids: Sequence[int] = ()):
        self.model = model
        self.family = getattr(model, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
        backbone = _find_backbone(model)
        layers = getattr(model, "layers", None)
        missing = []
        if backbone is None:
            missing.append("an `embed_tokens` table under `model`")
        if not isinstance(layers, list) or not layers:
            missing.append("a `layers` list")
        if missing:
            raise DLLMError(f"target family '{self.family}' is not supported: it lacks {' and '.join(missing)}")
        self.embed_tokens = backbone.embed_tokens
        self.layers = layers
        self._lm_head = getattr(model, "lm_head", None)
        self.num_layers = len(layers)
        self.capture_layer_ids = list(capture_layer_ids)
        outside = [i for i in self.capture_layer_ids if not 0 <= i < self.num_layers]
        if outside:
            raise DLLMError(f"target layer id {outside[0]} is outside the target's {self.num_layers} layers")
        self.make_cache()  # fail early on caches that cannot roll back
        self._slot = _CaptureSlot()
        self._original_classes = {}
        for index, layer_id in enumerate(self.capture_layer_ids):
            layer = layers[layer_id]
            self._original_classes.setdefault(layer_id, type(layer))
            layer.__class__ = _capturing_class(type(layer))
            layer._capture_slot = self._slot
            layer._capture_index = index

    def close(self) -> None:
        """Give the layers their own classes back, so the model runs exactly as before."""
        for layer_id, cls in self._original_classes.items():
            self.layers[layer_id].__class__ = cls
        self._original_classes.clear()

    def embed(self, ids: mx.array) -> mx.array:
        return self.embed_tokens(ids)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self._lm_head is not None:
            return self._lm_head(hidden)
        return self.embed_tokens.as_linear(hidden)

    def __call__(self, ids: mx.array, cache: List) -> mx.array:
        """Logits for `ids` [1, N]; the captured features are then available from `features()`."""
        self._slot.outputs.clear()
        return self.model(ids, cache=cache)

    def features(self) -> mx.array:
        """[1, N, K*H]: captured layer outputs of the last call, in `capture_layer_ids` order."""
        outputs = self._slot.outputs
        return mx.concatenate([outputs[i] for i in range(len(self.capture_layer_ids))], axis=-1)

    def make_cache(self) -> List:
        """A prompt cache whose every layer can roll back a rejected block, sliding layers included."""
        caches = make_prompt_cache(self.model)
        for i, cache in enumerate(caches):
            if isinstance(cache, RotatingKVCache):
                if cache.keep:
                    raise DLLMError(f"target '{self.family}' layer {i}: a rotating cache with keep>0 cannot roll back")
                caches[i] = WindowKVCache(cache.max_size)
            elif not isinstance(cache, (KVCache, WindowKVCache)):
                raise DLLMError(
                    f"target '{self.family}' is not supported: layer {i} uses {type(cache).__name__}, "
                    "which has no token rollback"
                )
        return caches

    @staticmethod
    def rollback(cache: List, n: int) -> None:
        """Forget the last `n` tokens of every layer."""
        if n > 0:
            for c in cache:
                c.trim(n)
