"""The rollback protocol of speculative decoding: mark the caches before a verify, keep what was accepted after it.

A strategy calls `cache.mark()` before the verify forward and `cache.keep(accepted)` after it, where
`accepted` is how many of the verified tokens stay (a chain) or which of them (a path: increasing indices
from the mark). Each cache kind restores exactly the state after the kept tokens:

- K/V caches forget rows (`trim`), or gather a path's rows into place;
- the sliding window (`WindowKVCache`) trims, or keeps a path, within the rows of its last update;
- recurrent layers (Gated DeltaNet, Mamba-2, short convolutions) replay their recurrence over the kept
  prefix of the inputs recorded during the verify (see `recurrent.py`).

Strategies never reach into a cache's fields.
"""

from contextlib import ExitStack, contextmanager
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from ..errors import DLLMError
from .cache import WindowKVCache
from .recurrent import RecurrentRollback, recurrent_mixers

Kept = Union[int, Sequence[int]]


class TrimmedKV:
    """K/V caches that forget their newest rows by `trim`: mlx-lm's KVCache and our WindowKVCache."""

    def __init__(self, cache):
        self.cache, self.start = cache, None

    def mark(self) -> None:
        self.start = self.cache.offset

    def keep(self, n: int) -> None:
        extra = self.cache.offset - self.start - n
        if extra > 0:
            self.cache.trim(extra)

    def keep_path(self, path: List[int]) -> None:
        """Gather the path's rows right after the mark (in KVCache's preallocated buffer, no copy of the cache)."""
        cache = self.cache
        if isinstance(cache, WindowKVCache):
            return cache.keep_path(self.start, path)
        if type(cache) is not KVCache:
            raise DLLMError(f"a {type(cache).__name__} keeps a chain of verified tokens, not a path")
        picks = self.start + mx.array(path)
        for name in ("keys", "values"):
            buffer = getattr(cache, name)
            buffer[..., self.start : self.start + len(path), :] = buffer[..., picks, :]
        cache.offset = self.start + len(path)


class SpeculativeCache(list):
    """A model's layer caches (the list mlx-lm models take) that roll back as one."""

    def __init__(self, caches: List, rollbacks: List):
        super().__init__(caches)
        self.rollbacks = rollbacks  # one per layer cache, in order

    def mark(self) -> None:
        for rollback in self.rollbacks:
            rollback.mark()

    def keep(self, kept: Kept) -> None:
        """Keep the first `kept` verified tokens, or the path `kept` (increasing indices from the mark)."""
        path = None if isinstance(kept, int) else [int(i) for i in kept]
        if path is not None and path == list(range(len(path))):
            kept, path = len(path), None
        for rollback in self.rollbacks:
            if path is None:
                rollback.keep(kept)
            else:
                rollback.keep_path(path)

    @contextmanager
    def recording(self):
        """Around a forward: recurrent layers marked since their last keep record what their replay needs."""
        with ExitStack() as stack:
            for rollback in self.rollbacks:
                if isinstance(rollback, RecurrentRollback) and rollback.armed:
                    stack.enter_context(rollback.recording())
            yield


def speculative_cache(
    model: nn.Module, layers: Optional[List] = None, family: Optional[str] = None, caches: Optional[List] = None
) -> SpeculativeCache:
    """A prompt cache of `model` whose every layer can roll back a rejected block; families whose caches cannot
    are refused by name, with the reason. `layers` defaults to `model.layers`, the list its forward runs; `caches`
    (layer caches an earlier one held, e.g. from a prompt cache) to fresh ones."""
    layers = model.layers if layers is None else layers
    family = family or getattr(model, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
    caches = make_prompt_cache(model) if caches is None else list(caches)
    recurrent = [c for c in caches if isinstance(c, ArraysCache)]
    mixers = recurrent_mixers(layers) if recurrent else []
    if len(mixers) != len(recurrent):
        raise DLLMError(
            f"target '{family}' is not supported: {len(recurrent)} recurrent caches but {len(mixers)} "
            "convolution mixers in its layers, so their states cannot be told apart"
        )
    by_cache = {}
    for (mixer, conv_name, recurrence), cache in zip(mixers, recurrent):  # both in layer order
        if len(cache.cache) != (1 if recurrence is None else 2):
            raise DLLMError(
                f"target '{family}' is not supported: its recurrent layer {type(mixer).__name__} keeps a state that "
                "no known replay restores (mlx-lm's gated_delta_update and ssm_update are known)"
            )
        by_cache[id(cache)] = RecurrentRollback(cache, mixer, conv_name, recurrence)
    rollbacks = []
    for i, cache in enumerate(caches):
        if isinstance(cache, RotatingKVCache):
            if cache.keep:
                raise DLLMError(f"target '{family}' layer {i}: a rotating cache with keep>0 cannot roll back")
            caches[i] = cache = WindowKVCache(cache.max_size)
        if isinstance(cache, (KVCache, WindowKVCache)):
            rollbacks.append(TrimmedKV(cache))
        elif id(cache) in by_cache:
            rollbacks.append(by_cache[id(cache)])
        else:
            raise DLLMError(
                f"target '{family}' is not supported: layer {i} uses {type(cache).__name__}, "
                "which has no token rollback"
            )
    return SpeculativeCache(caches, rollbacks)
