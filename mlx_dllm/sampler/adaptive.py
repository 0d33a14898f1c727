"""Adaptive speculation: each round verifies nothing drafted (AR), a chain or a tree, whichever is expected to commit
the most tokens per second on this machine. Pure Python: the numbers come in, a choice goes out.

Expected tokens. A drafted token to which the drafter gave probability q turns out to be the target's with
probability `Calibration(q)`: per bin of q, the share seen so far in this generation, starting from q itself. A
node is committed only if its whole path is, so its chance is the product along the path, and a tree commits in
expectation 1 (the target's own token after the path, always) plus the sum of its nodes' chances. Grown best-first
by those chances (`grow_tree`), the first b nodes are the best b-node tree: one growth prices every budget, and the
round takes the budget b maximising expected tokens / (draft + verify(b + 1)) seconds of the cost curve. A budget
of 0 verifies the anchor alone; a chosen tree that is a single path is verified as a chain.

Whether to draft at all. A drafted round pays the drafter before its confidences are known. Running means of the
tokens and seconds of drafted rounds give their rate; when it falls below AR's (1 token per verify(1) seconds) the
next rounds skip the drafter, and one probe drafts again after `wait` of them (doubling while probes fail, up to
MAX_WAIT; back to MIN_WAIT when one succeeds). A probe at worst costs one drafter forward.
"""

import math
from dataclasses import dataclass, field
from typing import List, Sequence

from .cost_curve import CostCurve
from .tree import DraftTree, grow_tree

BINS = 10
PRIOR = 2.0  # pseudo-observations at the drafter's own probability, per bin
SMOOTHING = 0.3  # weight of the newest drafted round in the running means
MIN_WAIT, MAX_WAIT = 2, 64  # AR rounds between probes
FLOOR = 1e-9  # no chance is exactly 0: log-probabilities stay finite


@dataclass
class Calibration:
    """P(a drafted token is the target's | the drafter's probability q), per bin of q."""

    hits: List[float] = field(default_factory=lambda: [0.0] * BINS)
    trials: List[float] = field(default_factory=lambda: [0.0] * BINS)

    def __call__(self, q: float) -> float:
        b = min(int(q * BINS), BINS - 1)
        return max((self.hits[b] + PRIOR * q) / (self.trials[b] + PRIOR), FLOOR)

    def observe(self, q: float, hit: bool) -> None:
        b = min(int(q * BINS), BINS - 1)
        self.trials[b] += 1
        self.hits[b] += hit


def best_budget(gains: Sequence[float], curve: CostCurve) -> int:
    """The budget b maximising gains[b] / (draft + verify(b + 1)) seconds; gains[b] is the expected committed
    tokens of the best b-node tree (gains[0] = 1: the target's own token)."""
    rates = [gain / (curve.draft_seconds + curve.verify(b + 1)) for b, gain in enumerate(gains)]
    return max(range(len(rates)), key=lambda b: (rates[b], -b))  # ties: the smaller verify


def node_chances(tree: DraftTree, chance_of: Sequence[dict]) -> List[float]:
    """Each row's chance of being committed: the product of its path's chances (the anchor's is 1)."""
    chances = [1.0]
    for row in range(1, len(tree)):
        chances.append(chances[tree.parents[row]] * chance_of[tree.depths[row] - 1][tree.tokens[row]])
    return chances


def prefix(tree: DraftTree, rows: int) -> DraftTree:
    """The first `rows` rows: a tree grown best-first, cut anywhere, is still a tree (parents come first)."""
    return DraftTree(tree.tokens[:rows], tree.parents[:rows], tree.depths[:rows])


def kind(tree: DraftTree) -> str:
    """What a verified tree is: "ar" (the anchor alone), "chain" (one path) or "tree"."""
    if len(tree) == 1:
        return "ar"
    return "chain" if list(tree.parents) == list(range(-1, len(tree) - 1)) else "tree"


class Adaptive:
    """The per-round choice of one generation: whether to draft, then how much of the drafter's tree to verify."""

    def __init__(self, curve: CostCurve, max_budget: int):
        self.curve, self.max_budget = curve, max_budget
        self.calibration = Calibration()
        self.tokens = self.seconds = None  # running means over drafted rounds
        self.wait, self.waiting = MIN_WAIT, 0
        self._drafted: List[float] = []  # the drafter's probability of each row of the last chosen tree

    def drafts(self) -> bool:
        """Whether this round runs the drafter (else it is an AR round)."""
        if self.waiting:
            self.waiting -= 1
            return False
        return True

    def shape(self, anchor: int, top_tokens: Sequence[Sequence[int]], top_log_probs: Sequence[Sequence[float]]):
        """The tree this round verifies, from the drafter's top tokens per depth and their log-probabilities."""
        chance_of = [{t: self.calibration(math.exp(lp)) for t, lp in zip(tokens, log_probs)}
                     for tokens, log_probs in zip(top_tokens, top_log_probs)]
        ranked = [sorted(chances.items(), key=lambda item: -item[1]) for chances in chance_of]
        grown = grow_tree(anchor, [[t for t, _ in depth] for depth in ranked],
                          [[math.log(c) for _, c in depth] for depth in ranked], self.max_budget)
        chances = node_chances(grown, chance_of)
        gains = [1.0]
        for chance in chances[1:]:
            gains.append(gains[-1] + chance)
        tree = prefix(grown, best_budget(gains, self.curve) + 1)
        drafted = [{t: math.exp(lp) for t, lp in zip(tokens, log_probs)}
                   for tokens, log_probs in zip(top_tokens, top_log_probs)]
        self._drafted = [1.0] + [drafted[tree.depths[row] - 1][tree.tokens[row]] for row in range(1, len(tree))]
        return tree

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        """After a drafted round's verify: `path` are the committed rows (after the anchor)."""
        on_path = {0, *path}
        for row in range(1, len(tree)):
            if tree.parents[row] in on_path:  # the target had its say on this node
                self.calibration.observe(self._drafted[row], row in on_path)
        tokens, seconds = len(path) + 1, self.curve.draft_seconds + self.curve.verify(len(tree))
        if self.tokens is None:
            self.tokens, self.seconds = tokens, seconds
        else:
            self.tokens += SMOOTHING * (tokens - self.tokens)
            self.seconds += SMOOTHING * (seconds - self.seconds)
        if self.tokens / self.seconds < 1 / self.curve.verify(1):
            self.waiting, self.wait = self.wait, min(2 * self.wait, MAX_WAIT)
        else:
            self.wait = MIN_WAIT


class Pinned:
    """The policy of a pinned tree: draft every round and verify the best `budget` nodes by the drafter's own
    probabilities."""

    def __init__(self, budget: int):
        self.budget = budget

    def drafts(self) -> bool:
        return True

    def shape(self, anchor: int, top_tokens, top_log_probs) -> DraftTree:
        return grow_tree(anchor, top_tokens, top_log_probs, self.budget)

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        pass
