"""One forward of an mlx-lm model at chosen positions under a chosen attention pattern (a draft tree's verify),
with no copy of any family's code.

For the duration of the forward each attention's `rope` rotates block row k at `positions[k]` (the rows go into
the batch dimension, where MLX's rope takes one offset per row), and each K/V cache hands the model the pattern's
mask through `make_mask`, the hook mlx-lm's `create_attention_mask` asks first.
"""

from contextlib import contextmanager
from typing import Iterator, List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..errors import DLLMError
from ..kernels import patterns
from ..kernels.patterns import Pattern


class PositionedRoPE:
    """A rope that rotates row k of [1, heads, rows, dim] at positions[k], whatever offset the layer passes."""

    def __init__(self, rope: nn.Module, positions: mx.array):
        self.rope, self.positions = rope, positions

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return self.rope(x.transpose(2, 1, 0, 3), offset=self.positions).transpose(2, 1, 0, 3)


def check_plain_kv(cache: List) -> None:
    """Trees need K/V caches whose rows can be gathered; sliding windows and recurrent states are not (yet)."""
    kinds = sorted({type(layer).__name__ for layer in cache if type(layer) is not KVCache})
    if kinds:
        raise DLLMError(f"a tree verify needs plain K/V caches; this target has {', '.join(kinds)} layers")


def attention_modules(model: nn.Module) -> List[nn.Module]:
    return [module for _, module in model.named_modules() if isinstance(module.get("rope"), nn.Module)]


@contextmanager
def positioned(model: nn.Module, cache: List, pattern: Pattern, positions: mx.array) -> Iterator[None]:
    """Run the next forward of `model` over len(positions) rows at `positions`, each row seeing what `pattern`
    says among the cache's rows and the block's."""
    check_plain_kv(cache)
    attentions = attention_modules(model)
    if not attentions:
        raise DLLMError("a tree verify needs the target's attention layers to hold their `rope`; these do not")
    if any(layer.offset != pattern.a for layer in cache):
        raise ValueError(f"the pattern's prefix of {pattern.a} keys is not the cache's")
    rows = positions.shape[0]
    mask = patterns.visible(pattern, rows, pattern.a + rows)
    originals = [module["rope"] for module in attentions]
    try:
        for module, rope in zip(attentions, originals):
            module["rope"] = PositionedRoPE(rope, positions)
        for layer in cache:
            layer.make_mask = lambda N, return_array=False, window_size=None: mask  # noqa: E731
        yield
    finally:
        for module, rope in zip(attentions, originals):
            module["rope"] = rope
        for layer in cache:
            layer.__dict__.pop("make_mask", None)
