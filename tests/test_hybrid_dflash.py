"""DFlash on hybrid targets (Gated DeltaNet, Mamba-2, short convolutions) and Gemma 4, converted and loaded as a
user's would be: greedy output equals mlx-lm's greedy AR, every rollback restores exactly the state of a fresh
prefill of the kept text, and sampled output follows the target's distribution."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_dllm import load, stream_generate
from mlx_dllm.models.recurrent import RecurrentRollback
from mlx_dllm.models.target import Target
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.oracle import Oracle

hybrid = pytest.importorskip("tests.reference.hybrid")
VOCAB = 256
PROMPT = [100, 3, 3, 250, 7, 64, 12]
PATTERN = [7, 0, 3, 7, 1, 5, 2]  # correct proposals per round: all of a block of 8, none, part


@pytest.fixture(scope="module")
def loaded(hybrid_checkpoints):
    """name -> (target, tokenizer, drafter), loaded by our loader from our conversions."""
    result = {}
    for name, checkpoint in hybrid_checkpoints.items():
        target, tokenizer = load(str(checkpoint["target"]))
        draft, _ = load(str(checkpoint["draft"]))
        tokenizer._eos_token_ids = set()  # every run goes the full length
        result[name] = (target, tokenizer, draft)
    return result


def mlx_lm_greedy(target, prompt, max_tokens):
    return [int(token) for token, _ in generate_step(mx.array(prompt), target, max_tokens=max_tokens)]


def run(target, tokenizer, prompt, max_tokens, **options):
    tokens, last = [], None
    for response in stream_generate(target, tokenizer, prompt, max_tokens, **options):
        tokens, last = tokens + response.tokens, response
    return tokens, last


@pytest.mark.parametrize("name", list(hybrid.HYBRID_TARGETS))
def test_greedy_dflash_equals_mlx_lm_ar(loaded, monkeypatch, name):
    """Rounds accept all, none and part of a block, so the caches roll back by every amount (a recurrent first,
    last or middle layer; Gemma 4's window of 8 is far shorter than the 64 generated tokens)."""
    target, tokenizer, draft = loaded[name]
    reference = mlx_lm_greedy(target, PROMPT, 64)
    oracle = Oracle(dflash_strategy.propose_block, reference, len(PROMPT), PATTERN, VOCAB)
    monkeypatch.setattr(dflash_strategy, "propose_block", oracle)
    tokens, last = run(target, tokenizer, PROMPT, 64, draft_model=draft, speculation="chain")
    assert tokens == reference
    assert {1, 8} <= set(oracle.expected_accepts) and any(1 < a < 8 for a in oracle.expected_accepts)
    assert last.acceptance_length == pytest.approx(np.mean(oracle.expected_accepts))


@pytest.mark.parametrize("name", list(hybrid.HYBRID_TARGETS))
def test_greedy_dflash_with_the_drafters_own_proposals(loaded, name):
    target, tokenizer, draft = loaded[name]
    tokens, _ = run(target, tokenizer, PROMPT, 24, draft_model=draft, block_size=4)
    assert tokens == mlx_lm_greedy(target, PROMPT, 24)


def layer_arrays(cache):
    """What a layer cache holds for the tokens it has seen: K/V rows up to its offset, or its recurrent states."""
    if hasattr(cache, "cache"):
        return list(cache.cache)
    keys, values = cache.state[:2]
    return [keys[..., : cache.size(), :], values[..., : cache.size(), :]]


@pytest.mark.parametrize("kept", [1, 4, 8], ids=["all-rejected", "part-accepted", "all-accepted"])
@pytest.mark.parametrize("name", list(hybrid.HYBRID_TARGETS))
def test_rollback_equals_a_fresh_prefill_of_the_kept_text(loaded, name, kept):
    target_model, _, draft = loaded[name]
    target = Target(target_model, draft.args.target_layer_ids)
    block = [9, 200, 31, 4, 77, 150, 2, 60]
    cache = target.make_cache()
    target(mx.array([PROMPT]), cache)
    cache.mark()
    target(mx.array([block]), cache)
    cache.keep(kept)
    fresh = target.make_cache()
    target(mx.array([PROMPT + block[:kept]]), fresh)
    recurrent = sum(isinstance(r, RecurrentRollback) for r in cache.rollbacks)
    assert recurrent >= 2 or name.startswith("gemma4")
    for ours, expected in zip(cache, fresh):
        assert type(ours) is type(expected) and getattr(ours, "offset", 0) == getattr(expected, "offset", 0)
        for a, b in zip(layer_arrays(ours), layer_arrays(expected)):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-5)
    # And the next forward reads the rolled-back state as it would the fresh one.
    following = mx.array([[block[kept % 8]]])
    np.testing.assert_allclose(np.array(target(following, cache)[0]), np.array(target(following, fresh)[0]), atol=1e-5)


