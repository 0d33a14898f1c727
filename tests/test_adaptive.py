"""Adaptive speculation's choices on synthetic cost curves and drafter confidences, and the cost curve's cache."""

import json
import math
import time

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_dllm.sampler import adaptive, cost_curve
from mlx_dllm.sampler.adaptive import Adaptive, BatchWidth, Calibration, best_budget, chain_gains, kind
from mlx_dllm.sampler.cost_curve import CostCurve
from mlx_dllm.sampler.tree import Lattice

# A 2-core CPU's shape: a 16-token verify costs 2x a 1-token one; a GPU's: verify cost flat up to 32 tokens.
CPU = CostCurve((1, 2, 4, 8, 16, 32), (0.056, 0.065, 0.075, 0.089, 0.116, 0.175), draft_seconds=0.012)
GPU = CostCurve((1, 8, 32), (0.010, 0.0105, 0.012), draft_seconds=0.003)


def confidences(top: float, second: float, depths: int, width: int = 4):
    """The drafter's top `width` tokens at each depth (token ids 10*depth + rank) and their log-probabilities."""
    rest = (1 - top - second) / (width - 2)
    probs = [top, second] + [rest] * (width - 2)
    return Lattice.independent([[10 * d + r for r in range(width)] for d in range(depths)],
                               [[math.log(p) for p in probs] for _ in range(depths)])


def test_the_curve_interpolates_between_sizes_and_extends_the_last_slope():
    assert CPU.verify(1) == pytest.approx(0.056)
    assert CPU.verify(3) == pytest.approx(0.070)
    assert CPU.verify(12) == pytest.approx((0.089 + 0.116) / 2)
    assert CPU.verify(48) == pytest.approx(0.175 + 16 * (0.175 - 0.116) / 16)
    assert CostCurve((4,), (0.02,), 0.0).verify(8) == pytest.approx(0.04)


def test_calibration_starts_at_the_drafters_probability_and_learns_the_target():
    calibration = Calibration()
    assert calibration(0.85) == pytest.approx(0.85)
    for _ in range(50):
        calibration.observe(0.85, False)  # an overconfident drafter
    assert calibration(0.85) < 0.05 and calibration(0.25) == pytest.approx(0.25)  # other bins untouched
    for _ in range(200):
        calibration.observe(0.15, True)  # an underconfident one
    assert calibration(0.15) > 0.95


def test_the_best_budget_weighs_expected_tokens_against_the_verify():
    sure = [1 + k * 0.9 for k in range(33)]  # every node as good as committed
    assert best_budget(sure, GPU) == 32  # flat verify cost: take everything
    assert best_budget([1.0] + [1.01] * 32, CPU) == 0  # useless drafts: verify the anchor alone
    middling = [1.0]
    for k in range(1, 33):
        middling.append(middling[-1] + 0.7**k)  # a chain whose chance decays
    assert 0 < best_budget(middling, CPU) < best_budget(middling, GPU)


def test_a_useless_drafter_gets_ar_rounds_and_probes_that_back_off():
    policy = Adaptive(CPU, max_budget=32)
    for q in (0.35, 0.2, 0.225) * 30:
        policy.calibration.observe(q, False)  # the drafter is never right
    lattice = confidences(0.35, 0.2, depths=7)
    tree = policy.shape(0, lattice)
    assert kind(tree) == "ar" and len(tree) == 1
    policy.observe(tree, [])  # 1 token for a draft + verify: below AR's rate
    skipped = []
    for _ in range(3):
        skipped.append(policy.drafts())
    assert skipped == [False, False, True]  # MIN_WAIT AR rounds, then a probe
    policy.observe(policy.shape(0, lattice), [])
    assert [policy.drafts() for _ in range(5)] == [False] * 4 + [True]  # a failed probe doubles the wait


