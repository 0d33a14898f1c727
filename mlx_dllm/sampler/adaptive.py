"""Adaptive speculation: each round verifies nothing drafted (AR), a chain or a tree, whichever is expected to commit
the most tokens per second on this machine. Pure Python: the numbers come in, a choice goes out.

Expected tokens. A drafted token to which the drafter gave probability q (a DFlash2 drafter: given its parent
candidate) turns out to be the target's with probability `Calibration(q)`: per bin of q, the share seen so far in
this generation, starting from q itself. A node is committed only if its whole path is, so its chance is the product
along the path, and a tree commits in expectation 1 (the target's own token after the path, always) plus the sum of
its nodes' chances. Grown best-first by those chances (`tree.grow`), the first b nodes are the best b-node tree: one
growth prices every budget, and the round takes the budget b maximising expected tokens / (draft + verify(b + 1))
seconds of the cost curve. A budget of 0 verifies the anchor alone; a chosen tree that is a single path is verified
as a chain.

Whether to draft at all. A drafted round pays the drafter before its confidences are known. Running means of the
tokens and seconds of drafted rounds give their rate; when it falls below AR's (1 token per verify(1) seconds) the
next rounds skip the drafter, and one probe drafts again after `wait` of them (doubling while probes fail, up to
MAX_WAIT; back to MIN_WAIT when one succeeds). A probe at worst costs one drafter forward.

A continuous batch's width (`BatchWidth`, sampler/batch.py). Every row of a batch is verified in one forward,
right-padded to the widest row, so a round costs verify(rows x width) seconds whatever each row drafted: the width is
chosen once for the batch, and every drafting row verifies that many of its chain's tokens. A chain cut after k
drafts commits in expectation 1 + the sum of its first k prefixes' calibrated chances (`chain_gains`); the round
takes the width with the most expected tokens, summed over the rows, per (drafter + verify) second. On a CPU, where a
forward's cost grows with its tokens, wider batches choose shorter chains and, past a few rows, AR; drafted rounds
are judged against AR rounds of the same rows, and skip the drafter as one generation's do.

Self-speculation's block (`BlockChoice`, Nemotron-Labs-Diffusion's linear and quadratic modes). The model drafts its
own block, with no confidences to calibrate, so the policy learns per position: alpha_j, the chance that draft j is
accepted when every draft before it was. A block of L tokens (L - 1 drafts) then commits in expectation
1 + sum_{k<L} prod_{j<=k} alpha_j tokens, and each cycle takes the L with the most expected tokens per second of the
mode's cost (`linear_cost`, `quadratic_cost`). Linear-spec may choose L = 1, a plain AR step, which measures no
acceptance: probes draft again as above.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

from .cost_curve import CostCurve
from .tree import DraftTree, Lattice, grow

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


def fastest(tokens: Sequence[float], seconds: Sequence[float]) -> int:
    """The index with the most tokens[i] / seconds[i]; ties go to the smaller (the cheaper forward)."""
    rates = [t / s for t, s in zip(tokens, seconds)]
    return max(range(len(rates)), key=lambda i: (rates[i], -i))


def best_budget(gains: Sequence[float], curve: CostCurve) -> int:
    """The budget b maximising gains[b] / (draft + verify(b + 1)) seconds; gains[b] is the expected committed
    tokens of the best b-node tree (gains[0] = 1: the target's own token)."""
    return fastest(gains, [curve.draft_seconds + curve.verify(b + 1) for b in range(len(gains))])


def calibrated(lattice: Lattice, calibration: Calibration) -> Lattice:
    """The lattice with each log-probability replaced by the log of its calibrated chance, re-ranked."""
    ranked, log_probs = [], []
    for depth_ranked, depth_log_probs in zip(lattice.ranked, lattice.log_probs):
        rows = [sorted(((calibration(math.exp(lp)), i) for i, lp in zip(order, lps)), key=lambda pair: -pair[0])
                for order, lps in zip(depth_ranked, depth_log_probs)]
        ranked.append([[i for _, i in row] for row in rows])
        log_probs.append([[math.log(chance) for chance, _ in row] for row in rows])
    return Lattice(lattice.tokens, ranked, log_probs)


def prefix(tree: DraftTree, rows: int) -> DraftTree:
    """The first `rows` rows: a tree grown best-first, cut anywhere, is still a tree (parents come first)."""
    return DraftTree(tree.tokens[:rows], tree.parents[:rows], tree.depths[:rows])


def kind(tree: DraftTree) -> str:
    """What a verified tree is: "ar" (the anchor alone), "chain" (one path) or "tree"."""
    if len(tree) == 1:
        return "ar"
    return "chain" if list(tree.parents) == list(range(-1, len(tree) - 1)) else "tree"


@dataclass
class Probes:
    """Rounds without the drafter while drafted rounds commit more slowly than AR: after a slow one the next `wait`
    rounds skip the drafter, then one probes (drafts again); the wait doubles while probes stay slow, up to MAX_WAIT,
    and is back to MIN_WAIT after one that is not."""

    wait: int = MIN_WAIT
    waiting: int = 0

    def drafts(self) -> bool:
        """Whether this round runs the drafter (else it is an AR round)."""
        if self.waiting:
            self.waiting -= 1
            return False
        return True

    def judge(self, slower_than_ar: bool) -> None:
        """After a drafted round: whether drafting, as measured so far, commits more slowly than AR."""
        if slower_than_ar:
            self.waiting, self.wait = self.wait, min(2 * self.wait, MAX_WAIT)
        else:
            self.wait = MIN_WAIT


class Adaptive:
    """The per-round choice of one generation: whether to draft, then how much of the drafter's tree to verify."""

    def __init__(self, curve: CostCurve, max_budget: int):
        self.curve, self.max_budget = curve, max_budget
        self.calibration = Calibration()
        self.tokens = self.seconds = None  # running means over drafted rounds
        self.probes = Probes()
        self._drafted: List[float] = []  # the drafter's probability of each row of the last chosen tree

    def drafts(self) -> bool:
        return self.probes.drafts()

    def shape(self, anchor: int, lattice: Lattice) -> DraftTree:
        """The tree this round verifies, from the drafter's candidates and their log-probabilities."""
        grown = grow(anchor, calibrated(lattice, self.calibration), self.max_budget)
        gains = [1.0]
        for score in grown.scores[1:]:  # a node's score is the log of its path's chance
            gains.append(gains[-1] + math.exp(score))
        tree = prefix(grown.tree, best_budget(gains, self.curve) + 1)
        self._drafted = [1.0] + [
            math.exp(lattice.log_prob(tree.depths[row] - 1, grown.choices[tree.parents[row]], grown.choices[row]))
            for row in range(1, len(tree))
        ]
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
        self.probes.judge(self.tokens / self.seconds < 1 / self.curve.verify(1))


def chain_tokens(chances: Sequence[float]) -> List[float]:
    """Expected committed tokens of a chain verified up to each of its drafts (index k: its first k; index 0: the
    target's own token alone), `chances[j]` being draft j's chance of acceptance once every draft before it was."""
    tokens, chance = [1.0], 1.0
    for alpha in chances:
        chance *= alpha
        tokens.append(tokens[-1] + chance)
    return tokens


def chain_gains(confidences: Sequence[float], calibration: Calibration) -> List[float]:
    """`chain_tokens` of a chain whose drafts had the drafter's probabilities `confidences`, calibrated."""
    return chain_tokens([calibration(q) for q in confidences])


class BatchWidth:
    """Per round of a continuous batch (see the module's docstring): whether its adaptive rows draft, and the width
    of the verify (1 + the drafts each of them verifies)."""

    def __init__(self, curve: CostCurve, block_size: int):
        self.curve, self.block_size = curve, block_size
        self.probes = Probes()
        self.ratio = None  # running mean of drafted rounds' rates over AR's with the same rows

    def drafts(self) -> bool:
        return self.probes.drafts()

    def draft_seconds(self, blocks: int) -> float:
        """One drafter forward over `blocks` rows' blocks: the measured one-block forward, scaled as the target's
        forward scales with its tokens (both are the same kind of layers over every token, their weights read once)."""
        one = self.curve.verify(self.block_size)
        return self.curve.draft_seconds * self.curve.verify(blocks * self.block_size) / one

    def width(self, gains: Sequence[Sequence[float]], others: float, floor: int, rows: int, blocks: int) -> int:
        """The width with the most expected tokens per second: `gains` are the adaptive rows' (`chain_gains`, as long
        as their chains allow), `others` the other rows' expected tokens, `floor` the width they need, `rows` the
        batch's and `blocks` the drafter forward's rows."""
        widths = range(floor, max(floor, *(len(g) for g in gains)) + 1)
        tokens = [others + sum(g[min(w, len(g)) - 1] for g in gains) for w in widths]
        seconds = [self.draft_seconds(blocks) + self.curve.verify(rows * w) for w in widths]
        return widths[fastest(tokens, seconds)]

    def observe(self, tokens: int, rows: int, width: int, blocks: int) -> None:
        """After a drafted round that committed `tokens` over the batch's `rows`."""
        rate = tokens / (self.draft_seconds(blocks) + self.curve.verify(rows * width))
        ratio = rate * self.curve.verify(rows) / rows
        self.ratio = ratio if self.ratio is None else self.ratio + SMOOTHING * (ratio - self.ratio)
        self.probes.judge(self.ratio < 1)


class Pinned:
    """The policy of a pinned tree: draft every round and verify the best `budget` nodes by the drafter's own
    probabilities."""

    def __init__(self, budget: int):
        self.budget = budget

    def drafts(self) -> bool:
        return True

    def shape(self, anchor: int, lattice: Lattice) -> DraftTree:
        return grow(anchor, lattice, self.budget).tree

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        pass


# The first draft's prior acceptance, with the weight of two cycles. 0.7 is a little below what Nemotron's drafts
# reach (acceptance lengths 5.5 without the LoRA and 6.8 with it at block 32: about 0.82 and 0.85 per position) and
# far above a useless drafter's, so the first cycles draft blocks long enough to measure the later positions; the
# weight is light, so a few real cycles outweigh it.
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 2.0


def linear_cost(curve: CostCurve) -> Callable[[int], float]:
    """Seconds of a linear self-speculation cycle of `length` tokens: one bidirectional draft forward (a threshold
    above 0 runs more, which this does not price) and a causal verify over them, or for length 1 an AR step (the
    verify alone). The model's curve times its draft forward once, over the curve's largest size
    (`blocks.measured_costs`); at other sizes the draft costs the verify scaled by that ratio (the same layers over
    the same tokens, plus the LoRA, less the cache write)."""
    draft_ratio = curve.draft_seconds / curve.verify(curve.sizes[-1])
    return lambda length: curve.verify(length) * (1 + draft_ratio * (length > 1))


def quadratic_cost(curve: CostCurve) -> Callable[[int], float]:
    """Seconds of a quadratic self-speculation cycle of `rows` rows: one forward over rows * (rows + 1) tokens."""
    return lambda rows: curve.verify(rows * (rows + 1))


class BlockChoice:
    """Per cycle of self-speculation, the block length (1 or 2 up to `largest`) with the most expected committed
    tokens per `cost(length)` seconds, from the acceptance per position seen so far in this generation."""

    def __init__(self, cost: Callable[[int], float], smallest: int, largest: int):
        self.cost, self.smallest, self.largest = cost, smallest, largest
        self.hits = [0] * (largest - 1)  # index j - 1: draft j (the block's token j; token 0 is certain)
        self.trials = [0] * (largest - 1)
        self.wait, self.waiting = MIN_WAIT, MIN_WAIT  # AR cycles before the next probe

    def acceptances(self) -> List[float]:
        """alpha_1, alpha_2, ...: P(draft j is accepted | drafts 1..j-1 were). Draft 1 starts from the prior; a later
        draft from the estimate of the one before it, since a drafter that holds up to j-1 usually holds at j: a
        position the blocks have not reached yet is priced like the last one they did, not like the first."""
        alphas, prior = [], PRIOR_ACCEPTANCE
        for hits, trials in zip(self.hits, self.trials):
            prior = (hits + PRIOR_WEIGHT * prior) / (trials + PRIOR_WEIGHT)
            alphas.append(prior)
        return alphas

    def expected_tokens(self) -> List[float]:
        """Expected committed tokens of a block of each length 1..largest (index length - 1)."""
        return chain_tokens(self.acceptances())

    def best(self, smallest: int) -> int:
        lengths = range(smallest, self.largest + 1)
        tokens = self.expected_tokens()
        return lengths[fastest([tokens[n - 1] for n in lengths], [self.cost(n) for n in lengths])]

    def choose(self) -> int:
        """This cycle's block length. An AR step (length 1) learns nothing about the drafts, so after `wait` of them
        one cycle drafts the best longer block (a probe); the wait doubles while AR stays the best."""
        best = self.best(self.smallest)
        if best > 1:
            self.wait = self.waiting = MIN_WAIT
            return best
        if self.waiting:
            self.waiting -= 1
            return 1
        self.wait = min(2 * self.wait, MAX_WAIT)
        self.waiting = self.wait
        return self.best(min(2, self.largest))

    def observe(self, length: int, accepted: int) -> None:
        """After a cycle of `length` tokens whose first `accepted` drafts were accepted: draft j was judged only if
        it was in the block and every draft before it was accepted."""
        for j in range(1, min(accepted + 1, length - 1) + 1):
            self.trials[j - 1] += 1
            self.hits[j - 1] += j <= accepted


class FixedBlock:
    """A pinned `block_length`: the same block every cycle, whatever the acceptance."""

    def __init__(self, length: int):
        self.length = length

    def choose(self) -> int:
        return self.length

    def observe(self, length: int, accepted: int) -> None:
        pass
