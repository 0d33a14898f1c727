"""Draft trees (DDTree): grow a token tree from what a drafter offers below the anchor, and follow it.

One drafter forward offers candidates per block position (a `Lattice`): a DFlash drafter its top tokens at each
position, each scored independently of the tokens before it; a DFlash2 drafter its selector's candidates, each
scored given the candidate chosen one position earlier (the selector's pair scores). The tree holds the `budget`
most probable paths through the lattice, scored by the sum of their log-probabilities and found best-first with a
heap: a popped node offers its next sibling (the next-ranked candidate under the same parent) and its first child
(the top candidate one depth further, given the node's own). Both score no higher than the node, so nodes come out
best first, and every node after its parent.

The verify block is `[anchor, nodes...]`: row 0 is the anchor (the root), row k > 0 a node whose parent row is
`parents[k]`, at position anchor + `depths[k]`.
"""

import heapq
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence, Tuple

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


@dataclass(frozen=True)
class Lattice:
    """A drafter's offer below the anchor. Depth d (0-based: block position d + 1) has candidates `tokens[d]`;
    under a parent that is candidate p of depth d - 1 (any p at depth 0: the anchor), `ranked[d][p]` lists the
    candidate indices in order of `log_probs[d][p]`, their log-probabilities given that parent, most probable first.
    A depth with one row scores its candidates alike under every parent (positions drafted independently)."""

    tokens: Sequence[Sequence[int]]
    ranked: Sequence[Sequence[Sequence[int]]]
    log_probs: Sequence[Sequence[Sequence[float]]]

    @classmethod
    def independent(cls, top_tokens: Sequence[Sequence[int]], top_log_probs: Sequence[Sequence[float]]) -> "Lattice":
        """Per depth, candidates already most probable first, each scored whatever came before it."""
        if len(top_tokens) != len(top_log_probs) or any(len(t) != len(p) for t, p in zip(top_tokens, top_log_probs)):
            raise DLLMError("top_tokens and top_log_probs must have the same shape")
        return cls(top_tokens, [[list(range(len(row)))] for row in top_tokens], [[row] for row in top_log_probs])

    def row(self, depth: int, parent: int) -> Tuple[Sequence[int], Sequence[float]]:
        """(candidate indices, their log-probabilities) under a parent that is candidate `parent` one depth up."""
        rows = len(self.ranked[depth])
        pick = parent if rows > 1 else 0
        return self.ranked[depth][pick], self.log_probs[depth][pick]

    def log_prob(self, depth: int, parent: int, choice: int) -> float:
        ranked, log_probs = self.row(depth, parent)
        return log_probs[list(ranked).index(choice)]


class Grown(NamedTuple):
    tree: DraftTree
    choices: Tuple[int, ...]  # per row, its candidate index at its depth (0 for the anchor)
    scores: Tuple[float, ...]  # per row, the sum of the log-probabilities along its path (0 for the anchor)


def grow(anchor: int, lattice: Lattice, budget: int) -> Grown:
    """The tree of at most `budget` nodes below `anchor`, best-first through `lattice`."""
    if budget < 0:
        raise DLLMError(f"the tree budget must be at least 0, got {budget}")
    tokens, parents, depths, choices, scores = [anchor], [-1], [0], [0], [0.0]
    heap: List[Tuple[float, int, int, int, int]] = []  # (-score, order, depth index, rank, parent row)
    order = 0

    def offer(depth: int, rank: int, parent: int) -> None:
        nonlocal order
        if depth < len(lattice.tokens):
            ranked, log_probs = lattice.row(depth, choices[parent])
            if rank < len(ranked):
                heapq.heappush(heap, (-(scores[parent] + log_probs[rank]), order, depth, rank, parent))
                order += 1  # ties go to the node offered first

    offer(0, 0, 0)
    while heap and len(tokens) - 1 < budget:
        negative, _, depth, rank, parent = heapq.heappop(heap)
        choice = lattice.row(depth, choices[parent])[0][rank]
        tokens.append(int(lattice.tokens[depth][choice]))
        parents.append(parent)
        depths.append(depth + 1)
        choices.append(choice)
        scores.append(-negative)
        offer(depth, rank + 1, parent)
        offer(depth + 1, 0, len(tokens) - 1)
    return Grown(DraftTree(tuple(tokens), tuple(parents), tuple(depths)), tuple(choices), tuple(scores))


def grow_tree(
    anchor: int, top_tokens: Sequence[Sequence[int]], top_log_probs: Sequence[Sequence[float]], budget: int
) -> DraftTree:
    """The tree of at most `budget` nodes below `anchor` from independent positions: `top_tokens[d]` are depth
    d+1's candidates, most probable first, and `top_log_probs[d]` their log-probabilities (non-increasing)."""
    return grow(anchor, Lattice.independent(top_tokens, top_log_probs), budget).tree


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