def ks_uniform_p_value(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov test of `u` against Uniform(0, 1): the asymptotic p-value."""
    u, n = np.sort(u), len(u)
    d = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    k = np.arange(1, 101)
    return float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * (k * d) ** 2 * n)))))


def randomized_pit(target, prompt, runs, seed=0) -> np.ndarray:
    """For each run (t1, t2, t3): where t3 falls in the target's own p(. | prompt t1 t2), tokens ordered from the most
    likely, randomized within its own mass. Uniform(0, 1) exactly when every t3 is a draw from that distribution."""
    probabilities = np.array(mx.softmax(target(mx.array([prompt + run[:2] for run in runs]))[:, -1], axis=-1))
    uniform = np.random.default_rng(seed).random(len(runs))
    u = []
    for p, run, r in zip(probabilities.astype(np.float64), runs, uniform):
        order = np.argsort(-p, kind="stable")
        rank = int(np.flatnonzero(order == run[2])[0])
        u.append(p[order[:rank]].sum() + r * p[run[2]])
    return np.array(u)


@pytest.mark.parametrize("scheme", ["matched", "sampled"])
@pytest.mark.parametrize("broken", [False, True], ids=["rolled-back", "never-rolled-back"])
def test_sampled_dflash_follows_the_target_distribution(loaded, monkeypatch, broken, scheme):
    """Blocks of 2, mostly rejected, so the third token is drawn after a rollback of the recurrent states: "matched",
    the target's second most likely token after the anchor matched against its draw (a caller's own `sampler=`);
    "sampled", the tiny random drafter's own sampled proposal, ratio-tested (temp=1.0). Each third token is checked
    against the target's own distribution given the two tokens before it (a randomized probability integral
    transform), which a marginal over all (t1, t2) would wash out."""
    target, tokenizer, draft = loaded["qwen3_5"]
    prompt, samples = PROMPT[:4], 300
    propose_block = dflash_strategy.propose_block

    def propose_runner_up(draft, target_adapter, anchor, features, draft_cache, size, head):
        propose_block(draft, target_adapter, anchor, features, draft_cache, size, head)
        return mx.argsort(target(mx.array([prompt + [anchor]]))[0, -1])[-2:-1]

    monkeypatch.setattr(dflash_strategy, "propose_block", propose_runner_up)
    if broken:
        monkeypatch.setattr(RecurrentRollback, "keep", lambda self, n: setattr(self, "saved", None))
    mx.random.seed(1234)
    sampling = dict(sampler=make_sampler(temp=1.0)) if scheme == "matched" else dict(temp=1.0)
    options = dict(draft_model=draft, block_size=2, speculation="chain", **sampling)
    runs = [run(target, tokenizer, prompt, 3, **options)[0] for _ in range(samples)]
    p_value = ks_uniform_p_value(randomized_pit(target, prompt, runs))
    if broken:
        assert p_value < 1e-3, "the test cannot tell a missing rollback apart"
    else:
        assert p_value > 1e-3, p_value


@pytest.mark.parametrize("name", list(hybrid.HYBRID_TARGETS))
def test_features_are_the_reference_hidden_states(hybrid_checkpoints, loaded, name):
    """The drafter reads what z-lab's PyTorch loop reads: transformers' `hidden_states[layer_id + 1]` of the target
    (the last layer's final-normed), for a first, a middle and the last layer of every family."""
    import torch

    target_model, _, draft = loaded[name]
    ids = PROMPT + [9, 200, 31, 4, 77]
    target = Target(target_model, draft.args.target_layer_ids)
    _, features = target(mx.array([ids]), target.make_cache())
    reference = hybrid_checkpoints[name]["target_model"]
    with torch.no_grad():
        states = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([states[i + 1] for i in draft.args.target_layer_ids], dim=-1).float().cpu().numpy()
    np.testing.assert_allclose(np.array(features), expected, atol=2e-4, rtol=1e-4)
