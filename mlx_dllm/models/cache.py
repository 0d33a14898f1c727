"""Caches that mlx-lm lacks: a sliding-window K/V cache that can roll back past its window."""

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import RotatingKVCache, _BaseCache

from ..kernels import patterns


class WindowKVCache(_BaseCache):
    """Sliding-window K/V in temporal order whose last update can be trimmed, or cut to a path of its rows.

    mlx-lm's RotatingKVCache overwrites rows once it is full, so it stops being trimmable past its
    window. This cache keeps the last `window - 1` rows before each update and appends the new ones,
    so rolling back any part of the latest update (a rejected speculative block) is exact.
    """

    def __init__(self, window: int):
        self.window = window
        self.keys = None
        self.values = None
        self.offset = 0

    def _kept_before_update(self) -> int:
        return 0 if self.keys is None else min(self.keys.shape[2], self.window - 1)

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            drop = self.keys.shape[2] - self._kept_before_update()
            self.keys = mx.concatenate([self.keys[..., drop:, :], keys], axis=2)
            self.values = mx.concatenate([self.values[..., drop:, :], values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        """mlx-lm's mask protocol: its sliding target layers (the verify of a DFlash target) ask for this."""
        kept = self._kept_before_update()
        window = window_size or self.window
        if N == 1 and kept < window and not return_array:
            return None
        return create_causal_mask(N, kept, window_size=window)

    def causal_pattern(self):
        """The attention pattern of the next update's rows (ask before `update_and_fetch`): causal within the
        window, over the rows kept before them and themselves."""
        return patterns.window(self.window, causal=True, query_start=self._kept_before_update())

    def tree_pattern(self, parents, window_size=None):
        """The attention pattern of a draft tree as the next update's rows (ask before `update_and_fetch`): the rows
        kept before them, then the tree's, within this window (or `window_size`, where the model asks for one)."""
        return patterns.tree(self._kept_before_update(), parents, window_size or self.window)

    def keys_and_values(self):
        return self.keys, self.values

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    def size(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def is_trimmable(self):
        """Whether any trim is exact (mlx-lm's sense, which its prompt cache asks): while it has dropped no row, as
        RotatingKVCache. Rolling back within the last update (`trim`, `keep_path`) needs no such check."""
        return self.size() == self.offset

    def trim(self, n):
        n = min(n, self.offset)
        if n == 0:
            return 0
        stored = self.keys.shape[2]
        if stored - n < min(self.offset - n, self.window - 1):
            raise RuntimeError("WindowKVCache cannot roll back past the rows of its last update")
        self.keys = self.keys[..., : stored - n, :]
        self.values = self.values[..., : stored - n, :]
        self.offset -= n
        return n

    def keep_path(self, since: int, path):
        """Keep, of the rows appended since `offset` was `since` (within the last update), those at `path`
        (increasing indices from there): the cache a prefill of the kept tokens leaves, within the window."""
        stored, appended = self.keys.shape[2], self.offset - since
        before = stored - appended
        if before < min(since, self.window - 1):
            raise RuntimeError("WindowKVCache cannot roll back past the rows of its last update")
        rows = mx.concatenate([mx.arange(before), before + mx.array(path, dtype=mx.int32)])
        self.keys, self.values = self.keys[..., rows, :], self.values[..., rows, :]
        self.offset = since + len(path)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def rotating_rows(cache: RotatingKVCache):
    """(keys, values) an mlx-lm RotatingKVCache holds, in temporal order: its ring turned back (mlx-lm 0.32's
    `_temporal_order`, which its own updates use)."""
    return cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
