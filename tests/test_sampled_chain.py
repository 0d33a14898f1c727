"""Sampled chain proposals (speculation='chain' at temp > 0 with mlx-lm's temp/top_p/top_k/min_p): the explicit
distribution of a sampling configuration equals what mlx-lm's sampler draws from; proposals drawn from the drafter
and ratio-tested give the target's exact distribution (and two broken rules do not); they accept more than argmax
proposals matched against the target's draw when the drafter's q is the target's p; greedy stays greedy."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

import mlx_dllm
from mlx_dllm.benchmark.tiny import VOCAB
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.sampler.common import Sampling, TokenSelector, make_token_selector
from tests.oracle import tiny_pairs

PROMPT = [5, 17, 42, 9]
CONFIGS = {"temp-1": Sampling(1.0), "temp-0.7-top_p-0.9": Sampling(0.7, top_p=0.9)}


def chi_square_p_value(observed, expected_probabilities, samples):
    """Pearson's chi-square (cells expecting under 5 pooled), Wilson-Hilferty's normal approximation."""
    expected = expected_probabilities * samples
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    if observed[~keep].sum() > 0:
        return 0.0  # a draw where the distribution has no mass
    dof = keep.sum() - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def ks_uniform_p_value(u: np.ndarray) -> float:
    u, n = np.sort(u), len(u)
    d = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    k = np.arange(1, 101)
    return float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * (k * d) ** 2 * n)))))


def _reference_distribution(logits: np.ndarray, config: Sampling) -> np.ndarray:
    """make_sampler's documented semantics, written out in numpy: on the untempered probabilities, top_p keeps a
    token while the mass of the tokens more probable than it is below top_p, min_p keeps those at least min_p x the
    top one, top_k the k most probable left; then softmax(log p / temp) over what is kept."""
    log_p = logits - np.logaddexp.reduce(logits)
    p = np.exp(log_p)
    keep = np.ones_like(p, dtype=bool)
    if config.top_p < 1:
        order = np.argsort(-p, kind="stable")
        above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep[order[above >= config.top_p]] = False
    if config.min_p > 0:
        keep &= p >= config.min_p * p.max()
    if config.top_k:
        ranked = [t for t in np.argsort(-p, kind="stable") if keep[t]]
        keep[:] = False
        keep[ranked[: config.top_k]] = True
    scores = np.where(keep, log_p / config.temp, -np.inf)
    return np.exp(scores - np.logaddexp.reduce(scores))


SAMPLER_CONFIGS = [
    Sampling(1.0),
    Sampling(0.7, top_p=0.9),
    Sampling(0.5, top_k=5),
    Sampling(1.3, min_p=0.1),
    Sampling(0.8, top_p=0.8, min_p=0.05, top_k=4),
]


@pytest.mark.parametrize("config", SAMPLER_CONFIGS, ids=str)
def test_the_distribution_is_mlx_lms_samplers(config):
    """Analytically against make_sampler's semantics, and empirically against draws from mlx-lm's sampler itself
    (a distribution without the temperature is the control the same statistic must reject)."""
    logits = mx.random.normal((40,), key=mx.random.key(7))
    ours = np.array(config.probs(logits[None])[0], dtype=np.float64)
    assert (ours > 0).sum() >= 4  # the filters leave a distribution, not one token
    np.testing.assert_allclose(ours, _reference_distribution(np.array(logits, dtype=np.float64), config), atol=1e-6)
    samples = 20000
    log_probs = (logits - mx.logsumexp(logits))[None]
    mx.random.seed(11)
    draws = np.array(config.sampler()(mx.broadcast_to(log_probs, (samples, 40))))
    counts = np.bincount(draws, minlength=40)
    assert chi_square_p_value(counts, ours, samples) > 1e-3
    untempered = np.array(Sampling(1.0, config.top_p, config.top_k, config.min_p).probs(logits[None])[0], np.float64)
    if config.temp != 1.0:
        assert chi_square_p_value(counts, untempered, samples) < 1e-3


def test_the_selector_names_its_distribution_only_where_it_is_explicit():
    assert make_token_selector().distribution is None  # argmax
    assert make_token_selector(temp=0.7, top_p=0.9).distribution == Sampling(0.7, 0.9, 0, 0.0)
    assert make_token_selector(temp=0.7, processors=[lambda tokens, logits: logits]).distribution is None
    assert TokenSelector(make_sampler(temp=0.7)).distribution is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def run(model, tokenizer, prompt, max_tokens, **options):
    tokens, last = [], None
    for response in mlx_dllm.stream_generate(model, tokenizer, prompt, max_tokens, **options):
        tokens, last = tokens + response.tokens, response
    return tokens, last


class TargetProposer:
    """Replaces `sample_block` (or `propose_block`): proposals drawn from the target's own distribution under
    `sampling`, token after token along the chain (or its greedy continuation, with `sampling` None), so q is a
    known, coherent distribution near p. The real drafter still runs first, so its cache behaves as in a real run;
    its context rows tell the committed prefix."""

    def __init__(self, real, model, prompt, sampling=None, support=None):
        self.real, self.model, self.prompt, self.sampling = real, model, prompt, sampling
        self.support = support  # q on its `support` most probable tokens only, renormalised, given as token ids
        self.last = None

    def __call__(self, draft, target, anchor, features, draft_cache, size, head, sampling=None):
        self.real(draft, target, anchor, features, draft_cache, size, head, *([sampling] if sampling else []))
        offset = draft_cache[0].offset  # the tokens before the anchor
        if offset == len(self.prompt):
            context = list(self.prompt)
        else:
            before, previous_anchor, proposals = self.last
            context = before + [previous_anchor] + proposals[: offset - len(before) - 1]
        tokens, chosen, rows, ids = [], [], [], []
        for _ in range(size - 1):
            logits = self.model(mx.array([context + [anchor] + tokens]))[0, -1:]
            if self.sampling is None:
                tokens.append(int(mx.argmax(logits, axis=-1).item()))
                continue
            columns = mx.arange(logits.shape[-1]) if self.support is None else mx.argsort(-logits[0])[: self.support]
            log_q = self.sampling.log_probs(logits[:, columns])
            index = int(mx.random.categorical(log_q).item())
            tokens.append(int(columns[index].item()))
            rows.append(mx.exp(log_q)[0])
            chosen.append(rows[-1][index])
            ids.append(columns)
        self.last = (context, anchor, tokens)
        if self.sampling is None:
            return mx.array(tokens)
        support = None if self.support is None else mx.stack(ids)
        return dflash_strategy.Sampled(mx.array(tokens), mx.stack(chosen), mx.stack(rows), support)


def _break(monkeypatch, control):
    """Controls the statistic must reject: accept every proposal; draw a rejection's replacement from p, not from
    the residual max(0, p - q)."""
    real = dflash_strategy.ratio_test
    if control == "accept-everything":
        broken = lambda logits, proposal, sampling: real(  # noqa: E731
            logits, proposal._replace(chosen=mx.zeros_like(proposal.chosen)), sampling
        )
    else:
        broken = lambda logits, proposal, sampling: real(  # noqa: E731
            logits, proposal._replace(q=mx.zeros_like(proposal.q)), sampling
        )
    monkeypatch.setattr(dflash_strategy, "ratio_test", broken)


def conditional_pit(model, prompt, runs, sampling, positions, seed=0) -> np.ndarray:
    """Randomized probability integral transforms of each run's tokens at `positions`, each under the target's
    filtered distribution given the tokens before it: independent Uniform(0, 1) exactly when every token is a draw
    from that conditional (Rosenblatt)."""
    rng = np.random.default_rng(seed)
    u = []
    for k in positions:
        probabilities = np.array(sampling.probs(model(mx.array([prompt + r[:k] for r in runs]))[:, -1]), np.float64)
        for p, r in zip(probabilities, runs):
            order = np.argsort(-p, kind="stable")
            rank = int(np.flatnonzero(order == r[k])[0])
            u.append(p[order[:rank]].sum() + rng.random() * p[r[k]])
    return np.array(u)


def follows_the_target(monkeypatch, model, tokenizer, draft, proposer, sampling, control, seed):
    """300 sampled chains of 3 tokens with `proposer` in place of the drafter: the 2nd and 3rd tokens' PIT against the
    target's filtered conditionals is uniform, and the `control`'s (a broken rule) is not."""
    monkeypatch.setattr(dflash_strategy, "sample_block", proposer)
    if control:
        _break(monkeypatch, control)
    mx.random.seed(seed)
    options = dict(draft_model=draft, temp=sampling.temp, top_p=sampling.top_p, block_size=3, speculation="chain")
    runs = [run(model, tokenizer, PROMPT, 3, **options)[0] for _ in range(300)]
    p_value = ks_uniform_p_value(conditional_pit(model, PROMPT, runs, sampling, positions=(1, 2)))
    if control:
        assert p_value < 1e-3, f"the test cannot tell {control} apart"
    else:
        assert p_value > 1e-3, p_value


@pytest.mark.parametrize("control", [None, "accept-everything", "residual-is-p"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_sampled_chains_follow_the_target_distribution(tiny, monkeypatch, config, control):
    """Blocks of 3 whose proposals are drawn from the target's own distribution at a third of the temperature (same
    filters): accepted often, rejected often. The second and third tokens (the first round's two positions, or a
    second round's after a rejection) are checked against the target's filtered conditional given the tokens before
    them; the same statistic rejects both broken rules."""
    model, tokenizer, draft = tiny["dflash"]
    sampling = CONFIGS[config]
    sharper = Sampling(sampling.temp / 3, sampling.top_p, sampling.top_k, sampling.min_p)
    proposer = TargetProposer(dflash_strategy.sample_block, model, PROMPT, sharper)
    follows_the_target(monkeypatch, model, tokenizer, draft, proposer, sampling, control, 1234)


@pytest.mark.parametrize("control", [None, "residual-is-p"])
def test_a_proposal_distribution_on_some_tokens_is_scattered_back(tiny, monkeypatch, control):
    """q on each position's 6 most probable tokens (as a draft_vocab's or DFlash2's candidates are), given with their
    ids: the residual subtracts q at those ids."""
    model, tokenizer, draft = tiny["dflash"]
    sampling = CONFIGS["temp-1"]
    proposer = TargetProposer(dflash_strategy.sample_block, model, PROMPT, Sampling(0.5), support=6)
    follows_the_target(monkeypatch, model, tokenizer, draft, proposer, sampling, control, 4321)


@pytest.mark.parametrize("name", ["dflash", "dflash2", "dflash-draft-vocab"])
def test_the_drafters_own_sampled_chains_follow_the_target_distribution(tiny, tmp_path, name):
    """The tiny random drafters' own sampled proposals (DFlash2's: its selector's sampled walk over its top-4
    candidates, the residual scattered back onto them) through the whole loop, at temp 0.7 with top_p 0.9."""
    model, tokenizer, draft = tiny[name.removesuffix("-draft-vocab")]
    if name.endswith("draft-vocab"):  # a v1 drafter that drafts from every third token
        folder = tiny["dflash-folder"]
        config = json.loads((folder / "config.json").read_text())
        config["draft_vocab"] = list(range(2, VOCAB, 3))
        shutil.copytree(folder, tmp_path / "vocab")
        (tmp_path / "vocab" / "config.json").write_text(json.dumps(config))
        draft, _ = mlx_dllm.load(str(tmp_path / "vocab"))
        assert draft.draft_vocab is not None
    sampling = CONFIGS["temp-0.7-top_p-0.9"]
    mx.random.seed(99)
    options = dict(draft_model=draft, temp=sampling.temp, top_p=sampling.top_p, block_size=3, speculation="chain")
    runs, accepted = [], []
    for _ in range(300):
        tokens, last = run(model, tokenizer, PROMPT, 3, **options)
        runs.append(tokens)
        accepted.append(last.acceptance_length)
    p_value = ks_uniform_p_value(conditional_pit(model, PROMPT, runs, sampling, positions=(1, 2)))
    print(f"{name}: KS p = {p_value:.3g}, mean acceptance {np.mean(accepted):.2f}")
    assert p_value > 1e-3, p_value


def test_the_dflash2_walk_draws_from_its_scores(tiny):
    """Sampled, the selector's walk returns each position's distribution over its candidates and the probability of
    the one it drew, and its draws follow those distributions."""
    model, _, draft = tiny["dflash2"]
    target = dflash_strategy.bind_target(draft, model)
    head = dflash_strategy.DraftHead(draft, target)
    hidden = mx.random.normal((1, draft.hidden_size), key=mx.random.key(3))
    sampling = Sampling(1.5)
    mx.random.seed(5)
    draws = [head.sample(hidden, 5, sampling) for _ in range(2000)]
    tokens, chosen, q, support = draws[0]
    assert q.shape == support.shape == (1, draft.args.selector_top_k)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-5)
    column = support[0].tolist().index(tokens.item())
    assert chosen.item() == pytest.approx(q[0, column].item())
    counts = np.zeros(support.shape[1])
    for proposal in draws:
        assert proposal.support.tolist() == support.tolist()
        counts[proposal.support[0].tolist().index(proposal.tokens.item())] += 1
    assert chi_square_p_value(counts, np.array(q[0], np.float64), len(draws)) > 1e-3
    greedy = head(hidden, 5)
    assert greedy.item() == support[0, int(mx.argmax(q[0]).item())].item()  # the walk's best is the greedy path


def test_sampled_proposals_accept_more_than_matched_argmax(tiny, monkeypatch):
    """With q = p (proposals drawn from the target's own filtered distribution) nearly every proposal is accepted;
    the target's greedy continuation, matched against the target's own draw (the scheme a custom sampler= keeps),
    is accepted only as often as the draw happens to be the argmax."""
    model, tokenizer, draft = tiny["dflash"]
    sampling = Sampling(1.0)
    options = dict(draft_model=draft, block_size=4, speculation="chain")
    monkeypatch.setattr(
        dflash_strategy, "sample_block", TargetProposer(dflash_strategy.sample_block, model, PROMPT, sampling)
    )
    monkeypatch.setattr(dflash_strategy, "propose_block", TargetProposer(dflash_strategy.propose_block, model, PROMPT))
    mx.random.seed(3)
    sampled = [run(model, tokenizer, PROMPT, 24, temp=1.0, **options)[1].acceptance_length for _ in range(4)]
    matched = [run(model, tokenizer, PROMPT, 24, sampler=sampling.sampler(), **options)[1].acceptance_length
               for _ in range(4)]
    print(f"acceptance: sampled {np.mean(sampled):.2f}, matched argmax {np.mean(matched):.2f}")
    assert np.mean(sampled) > 3.5  # of 4 per round, the last rounds cut by max_tokens
    assert np.mean(sampled) > np.mean(matched) + 0.5


@pytest.mark.parametrize("name", ["dflash", "dflash2"])
def test_greedy_chains_are_unchanged(tiny, name):
    model, tokenizer, draft = tiny[name]
    ar = run(model, tokenizer, PROMPT, 20)[0]
    assert run(model, tokenizer, PROMPT, 20, draft_model=draft, speculation="chain", block_size=4)[0] == ar
