"""Who sees whom in attention, as a few integers instead of a [Tq, Tk] mask.

Queries are the Tq rows of the current block; keys are the Tk = cache + block columns, in that order. The Metal
kernel evaluates `visible` itself; every other backend gets `mask(pattern, Tq, Tk)`, the equivalent boolean
array (or MLX's "causal" string, or None), for `mx.fast.scaled_dot_product_attention`.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import mlx.core as mx

BIDIRECTIONAL, CAUSAL, CAUSAL_WINDOW, BIDIRECTIONAL_WINDOW, QUADRATIC, TREE = range(6)
KERNEL_KINDS = (BIDIRECTIONAL, CAUSAL, CAUSAL_WINDOW, BIDIRECTIONAL_WINDOW, QUADRATIC, TREE)  # the Metal kernel's


@dataclass(frozen=True)
class Pattern:
    """kind, and the integers the kind reads (the kernel's params a, b, c; a tree's `parents` reach the kernel as
    depths and ancestor bit words, `tree_words`):

    - bidirectional: every key.
    - causal(offset): query i sees key j iff j <= offset + i (offset = Tk - Tq is MLX's "causal").
    - window(...): query position query_start + i, key position key_start + j; causal: 0 <= distance < window,
      bidirectional: |distance| <= window.
    - quadratic(prefix, rows): `prefix` cache keys seen by all, then a layout of `rows` rows of rows + 1 tokens
      [d_i, masks]: d tokens see d_0..d_row, masks see d_0..d_row and their whole row.
    - tree(prefix, parents, window): `prefix` cache keys, then block rows that see their ancestors and themselves
      (`parents[k]` < k is row k's parent, -1 for a root). Row k sits `depth(k)` positions after the last prefix
      key's successor (a root at depth 0), so with a sliding `window` (b > 0) it sees prefix key j iff
      (prefix - j) + depth(k) < window, and an ancestor m iff depth(k) - depth(m) < window.
    """

    kind: int
    a: int = 0
    b: int = 0
    c: int = 0
    parents: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in range(6):
            raise ValueError(f"unknown attention pattern kind {self.kind}")


def bidirectional() -> Pattern:
    return Pattern(BIDIRECTIONAL)


def causal(offset: int) -> Pattern:
    return Pattern(CAUSAL, a=offset)


def window(size: int, causal: bool, query_start: int, key_start: int = 0) -> Pattern:
    if size < 1:
        raise ValueError(f"a sliding window needs a size of at least 1, not {size}")
    return Pattern(CAUSAL_WINDOW if causal else BIDIRECTIONAL_WINDOW, a=query_start, b=size, c=key_start)


def quadratic(prefix: int, rows: int) -> Pattern:
    if rows < 1:
        raise ValueError(f"the quadratic layout needs at least 1 row, not {rows}")
    return Pattern(QUADRATIC, a=prefix, c=rows)


def tree(prefix: int, parents: Sequence[int], window: int = 0) -> Pattern:
    """A draft tree after `prefix` keys; `window` > 0 for a sliding-window layer (0: none)."""
    if any(not -1 <= parent < row for row, parent in enumerate(parents)):
        raise ValueError("a tree row's parent must be an earlier row (or -1 for a root)")
    if window < 0:
        raise ValueError(f"a tree's sliding window must be at least 1 (or 0 for none), not {window}")
    return Pattern(TREE, a=prefix, b=window, parents=tuple(parents))


def depths(parents: Sequence[int]) -> Tuple[int, ...]:
    """Each row's depth below its root (a root is at 0)."""
    found = []
    for parent in parents:
        found.append(0 if parent < 0 else found[parent] + 1)
    return tuple(found)


def lineages(parents: Sequence[int]) -> Tuple[int, ...]:
    """Each row's lineage as an integer: bit j is set iff row j is the row itself or one of its ancestors."""
    found = []
    for row, parent in enumerate(parents):
        found.append((found[parent] if parent >= 0 else 0) | 1 << row)
    return tuple(found)


def ancestors(parents: Sequence[int]) -> mx.array:
    """Boolean [N, N]: row k sees row j iff j is k or one of its ancestors."""
    n = len(parents)
    rows = [[lineage >> j & 1 for j in range(n)] for lineage in lineages(parents)]
    return mx.array(rows, dtype=mx.bool_).reshape(n, n)


def tree_words(parents: Sequence[int]) -> Tuple[int, ...]:
    """The kernel's form of `ancestors`: row k's lineage as ceil(N / 32) unsigned 32-bit words, row after row (bit
    j % 32 of word j // 32 is row j), N * ceil(N / 32) integers instead of N * N booleans."""
    width = (len(parents) + 31) // 32
    return tuple(lineage >> 32 * word & 0xFFFFFFFF for lineage in lineages(parents) for word in range(width))


def check_tree(pattern: Pattern, Tq: int, Tk: int) -> None:
    rows, prefix = len(pattern.parents), pattern.a
    if Tq != rows or Tk != prefix + Tq:
        raise ValueError(f"a tree of {rows} rows after {prefix} keys is not a [{Tq}, {Tk}] attention")


def visible(pattern: Pattern, Tq: int, Tk: int) -> mx.array:
    """Boolean [Tq, Tk]: the rule the kernel applies, as an array."""
    i, j = mx.arange(Tq)[:, None], mx.arange(Tk)[None, :]
    kind, a, b, c = pattern.kind, pattern.a, pattern.b, pattern.c
    if kind == BIDIRECTIONAL:
        return mx.ones((Tq, Tk), dtype=mx.bool_)
    if kind == CAUSAL:
        return j <= a + i
    if kind in (CAUSAL_WINDOW, BIDIRECTIONAL_WINDOW):
        distance = (a + i) - (c + j)
        return (distance >= 0) & (distance < b) if kind == CAUSAL_WINDOW else mx.abs(distance) <= b
    if kind == TREE:
        check_tree(pattern, Tq, Tk)
        seen = mx.concatenate([mx.ones((Tq, a), dtype=mx.bool_), ancestors(pattern.parents)], axis=1)
        if b == 0:
            return seen
        depth = mx.array(depths(pattern.parents))
        key_depth = mx.concatenate([mx.arange(-a, 0), depth])  # prefix key j sits at depth j - a
        return seen & (depth[:, None] - key_depth[None, :] < b)
    width, layout_key = c + 1, j - a
    same_row = layout_key // width == i // width
    sees_drafts = (layout_key % width == 0) & (layout_key // width <= i // width)
    return (layout_key < 0) | sees_drafts | ((i % width != 0) & same_row)


def named_by_mlx(pattern: Pattern, Tq: int, Tk: int) -> bool:
    """Whether `mx.fast.scaled_dot_product_attention` takes the pattern without an array: no mask, or "causal"."""
    return pattern.kind == BIDIRECTIONAL or (pattern.kind == CAUSAL and pattern.a == Tk - Tq)


def mask(pattern: Pattern, Tq: int, Tk: int) -> Union[None, str, mx.array]:
    """What `mx.fast.scaled_dot_product_attention` takes for the pattern: None, "causal" or a boolean array."""
    if not named_by_mlx(pattern, Tq, Tk):
        return visible(pattern, Tq, Tk)
    return None if pattern.kind == BIDIRECTIONAL else "causal"
