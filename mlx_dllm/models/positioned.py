"""One forward of an mlx-lm model at chosen positions under a draft tree's attention pattern (a tree verify), with
no copy of any family's code.

For the duration of the forward each attention's `rope` rotates block row k at `positions[k]` (the rows go into
the batch dimension, where MLX's rope takes one offset per row), and each K/V cache hands the model the tree's
mask as its own keys see it through `make_mask`, the hook mlx-lm's `create_attention_mask` asks first.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache

from ..errors import DLLMError
from ..kernels import patterns
from ..kernels.patterns import Pattern
from .cache import WindowKVCache


class PositionedRoPE:
    """A rope that rotates row k of [1, heads, rows, dim] at positions[k], whatever offset the layer passes."""

    def __init__(self, rope: nn.Module, positions: mx.array):
        self.rope, self.positions = rope, positions

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return self.rope(x.transpose(2, 1, 0, 3), offset=self.positions).transpose(2, 1, 0, 3)


def check_tree_caches(cache: List) -> None:
    """A tree verify keeps the accepted path by gathering its K/V rows; a recurrent state cannot be gathered."""
    for layer in cache:
        kind = type(layer).__name__
        if isinstance(layer, ArraysCache):
            raise DLLMError(
                f"a tree verify cannot run on this target's {kind} (recurrent) layers: each tree node would need its "
                "own recurrent state; use speculation='chain'"
            )
        if type(layer) not in (KVCache, WindowKVCache):
            raise DLLMError(f"a tree verify needs K/V caches; this target has {kind} layers")


def layer_tree(layer, tree: Pattern, window_size: Optional[int]) -> Pattern:
    """`tree` (after all the positions the caches hold) as `layer`'s attention sees it: a sliding-window layer's
    keys are the rows it kept, and its window (or the one mlx-lm asks for) cuts the prefix and the ancestors."""
    if isinstance(layer, WindowKVCache):
        return layer.tree_pattern(tree.parents, window_size)
    return patterns.tree(tree.a, tree.parents, window_size or tree.b)


def attention_modules(model: nn.Module) -> List[nn.Module]:
    return [module for _, module in model.named_modules() if isinstance(module.get("rope"), nn.Module)]


@contextmanager
def positioned(model: nn.Module, cache: List, tree: Pattern, positions: mx.array) -> Iterator[None]:
    """Run the next forward of `model` over len(positions) rows at `positions`, each row seeing what the `tree`
    pattern says among the cache's rows and the block's (through each layer's own window)."""
    check_tree_caches(cache)
    if tree.kind != patterns.TREE:
        raise ValueError("a positioned forward takes a tree pattern")
    attentions = attention_modules(model)
    if not attentions:
        raise DLLMError("a tree verify needs the target's attention layers to hold their `rope`; these do not")
    if any(layer.offset != tree.a for layer in cache):
        raise ValueError(f"the pattern's prefix of {tree.a} keys is not the cache's")
    rows = positions.shape[0]
    masks: Dict[Pattern, mx.array] = {}  # one per layer kind: the model asks one layer of each kind

    def mask_maker(layer):
        def make_mask(N, return_array=False, window_size=None):
            pattern = layer_tree(layer, tree, window_size)
            if pattern not in masks:
                masks[pattern] = patterns.visible(pattern, rows, pattern.a + rows)
            return masks[pattern]

        return make_mask

    originals = [module["rope"] for module in attentions]
    try:
        for module, rope in zip(attentions, originals):
            module["rope"] = PositionedRoPE(rope, positions)
        for layer in cache:
            layer.make_mask = mask_maker(layer)
        yield
    finally:
        for module, rope in zip(attentions, originals):
            module["rope"] = rope
        for layer in cache:
            layer.__dict__.pop("make_mask", None)
