"""The drafter's training loss over anchor blocks, and what the progress bar reports.

Block position k (1..B-1) predicts the token k places after its anchor. A draft is accepted up to its first
miss, so early positions matter most:
- `decay`: cross-entropy weighted exp(-(k-1)/gamma) (the DFlash paper's loss), normalised by the weights;
- `dpace`: D-PACE (arXiv 2605.18810), weights from a smooth surrogate of the expected accepted length. With
  c_k = alpha + (1 - alpha) p_k (p_k: the drafter's probability of the right token, not differentiated), the
  expected length is sum_k prod_{i<=k} c_i, and position k's weight is its share of that: the sum over
  m >= k of prod_{i<=m} c_i. Summed per block, averaged over blocks.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

LOSSES = ("decay", "dpace")


@dataclass(frozen=True)
class Objective:
    kind: str = "decay"
    gamma: float = 7.0
    alpha: float = 0.5


def default_gamma(block_size: int) -> float:
    """The published choices: 7 for blocks of 16, 4 for blocks of 8; in between, proportionally."""
    return 7.0 if block_size >= 16 else max(1.0, 4.0 * (block_size - 1) / 7)


def position_weights(objective: Objective, probabilities: mx.array, valid: mx.array) -> mx.array:
    """[J, B-1] weights (no gradient flows through them)."""
    if objective.kind == "decay":
        k = mx.arange(valid.shape[1], dtype=mx.float32)
        return mx.exp(-k / objective.gamma)[None] * valid
    smooth = mx.where(valid, objective.alpha + (1 - objective.alpha) * probabilities, 1.0)
    prefix = mx.cumprod(smooth, axis=1) * valid
    suffix = mx.cumsum(prefix[:, ::-1], axis=1)[:, ::-1]
    return mx.stop_gradient(suffix * valid)


def block_loss(objective: Objective, logits: mx.array, labels: mx.array, valid: mx.array):
    """(sum of per-block losses, token-level correctness, the position weights) for logits [J, B-1, V],
    labels/valid [J, B-1]. The weights are returned for DFlash2's selector term (training/selector.py)."""
    losses = nn.losses.cross_entropy(logits, labels, reduction="none").astype(mx.float32)
    probabilities = mx.stop_gradient(mx.exp(-losses))
    valid = valid.astype(mx.float32)
    weights = position_weights(objective, probabilities, valid)
    correct = mx.stop_gradient((mx.argmax(logits, axis=-1) == labels).astype(mx.float32) * valid)
    return weighted_blocks(objective, losses, weights), correct, weights


def weighted_blocks(objective: Objective, losses: mx.array, weights: mx.array) -> mx.array:
    """The sum over blocks of each block's weighted loss [J, B-1]: decay normalises a block by its own weights,
    D-PACE sums (its weights are the gradient of a length)."""
    per_block = (losses * weights).sum(axis=1)
    if objective.kind == "decay":
        per_block = per_block / mx.maximum(weights.sum(axis=1), 1e-6)
    return per_block.sum()


def accepted_lengths(correct: mx.array, valid: mx.array) -> mx.array:
    """Per block: 1 + the run of right proposals from position 1 (what greedy verification would commit), for
    blocks whose positions all have labels."""
    run = mx.cumprod(correct, axis=1).sum(axis=1)
    return 1 + run, valid.all(axis=1)
