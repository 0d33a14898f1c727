"""DFlash with a draft tree (speculation='tree'): lossless greedy, the target's own distribution when sampled, more
accepted per round than the chain when the drafter's second choice is right."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mlx_dllm import DLLMError, load, stream_generate
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.test_hybrid_dflash import ks_uniform_p_value, randomized_pit
from tests.test_target_families import make_drafter, make_target

pytest.importorskip("tests.reference.harness")

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12]]


@pytest.fixture(params=["qwen3_gqa", "ministral_sliding"])
def either(request, models):
    """(target, tokenizer, drafter): plain K/V, then sliding-window layers (a window of 8) beside full ones."""
    if request.param == "qwen3_gqa":
        return models
    checkpoint = request.getfixturevalue("mlx_checkpoints")[request.param]
    target, tokenizer = load(str(checkpoint["target"]))
    draft, _ = load(str(checkpoint["draft"]))
    return target, tokenizer, draft


def run(target, tokenizer, prompt, max_tokens, **options):
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens, **options))
    return [t for r in responses for t in r.tokens], responses[-1]


def greedy_ar(target, prompt, max_tokens):
    return [int(token) for token, _ in generate_step(mx.array(prompt), target, max_tokens=max_tokens)]


@pytest.mark.parametrize("budget", [1, 3, 8, 16])
def test_greedy_tree_output_is_mlx_lm_greedy_ar(either, budget):
    target, tokenizer, draft = either
    for prompt in PROMPTS:
        ours, last = run(target, tokenizer, prompt, 40, draft_model=draft, speculation="tree", tree_budget=budget)
        assert ours == greedy_ar(target, prompt, 40)[: len(ours)] and len(ours) >= 30
        assert last.mode == "dflash" and last.acceptance_length >= 1.0


def second_choice_is_right(monkeypatch, target, prompt, width):
    """The drafter's top token at every depth is wrong and its second is the true greedy one: the chain rejects
    every round, a tree holding second choices accepts them."""
    reference = greedy_ar(target, prompt, 64)
    real = dflash_strategy.TreeVerify.propose

    def propose(self, anchor, features, draft_cache, size):
        real(self, anchor, features, draft_cache, size)  # the drafter's cache moves as in a real run
        start = draft_cache[0].offset - len(prompt)  # the anchor's index in the generated text
        truth = reference[start + 1 : start + size]
        tokens = [[(t + 1) % 256, t] + [(t + 2 + k) % 256 for k in range(width - 2)] for t in truth]
        log_probs = [[0.0, -0.1] + [-5.0] * (width - 2) for _ in truth]  # a binary tree of the top two
        return mx.array(tokens), mx.array(log_probs)

    monkeypatch.setattr(dflash_strategy.TreeVerify, "propose", propose)
    return reference


def test_a_tree_accepts_what_the_chain_rejects(either, monkeypatch):
    target, tokenizer, draft = either
    prompt = PROMPTS[1]
    reference = second_choice_is_right(monkeypatch, target, prompt, 4)
    ours, last = run(target, tokenizer, prompt, 32, draft_model=draft, speculation="tree", tree_budget=16, block_size=4)
    assert ours == reference[:32]
    assert last.acceptance_length > 2.5  # up to 3 drafts + the bonus per round


def test_sampled_tree_follows_the_target_distribution(models, monkeypatch):
    """Trees of the drafter's top-2 at 2 depths at temperature 1; each third token is checked against the target's
    own distribution given the two before it. The control commits the drafter's first choice without looking at
    the target's draws: the test must tell it apart."""
    target, tokenizer, draft = models
    prompt, samples = PROMPTS[0], 300
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])  # every run has its three tokens

    def sample(control: bool):
        if control:
            # The target's draw after the first node, committed as if it came after the anchor.
            monkeypatch.setattr(dflash_strategy, "follow", lambda tree, chosen: ([], chosen[1]))
        mx.random.seed(1234)
        return [
            run(
                target,
                tokenizer,
                prompt,
                3,
                draft_model=draft,
                temp=1.0,
                block_size=3,
                speculation="tree",
                tree_budget=4,
            )[0]
            for _ in range(samples)
        ]

    assert ks_uniform_p_value(randomized_pit(target, prompt, sample(False))) > 1e-3
    assert ks_uniform_p_value(randomized_pit(target, prompt, sample(True))) < 1e-3


def test_trees_are_refused_in_one_line_where_they_cannot_run(models):
    target, tokenizer, draft = models
    hybrid = make_target("qwen3_next")
    with pytest.raises(DLLMError, match=r"ArraysCache \(recurrent\) layers: each tree node would need its own"):
        next(stream_generate(hybrid, tokenizer, PROMPTS[0], 8, draft_model=make_drafter(), speculation="tree"))
    with pytest.raises(DLLMError, match="tree_budget applies to speculation='tree', not to a chain"):
        next(stream_generate(target, tokenizer, PROMPTS[0], 8, draft_model=draft, speculation="chain", tree_budget=4))
    with pytest.raises(DLLMError, match="speculation must be one of chain, tree, got 'bush'"):
        next(stream_generate(target, tokenizer, PROMPTS[0], 8, draft_model=draft, speculation="bush"))