def test_a_good_drafter_gets_a_long_chain_and_a_split_one_a_tree():
    policy = Adaptive(CPU, max_budget=32)
    sure = policy.shape(0, confidences(0.97, 0.01, depths=7))
    assert kind(sure) == "chain" and len(sure) == 8  # the whole block, one path
    split = Adaptive(GPU, max_budget=32).shape(0, confidences(0.5, 0.45, depths=7))
    assert kind(split) == "tree" and len(split) > 8
    assert all(0 <= split.parents[row] < row for row in range(1, len(split)))


def test_rounds_that_commit_well_keep_drafting_and_reset_the_wait():
    policy = Adaptive(CPU, max_budget=32)
    lattice = confidences(0.9, 0.05, depths=7)
    policy.probes.wait = 16
    tree = policy.shape(0, lattice)
    policy.observe(tree, list(range(1, len(tree))))  # every node committed
    assert policy.drafts() and policy.probes.wait == adaptive.MIN_WAIT


def test_calibration_counts_only_nodes_the_target_judged():
    policy = Adaptive(GPU, max_budget=32)
    tree = policy.shape(0, confidences(0.5, 0.45, depths=3))
    first = [row for row in range(1, len(tree)) if tree.parents[row] == 0]
    policy.observe(tree, [first[0]])  # the first root child committed, the target stopped below it
    judged = sum(policy.calibration.trials)
    below = [row for row in range(1, len(tree)) if tree.parents[row] == first[0]]
    assert judged == len(first) + len(below)
    assert sum(policy.calibration.hits) == 1


class Tiny(nn.Module):
    def __init__(self, width: int, dtype=mx.float32):
        super().__init__()
        self.layer = nn.Linear(width, width)
        self.layer.set_dtype(dtype)


def test_a_chain_cut_after_k_drafts_gains_its_calibrated_prefix_chances():
    calibration = Calibration()
    assert chain_gains([0.9, 0.5, 0.2], calibration) == pytest.approx([1, 1.9, 2.35, 2.44])
    for _ in range(40):
        calibration.observe(0.95, False)  # the target never takes the drafter's surest tokens
    assert chain_gains([0.95, 0.95], calibration) == pytest.approx([1, 1.045, 1.047], abs=1e-3)


def batch_width(curve, rows: int, q: float, drafts: int = 7) -> int:
    """The width BatchWidth chooses for `rows` adaptive rows whose drafter gives each draft probability q."""
    gains = [chain_gains([q] * drafts, Calibration()) for _ in range(rows)]
    return BatchWidth(curve, block_size=8).width(gains, others=0, floor=1, rows=rows, blocks=rows)


def test_a_wider_batch_verifies_shorter_chains_where_forwards_cost_their_tokens():
    assert batch_width(CPU, rows=1, q=0.95) == 8  # the whole chain
    assert batch_width(CPU, rows=1, q=0.6) == 5
    assert batch_width(CPU, rows=8, q=0.6) == 3  # 8 rows x 3 tokens: shorter chains pay for more rows
    assert batch_width(CPU, rows=4, q=0.05) == 1  # a useless drafter: AR steps
    assert batch_width(GPU, rows=8, q=0.9) == 8  # a flat verify: whole chains at any batch
    assert batch_width(CPU, rows=8, q=0.9) < 8


def test_the_other_rows_widths_are_a_floor_and_their_tokens_count():
    policy = BatchWidth(CPU, block_size=8)
    useless = [chain_gains([0.01] * 7, Calibration())]
    assert policy.width(useless, others=1, floor=5, rows=2, blocks=2) == 5  # a pinned chain of 4 drafts sets it
    assert policy.width([chain_gains([0.9] * 2, Calibration())], others=0, floor=1, rows=1, blocks=1) == 3


def test_a_batch_whose_drafted_rounds_lose_to_ar_skips_the_drafter_then_probes():
    policy = BatchWidth(CPU, block_size=8)
    policy.observe(tokens=8, rows=8, width=3, blocks=8)  # one token a row at the cost of 3: slower than AR
    assert [policy.drafts() for _ in range(3)] == [False, False, True]
    fast = BatchWidth(GPU, block_size=8)
    fast.observe(tokens=24, rows=8, width=4, blocks=8)
    assert fast.drafts() and fast.ratio > 1


