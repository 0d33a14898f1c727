"""K/V of a batch whose rows hold their own numbers of positions: continuous batching (sampler/batch.py).

Row b's position p sits at index p of its buffer row, whatever the other rows hold (mlx-lm's BatchKVCache
left-pads instead, so every row writes at one shared index). Nothing is ever shifted: a row advances by its own
count, rolls back a rejected block by forgetting its tail, joins with its own length and leaves without moving the
others. Past its length a row's buffer is stale (rejected or padded rows), and the mask hides it; attention reads
up to the longest row. A sliding window is a mask over positions here: every row is kept, so a windowed layer
holds as many rows as a full one. A row joins from, and is taken out as (`row`), the one-row cache a request alone
holds: KVCache, WindowKVCache, or mlx-lm's RotatingKVCache (plain AR's windows).
"""

from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .cache import WindowKVCache, rotating_rows


class RaggedKVCache:
    """One layer's K/V for a batch of rows of their own lengths. mlx-lm models read `offset` (the rows' positions,
    [B]) for RoPE, `make_mask` and `update_and_fetch`; a speculative round marks before its verify and keeps each
    row's accepted count after it; a drafter writes context rows and a block (`write`, `advance`)."""

    step = 256  # rows are allocated in steps, as KVCache's

    def __init__(self):
        self.keys = self.values = None
        self.lengths: List[int] = []
        self.offset = mx.array([], dtype=mx.int32)
        self.marked: List[int] = []
        self.context_rows = self.block_rows = None  # a drafter forward's counts per row (`prepare`)

    def _set_lengths(self, lengths: Sequence[int]) -> None:
        self.lengths = [int(n) for n in lengths]
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    def _reserve(self, needed: int, like: mx.array, value_like: mx.array) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        grown = -(-needed // self.step) * self.step
        B, H, _, D = like.shape

        def extended(buffer, dim, dtype):
            extra = mx.zeros((B, H, grown - capacity, dim), dtype=dtype)
            return extra if buffer is None else mx.concatenate([buffer, extra], axis=2)

        self.keys = extended(self.keys, D, like.dtype)
        self.values = extended(self.values, value_like.shape[3], value_like.dtype)

    def write(self, keys: mx.array, values: mx.array):
        """Put N new rows [B, H, N, D] after each row's length, advancing nothing (a block's rows stay until the next
        write); return the K/V up to the longest row plus N."""
        N = keys.shape[2]
        end = max(self.lengths) + N
        self._reserve(end, keys, values)
        index = (self.offset[:, None] + mx.arange(N))[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def advance(self, counts: Sequence[int]) -> None:
        self._set_lengths([n + c for n, c in zip(self.lengths, counts)])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        fetched = self.write(keys, values)
        self.advance([keys.shape[2]] * len(self.lengths))
        return fetched

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None) -> mx.array:
        """[B, 1, N, longest + N]: row b's new row j (position length_b + j) sees positions up to itself (within
        `window_size`), never another row's padding or its own stale tail."""
        queries = self.offset[:, None] + mx.arange(N)  # [B, N]
        keys = mx.arange(max(self.lengths) + N)
        visible = keys <= queries[..., None]
        if window_size is not None:
            visible = visible & (keys > queries[..., None] - window_size)
        return visible[:, None]

    # The rollback of a chain verify: each row keeps its own count of the verified rows.
    def mark(self) -> None:
        self.marked = list(self.lengths)

    def keep(self, kept: Sequence[int]) -> None:
        self._set_lengths([m + k for m, k in zip(self.marked, kept)])

    # A drafter forward (models/dflash.py): each row's new context rows, then its block.
    def prepare(self, context_rows: Sequence[int], block_rows: Sequence[int]) -> None:
        self.context_rows, self.block_rows = list(context_rows), list(block_rows)

    # Rows joining and leaving.
    def join(self, row) -> None:
        """Append one request's cache (a one-row KVCache, WindowKVCache or RotatingKVCache, holding its prompt) as the
        last row."""
        length, start, keys, values = _row_contents(row)
        batch = len(self.lengths)
        capacity = max(0 if self.keys is None else self.keys.shape[2], -(-length // self.step) * self.step)

        def placed(buffer, rows):
            shape = (1,) + rows.shape[1:2] + (capacity,) + rows.shape[3:]
            row = mx.zeros(shape, dtype=rows.dtype)
            row[..., start:length, :] = rows
            if buffer is None or batch == 0:
                return row
            buffer = mx.pad(buffer, [(0, 0), (0, 0), (0, capacity - buffer.shape[2]), (0, 0)])
            return mx.concatenate([buffer, row])

        self.keys, self.values = placed(self.keys, keys), placed(self.values, values)
        self._set_lengths(self.lengths + [length])

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (batch indices, in order), the buffer cut to the longest of them."""
        lengths = [self.lengths[i] for i in rows]
        if not lengths:
            self.keys = self.values = None
        else:
            capacity = -(-max(max(lengths), 1) // self.step) * self.step
            index = mx.array(list(rows), dtype=mx.int32)
            self.keys, self.values = self.keys[index, :, :capacity], self.values[index, :, :capacity]
        self._set_lengths(lengths)

    def row(self, index: int, like):
        """Row `index` as the one-row cache a request alone would hold after the same positions, filled into `like` (an
        empty cache of the layer's kind, from the model's `make_cache`) and returned: every position for a KVCache, a
        window's last ones for a WindowKVCache or RotatingKVCache."""
        length = self.lengths[index]
        window = _window(like)
        start = 0 if window is None else max(length - window, 0)
        # Copies: a slice would keep the batch's whole buffer alive in the prompt cache.
        keys, values = (mx.array(buffer[index : index + 1, :, start:length, :]) for buffer in (self.keys, self.values))
        if isinstance(like, RotatingKVCache):
            like.state = keys, values, length, 0, like.max_size, length - start  # the ring starts at its oldest row
        else:
            like.keys, like.values, like.offset = keys, values, length
        return like

    @property
    def state(self):
        return self.keys, self.values

    def size(self):
        return max(self.lengths, default=0)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _window(cache) -> Optional[int]:
    """The rows a one-row cache keeps: its window, or None for a KVCache, which keeps every position."""
    if isinstance(cache, WindowKVCache):
        return cache.window
    if isinstance(cache, RotatingKVCache) and cache.keep == 0:
        return cache.max_size
    if type(cache) is KVCache:
        return None
    raise TypeError(f"a {type(cache).__name__} cannot be a row of a ragged batch")


def _row_contents(cache):
    """(length, first position stored, keys, values) of a one-row cache: KVCache holds every position, a window its
    last ones, in order."""
    if _window(cache) is None:
        return cache.offset, 0, cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
    keys, values = rotating_rows(cache) if isinstance(cache, RotatingKVCache) else (cache.keys, cache.values)
    return cache.offset, cache.offset - keys.shape[2], keys, values
