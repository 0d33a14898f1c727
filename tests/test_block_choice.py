"""Self-speculation's block choice (Nemotron-Labs-Diffusion's linear and quadratic modes) on synthetic cost curves
and acceptance histories."""

import pytest

from mlx_dllm.sampler.adaptive import (
    MAX_WAIT,
    MIN_WAIT,
    PRIOR_ACCEPTANCE,
    BlockChoice,
    FixedBlock,
    linear_cost,
    quadratic_cost,
)
from mlx_dllm.sampler.cost_curve import CostCurve

# A Mac GPU's shape for a small model: a forward costs about the same up to 72 tokens. A 2-core CPU's: the cost grows
# with the tokens.
FLAT = CostCurve((1, 72), (0.010, 0.011), draft_seconds=0.011)
STEEP = CostCurve((1, 8, 32, 72), (0.050, 0.090, 0.200, 0.400), draft_seconds=0.400)


def linear(curve=FLAT, largest=32):
    return BlockChoice(linear_cost(curve), 1, largest)


def quadratic(curve=FLAT, largest=8):
    return BlockChoice(quadratic_cost(curve), 2, largest)


def run(policy, cycles, accepted_of):
    """`cycles` cycles, each accepting `accepted_of(length)` of its drafts; the lengths chosen."""
    lengths = []
    for _ in range(cycles):
        length = policy.choose()
        policy.observe(length, accepted_of(length))
        lengths.append(length)
    return lengths


def test_the_costs_of_a_cycle():
    cost = linear_cost(STEEP)
    assert cost(1) == pytest.approx(0.050)  # an AR step: the verify alone
    assert cost(8) == pytest.approx(2 * 0.090)  # the draft timed as long as the verify at 72 tokens: as long at 8
    halved = linear_cost(CostCurve(STEEP.sizes, STEEP.seconds, draft_seconds=0.200))
    assert halved(8) == pytest.approx(1.5 * 0.090)
    assert quadratic_cost(STEEP)(4) == pytest.approx(STEEP.verify(20))


def test_expected_tokens_multiply_the_acceptance_along_the_block():
    policy = linear(largest=4)
    assert policy.acceptances() == pytest.approx([PRIOR_ACCEPTANCE] * 3)  # nothing seen: the prior
    policy.hits, policy.trials = [8, 2, 0], [8, 8, 0]
    alphas = policy.acceptances()
    assert alphas[0] == pytest.approx((8 + 2 * PRIOR_ACCEPTANCE) / 10)
    assert alphas[1] == pytest.approx((2 + 2 * alphas[0]) / 10)  # the prior of a draft: the estimate before it
    assert alphas[2] == pytest.approx(alphas[1])  # never judged
    expected = [1, 1 + alphas[0], 1 + alphas[0] + alphas[0] * alphas[1]]
    expected.append(expected[-1] + alphas[0] * alphas[1] * alphas[2])
    assert policy.expected_tokens() == pytest.approx(expected)


def test_only_judged_positions_are_counted():
    policy = linear(largest=8)
    policy.observe(6, 2)  # drafts 1, 2 accepted, 3 rejected, 4 and 5 never judged
    assert policy.trials == [1, 1, 1, 0, 0, 0, 0] and policy.hits == [1, 1, 0, 0, 0, 0, 0]
    policy.observe(3, 2)  # both drafts accepted: nothing past the block is judged
    assert policy.trials == [2, 2, 1, 0, 0, 0, 0] and policy.hits == [2, 2, 0, 0, 0, 0, 0]
    policy.observe(1, 0)  # an AR step judges no draft
    policy.observe(5, 0)
    assert policy.trials == [3, 2, 1, 0, 0, 0, 0] and policy.hits == [2, 2, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("curve", [FLAT, STEEP], ids=["flat", "steep"])
def test_drafts_never_accepted_give_ar_steps_or_the_fewest_rows(curve):
    lengths = run(linear(curve), 40, lambda length: 0)
    assert lengths[-1] == 1 and lengths.count(1) > 30
    assert run(quadratic(curve), 20, lambda rows: 0)[-5:] == [2] * 5


def test_drafts_always_accepted_on_a_flat_curve_give_the_longest_block():
    assert run(linear(), 10, lambda length: length - 1)[1:] == [32] * 9
    assert run(quadratic(), 10, lambda rows: rows - 1) == [8] * 10


def test_the_first_cycles_are_optimistic():
    assert linear().choose() >= 8 and quadratic().choose() == 8  # the prior alone, on a flat curve


def test_a_steep_curve_and_middling_acceptance_give_a_block_in_between():
    def halfway(length):  # the first three drafts are accepted, never the fourth
        return min(length - 1, 3)

    lengths = run(linear(STEEP), 30, halfway)
    assert 1 < lengths[-1] < 32 and lengths[-1] <= 5
    rows = run(quadratic(STEEP), 30, halfway)
    assert 2 < rows[-1] < 8
    assert run(linear(FLAT), 30, halfway)[-1] >= 4  # a flat curve takes every draft with a chance


def test_ar_steps_probe_the_drafts_again_after_a_growing_wait():
    policy = linear(STEEP)
    for _ in range(20):
        policy.observe(8, 0)  # the first draft is always wrong
    chosen = [policy.choose() for _ in range(MIN_WAIT + 1 + 2 * MIN_WAIT + 1)]
    probes = [i for i, length in enumerate(chosen) if length > 1]
    assert probes == [MIN_WAIT, MIN_WAIT + 1 + 2 * MIN_WAIT]  # the wait doubles while AR stays the best
    policy.wait = MAX_WAIT
    policy.hits[0] = policy.trials[0]  # the probes found the drafts good again
    assert policy.choose() > 1 and policy.wait == MIN_WAIT


def test_a_pinned_block_never_changes():
    pinned = FixedBlock(5)
    pinned.observe(5, 0)
    assert [pinned.choose() for _ in range(3)] == [5, 5, 5]
