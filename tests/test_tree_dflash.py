"""DFlash with a draft tree (speculation='tree'): lossless greedy, the target's own distribution when sampled, more
accepted per round than the chain when the drafter's second choice is right."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mlx_dllm import DLLMError, load, stream_generate
from mlx_dllm.benchmark.tiny import build_tiny
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.sampler.cost_curve import CostCurve
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


# A machine where a verify of up to 32 tokens costs what one AR step does (a GPU, for a small model).
FLAT = CostCurve((1, 32), (0.010, 0.010), draft_seconds=0.002)


def machine(monkeypatch, curve: CostCurve) -> None:
    """Auto decides on `curve` instead of this machine's measured one (the tiny models' times are noise)."""
    monkeypatch.setattr(dflash_strategy, "measured_costs", lambda *args: curve)


def run(target, tokenizer, prompt, max_tokens, **options):
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens, **options))
    return [t for r in responses for t in r.tokens], responses[-1]


def greedy_ar(target, prompt, max_tokens):
    return [int(token) for token, _ in generate_step(mx.array(prompt), target, max_tokens=max_tokens)]


@pytest.mark.parametrize("speculation, budget", [("tree", 1), ("tree", 3), ("tree", 8), ("tree", 16), ("auto", None)])
def test_greedy_tree_output_is_mlx_lm_greedy_ar(either, speculation, budget):
    target, tokenizer, draft = either
    for prompt in PROMPTS:
        ours, last = run(target, tokenizer, prompt, 40, draft_model=draft, speculation=speculation, tree_budget=budget)
        assert ours == greedy_ar(target, prompt, 40)[: len(ours)] and len(ours) >= 30
        shares = sum(last.speculation[k] for k in ("ar", "chain", "tree"))
        assert last.mode == "dflash" and shares == pytest.approx(1, abs=0.01)


def second_choice_is_right(monkeypatch, target, prompt, width):
    """The drafter's top token at every depth is wrong and its second is the true greedy one: the chain rejects
    every round, a tree holding second choices accepts them."""
    reference = greedy_ar(target, prompt, 64)
    real = dflash_strategy.TreeVerify.propose

    def propose(self, anchor, features, size, cache, draft_cache):
        step = real(self, anchor, features, size, cache, draft_cache)  # the drafter's cache moves as in a real run
        if isinstance(step, dflash_strategy.Step):
            return step
        start = draft_cache[0].offset - len(prompt)  # the anchor's index in the generated text
        truth = reference[start + 1 : start + size]
        tokens = [[(t + 1) % 256, t] + [(t + 2 + k) % 256 for k in range(width - 2)] for t in truth]
        log_probs = [[0.0, -0.1] + [-5.0] * (width - 2) for _ in truth]  # a binary tree of the top two
        return dflash_strategy.independent_lattice(mx.array(tokens), mx.array(log_probs))

    monkeypatch.setattr(dflash_strategy.TreeVerify, "propose", propose)
    return reference


@pytest.mark.parametrize("speculation", ["tree", "auto"])
def test_a_tree_accepts_what_the_chain_rejects(either, monkeypatch, speculation):
    target, tokenizer, draft = either
    prompt = PROMPTS[1]
    reference = second_choice_is_right(monkeypatch, target, prompt, 4)
    machine(monkeypatch, FLAT)
    ours, last = run(target, tokenizer, prompt, 32, draft_model=draft, speculation=speculation, tree_budget=16,
                     block_size=4)
    assert ours == reference[:32]
    assert last.acceptance_length > 2.5  # up to 3 drafts + the bonus per round
    # A pinned tree is a tree every round; auto may learn that second choices win and verify them as chains.
    assert last.speculation["tree"] == 1.0 if speculation == "tree" else last.speculation["ar"] < 0.2


def test_auto_goes_ar_when_the_drafter_is_always_wrong_and_stays_lossless(models, monkeypatch):
    """Sure of a wrong token at every depth: after a few drafted rounds, auto stops paying the drafter."""
    target, tokenizer, draft = models
    prompt = PROMPTS[0]
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    real = dflash_strategy.TreeVerify.propose

    def propose(self, anchor, features, size, cache, draft_cache):
        step = real(self, anchor, features, size, cache, draft_cache)
        if isinstance(step, dflash_strategy.Step):
            return step
        wrong = [[(anchor + 1 + k) % 256 for k in range(4)] for _ in range(size - 1)]  # the target never says these
        return dflash_strategy.independent_lattice(mx.array(wrong), mx.array([[-0.01, -5.0, -6.0, -7.0]] * (size - 1)))

    monkeypatch.setattr(dflash_strategy.TreeVerify, "propose", propose)
    monkeypatch.setattr(dflash_strategy, "follow", lambda tree, chosen: ([], chosen[0]))  # it never matches
    machine(monkeypatch, FLAT)  # even where verifying is free, a useless drafter costs its forward
    ours, last = run(target, tokenizer, prompt, 48, draft_model=draft)
    assert ours == greedy_ar(target, prompt, 48)
    assert last.speculation["ar"] > 0.7 and last.draft_forwards < 15


@pytest.fixture(params=["dflash", "dflash2"])
def drafters(request, models, tmp_path_factory):
    """(target, tokenizer, drafter): a DFlash drafter, then a DFlash2 one (trees through its candidate lattice)."""
    if request.param == "dflash":
        return models
    target, draft = build_tiny("dflash2", tmp_path_factory.mktemp("tiny"))
    return (*load(str(target)), load(str(draft))[0])


@pytest.mark.parametrize("speculation", ["tree", "auto"])
def test_sampled_tree_follows_the_target_distribution(drafters, monkeypatch, speculation):
    """Trees of the drafter's top-2 at 2 depths at temperature 1; each third token is checked against the target's
    own distribution given the two before it. The control commits the drafter's first choice without looking at
    the target's draws: the test must tell it apart."""
    target, tokenizer, draft = drafters
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
                speculation=speculation,
                tree_budget=4,
            )[0]
            for _ in range(samples)
        ]

    assert ks_uniform_p_value(randomized_pit(target, prompt, sample(False))) > 1e-3
    if speculation == "tree":  # auto's second round may be an AR step, which the control does not bend
        assert ks_uniform_p_value(randomized_pit(target, prompt, sample(True))) < 1e-3


def test_trees_are_refused_in_one_line_where_they_cannot_run(models):
    target, tokenizer, draft = models
    hybrid = make_target("qwen3_next")
    with pytest.raises(DLLMError, match=r"ArraysCache \(recurrent\) layers: each tree node would need its own"):
        next(stream_generate(hybrid, tokenizer, PROMPTS[0], 8, draft_model=make_drafter(), speculation="tree"))
    with pytest.raises(DLLMError, match="tree_budget applies to speculation='tree' or 'auto', not to a chain"):
        next(stream_generate(target, tokenizer, PROMPTS[0], 8, draft_model=draft, speculation="chain", tree_budget=4))
    with pytest.raises(DLLMError, match="speculation must be one of auto, chain, tree, got 'bush'"):
        next(stream_generate(target, tokenizer, PROMPTS[0], 8, draft_model=draft, speculation="bush"))