def test_a_measured_curve_keeps_the_fastest_time_and_never_falls(monkeypatch):
    """Other work only adds time: each size keeps its fastest forward, and a size slower than a larger one (a busy
    moment through all its repeats) takes the larger one's time, so one disturbed size cannot raise the sizes after
    it."""
    clock = iter([0.0, 0.3, 1.0, 4.7, 5.0, 5.2,  # size 1 (after an untimed warm-up): 0.3, 3.7 and 0.2 seconds
                  6.0, 6.1, 7.0, 7.1, 8.0, 8.1,  # size 2: 0.1 each, below size 1's
                  9.0, 9.9, 10.0, 10.9, 11.0, 11.9,  # size 3: 0.9 each, a busy moment
                  12.0, 12.4, 13.0, 13.4, 14.0, 14.4,  # size 4: 0.4 each
                  15.0, 15.05, 16.0, 16.05, 17.0, 17.05])  # the draft: 0.05 each
    monkeypatch.setattr(cost_curve.time, "perf_counter", lambda: next(clock))
    curve = cost_curve.measure(lambda n: None, lambda: None, [1, 2, 3, 4])
    assert curve.seconds == pytest.approx((0.1, 0.1, 0.4, 0.4)) and curve.draft_seconds == pytest.approx(0.05)


def test_the_key_follows_shapes_and_dtypes_not_values():
    assert cost_curve.curve_key(Tiny(8), Tiny(4)) == cost_curve.curve_key(Tiny(8), Tiny(4))  # other random values
    assert cost_curve.curve_key(Tiny(8), Tiny(4)) != cost_curve.curve_key(Tiny(16), Tiny(4))
    assert cost_curve.curve_key(Tiny(8), Tiny(4)) != cost_curve.curve_key(Tiny(8, mx.float16), Tiny(4))
    assert cost_curve.curve_key(Tiny(8), Tiny(4), 8) != cost_curve.curve_key(Tiny(8), Tiny(4), 4)


def test_a_curve_is_measured_once_then_read_and_measured_again_when_stale_or_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv(cost_curve.FOLDER_VARIABLE, str(tmp_path))
    measured = []

    def timing(sizes):
        return cost_curve.measure(measured.append, lambda: None, sizes)

    def curve():
        return cost_curve.cost_curve("pair", 9, timing)

    first = curve()
    assert first.sizes == (1, 2, 3, 4, 6, 8, 9) and len(measured) == 7 * (1 + cost_curve.REPEATS)
    assert curve() == first and len(measured) == 28  # read back, not measured
    assert cost_curve.cost_curve("pair", 12, timing).sizes[-1] == 12  # a longer one is measured
    file = tmp_path / "pair.json"
    saved = json.loads(file.read_text())
    saved["measured_at"] = time.time() - cost_curve.STALE_AFTER_S - 1
    file.write_text(json.dumps(saved))
    count = len(measured)
    curve()
    assert len(measured) > count  # stale: measured again
    file.write_text("{not json")
    count = len(measured)
    assert curve().sizes[-1] == 9 and len(measured) > count
    assert not list(tmp_path.glob(".*partial"))


def test_a_lattice_is_priced_and_calibrated_by_each_candidates_chance_given_its_parent():
    """A DFlash2-like lattice: after depth 1's first candidate, depth 2's second is the sure one. The policy's chain
    follows that, and the calibration learns from the conditional probabilities (0.9, then 0.95)."""
    log = math.log
    lattice = Lattice(
        tokens=[[10, 11], [20, 21]],
        ranked=[[[0, 1]], [[1, 0], [0, 1]]],
        log_probs=[[[log(0.9), log(0.1)]], [[log(0.95), log(0.05)], [log(0.5), log(0.5)]]],
    )
    policy = Adaptive(CPU, max_budget=2)
    tree = policy.shape(0, lattice)
    assert kind(tree) == "chain" and tree.lineage(len(tree) - 1) == [10, 21]
    policy.observe(tree, [1, 2])
    assert policy.calibration.trials[9] == 2 and policy.calibration.hits[9] == 2
