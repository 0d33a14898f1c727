"""DFlash decoding is lossless: greedy equals target-only greedy (ours, mlx-lm's and transformers'),
and sampled output follows the target's own distribution."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_dllm import load, stream_generate
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.oracle import Oracle

harness = pytest.importorskip("tests.reference.harness")

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12], [77]]
MAX_TOKENS = 21


@pytest.fixture(scope="module")
def loaded(mlx_checkpoints):
    """name -> (target, tokenizer, draft): converted by our converter, loaded by our loader."""
    result = {}
    for name, checkpoint in mlx_checkpoints.items():
        target, tokenizer = load(str(checkpoint["target"]))
        draft, _ = load(str(checkpoint["draft"]))
        result[name] = (target, tokenizer, draft)
    return result


def _generate(target, tokenizer, prompt, max_tokens, **options):
    tokens, last = [], None
    for response in stream_generate(target, tokenizer, prompt, max_tokens, **options):
        tokens += response.tokens
        last = response
    return tokens, last


def _mlx_lm_greedy(target, prompt, max_tokens):
    steps = generate_step(mx.array(prompt), target, max_tokens=max_tokens)
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("name", list(harness.TARGETS))
def test_greedy_dflash_equals_reference_and_ar(hf_checkpoints, loaded, name):
    target, tokenizer, draft = loaded[name]
    checkpoint = hf_checkpoints[name]
    for prompt in PROMPTS:
        transformers_dflash = harness.reference_dflash_greedy(
            checkpoint["target_model"], checkpoint["draft_model"], prompt, MAX_TOKENS
        )
        mlx_lm_ar = _mlx_lm_greedy(target, prompt, MAX_TOKENS)
        ours_ar, _ = _generate(target, tokenizer, prompt, MAX_TOKENS)
        assert ours_ar == mlx_lm_ar
        assert transformers_dflash == mlx_lm_ar
        for block_size in (2, 5, 8):  # 8 is larger than the tokens left in the last rounds
            ours, last = _generate(target, tokenizer, prompt, MAX_TOKENS, draft_model=draft, block_size=block_size)
            assert ours == mlx_lm_ar, (name, prompt, block_size)
            assert last.generation_tokens == MAX_TOKENS and last.finish_reason == "length"


@pytest.mark.parametrize("name", list(harness.TARGETS))
def test_lossless_with_high_acceptance(loaded, monkeypatch, name):
    """Accepted, partly accepted and rejected blocks roll the target back exactly (sliding layers too:
    the window of 8 is far shorter than the 40 generated tokens)."""
    target, tokenizer, draft = loaded[name]
    prompt, max_tokens = PROMPTS[1], 40
    reference = _mlx_lm_greedy(target, prompt, max_tokens)
    oracle = Oracle(dflash_strategy.propose_block, reference, len(prompt), [7, 0, 3, 7, 1, 5, 2], harness.VOCAB)
    monkeypatch.setattr(dflash_strategy, "propose_block", oracle)
    ours, last = _generate(target, tokenizer, prompt, max_tokens, draft_model=draft, block_size=8, speculation="chain")
    assert ours == reference
    assert last.acceptance_length == pytest.approx(np.mean(oracle.expected_accepts))
    assert last.acceptance_length > 2.5
    assert last.forwards == len(oracle.expected_accepts)  # one verify per round; the prefill is not counted


def _second_token_distribution(target, prompt):
    """Exact marginal of the second generated token at temperature 1: sum_t1 p(t1) p(t2 | t1)."""
    first = mx.softmax(target(mx.array([prompt]))[0, -1].astype(mx.float32))
    batch = mx.array([prompt + [t] for t in range(harness.VOCAB)])
    second = mx.softmax(target(batch)[:, -1].astype(mx.float32), axis=-1)
    return np.array(first @ second, dtype=np.float64)


def _chi_square_p_value(observed, expected_probabilities, samples):
    expected = expected_probabilities * samples
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    statistic = float(((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
    dof = len(observed) - 1
    # Wilson-Hilferty: chi-square -> standard normal, precise enough for a 1e-3 threshold.
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("broken", [False, True], ids=["exact-match", "accept-everything"])
def test_sampled_dflash_follows_target_distribution(loaded, monkeypatch, broken):
    """Deterministic proposals matched against the target's own draw (the scheme a caller's own `sampler=` keeps;
    tests/test_sampled_chain.py checks sampled proposals): the target's own argmax, so they are accepted often and a
    wrong rule shows."""
    target, tokenizer, draft = loaded["qwen3_gqa"]
    prompt, samples = PROMPTS[0], 600
    propose_block = dflash_strategy.propose_block

    def propose_target_argmax(draft, target_adapter, anchor, features, draft_cache, size, head):
        propose_block(draft, target_adapter, anchor, features, draft_cache, size, head)
        return mx.argmax(target(mx.array([prompt + [anchor]]))[0, -1:], axis=-1)

    monkeypatch.setattr(dflash_strategy, "propose_block", propose_target_argmax)
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])  # the marginal counts every token, EOS included
    if broken:
        monkeypatch.setattr(dflash_strategy, "_accepted_prefix", lambda drafts, targets: len(drafts))
    mx.random.seed(1234)
    counts = np.zeros(harness.VOCAB)
    for _ in range(samples):
        tokens, _ = _generate(
            target, tokenizer, prompt, 2, draft_model=draft, sampler=make_sampler(temp=1.0), speculation="chain"
        )
        counts[tokens[1]] += 1
    p_value = _chi_square_p_value(counts, _second_token_distribution(target, prompt), samples)
    if broken:
        assert p_value < 1e-3, "the chi-square test cannot tell a wrong acceptance rule apart"
    else:
        assert p_value > 1e-3, p_value
