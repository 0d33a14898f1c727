"""Draft trees (DDTree): grow a token tree from a drafter's per-position distributions, and follow it.

One drafter forward gives a distribution per block position, each independent of the tokens before it. The tree
holds the `budget` most probable prefixes among the top-`width` tokens of each depth, scored by the sum of their
log-probabilities and found best-first with a heap: a popped node offers its next sibling (the next-ranked token
at its depth, under the same parent) and its first child (the top token one depth further). Both score no higher
than the node, so nodes come out best first, and every node after its parent.

The verify block is `[anchor, nodes...]`: row 0 is the anchor (the root), row k > 0 a node whose parent row is
`parents[k]`, at position anchor + `depths[k]`.
"""

import heapq
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..errors import DLLMError


@dataclass(frozen=True)
class DraftTree:
    tokens: Tuple[int, ...]  # per block row; row 0 holds the anchor
    parents: Tuple[int, ...]  # per block row; -1 for the anchor
    depths: Tuple[int, ...]  # per block row; 0 for the anchor

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, row: int) -> List[int]:
        return [k for k, parent in enumerate(self.parents) if parent == row]

    def lineage(self, row: int) -> List[int]:
        """The drafted tokens from the anchor (exclusive) down to `row` (inclusive)."""
        tokens = []
        while row > 0:
            tokens.append(self.tokens[row])
            row = self.parents[row]
        return tokens[::-1]


def grow_tree(
    anchor: int, top_tokens: Sequence[Sequence[int]], top_log_probs: Sequence[Sequence[float]], budget: int
) -> DraftTree:
    """The tree of at most `budget` nodes below `anchor`. `top_tokens[d]` are depth d+1's candidates, most probable
    first, and `top_log_probs[d]` their log-probabilities (non-increasing)."""
    if budget < 0:
        raise DLLMError(f"the tree budget must be at least 0, got {budget}")
    if len(top_tokens) != len(top_log_probs) or any(len(t) != len(p) for t, p in zip(top_tokens, top_log_probs)):
        raise DLLMError("top_tokens and top_log_probs must have the same shape")
    tokens, parents, depths = [anchor], [-1], [0]
    heap: List[Tuple[float, int, int, int, int]] = []  # (-score, order, depth index, rank, parent row)
    order = 0

    def offer(score: float, depth: int, rank: int, parent: int) -> None:
        nonlocal order
        if depth < len(top_tokens) and rank < len(top_tokens[depth]):
            heapq.heappush(heap, (-score, order, depth, rank, parent))
            order += 1  # ties go to the node offered first

    if top_tokens and len(top_tokens[0]):
        offer(top_log_probs[0][0], 0, 0, 0)
    while heap and len(tokens) - 1 < budget:
        negative, _, depth, rank, parent = heapq.heappop(heap)
        score = -negative
        tokens.append(int(top_tokens[depth][rank]))
        parents.append(parent)
        depths.append(depth + 1)
        row = len(tokens) - 1
        if rank + 1 < len(top_tokens[depth]):
            offer(score - top_log_probs[depth][rank] + top_log_probs[depth][rank + 1], depth, rank + 1, parent)
        if depth + 1 < len(top_tokens):
            offer(score + top_log_probs[depth + 1][0], depth + 1, 0, row)
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths))


def follow(tree: DraftTree, target_tokens: Sequence[int]) -> Tuple[List[int], int]:
    """The longest path whose tokens the target chose, as block rows after the anchor, and the target's token after
    it (the bonus). `target_tokens[k]` is the target's choice after block row k."""
    path, row = [], 0
    while True:
        chosen = target_tokens[row]
        match = next((child for child in tree.children(row) if tree.tokens[child] == chosen), None)
        if match is None:
            return path, chosen
        path.append(match)
        row = match
