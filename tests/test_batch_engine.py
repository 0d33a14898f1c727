"""Continuous batching (sampler/batch.py): every request's output is what `stream_generate` gives it alone, whatever
rows run beside it, join after it or leave before it: greedy and seeded sampling, AR and DFlash rows mixed, DFlash
and DFlash2 drafters, full-attention, sliding-window and MoE targets; adaptive rows at every width the batch
chooses, through rounds that skip the drafter, greedy AR's tokens and, sampled, the target's distribution. With a
prompt cache, batched turns resume what earlier turns left, batched or alone, and answer as they would cold.

`python -m tests.test_batch_engine` prints the aggregate tokens/s of a batch against the same requests one at a time
on the tiny model (for information: no test times anything)."""

import time

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache

import mlx_dllm
from mlx_dllm import DLLMError
from mlx_dllm.benchmark.tiny import VOCAB, build_tiny
from mlx_dllm.models.ragged import RaggedKVCache
from mlx_dllm.models.target import Target
from mlx_dllm.sampler import batch
from mlx_dllm.sampler.adaptive import BatchWidth
from mlx_dllm.sampler.batch import BatchEngine
from mlx_dllm.sampler.common import TokenSelector
from mlx_dllm.sampler.cost_curve import CostCurve
from mlx_dllm.sampler.dflash import ChainVerify, Matched, Sampled
from mlx_dllm.sampler.prompt_cache import NO_REUSE, PromptCache
from tests.oracle import tiny_pairs
from tests.test_hybrid_dflash import ks_uniform_p_value, randomized_pit

PATTERN = [7, 0, 3, 7, 1, 5, 2]  # correct proposals per round: all of a block of 8, none, part
# (prompt, max_tokens, options): prompts of different lengths, AR and DFlash rows, blocks of 8 and 4 (DFlash rows:
# adaptive where greedy, which equals greedy AR at any width; chains where seeded, whose draws equal a chain's alone).
GREEDY = [
    ([5, 17, 42, 9], 24, {}),
    ([3] * 11, 13, {"mode": "ar"}),
    ([100, 7, 64], 21, {"block_size": 4}),
    ([9, 9, 8, 1, 2, 77, 31, 4, 4, 200], 9, {}),
]
SAMPLED = [
    ([5, 17, 42, 9], 24, {"temp": 1.0, "seed": 3, "speculation": "chain"}),
    ([3] * 11, 13, {"mode": "ar", "temp": 0.8, "seed": 5}),
    ([100, 7, 64], 21, {"block_size": 4, "temp": 0.7, "top_p": 0.9, "seed": 11, "speculation": "chain"}),
    ([9, 9, 8, 1, 2, 77, 31], 16, {"temp": 1.0, "top_k": 20, "min_p": 0.05, "seed": 1, "speculation": "chain"}),
]
# A machine where a verify of up to 64 tokens costs what one AR step does: adaptive rows verify whole chains.
FLAT = CostCurve((1, 64), (0.010, 0.010), draft_seconds=0.002)


def pinned(requests):
    """The requests with their DFlash rows pinned to chains."""
    return [(p, n, o if o.get("mode") == "ar" else {**o, "speculation": "chain"}) for p, n, o in requests]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def alone(model, tokenizer, draft, prompt, max_tokens, options):
    """What `stream_generate` gives the request by itself (DFlash rows: a chain, as batched rows verify)."""
    options = dict(options)
    if options.get("mode") == "ar":
        draft = None
    elif draft is not None:
        options["speculation"] = "chain"
    tokens = []
    for response in mlx_dllm.stream_generate(model, tokenizer, prompt, max_tokens, draft_model=draft, **options):
        tokens += response.tokens
    return tokens


def drain(engine, outputs=None, steps=None):
    """Step until every request is done (or `steps` steps): uid -> tokens, and uid -> its last event."""
    outputs = {} if outputs is None else outputs
    last = {}
    while len(engine) and steps != 0:
        for event in engine.step():
            outputs[event.uid] = outputs.get(event.uid, []) + event.tokens
            last[event.uid] = event
        steps = None if steps is None else steps - 1
    return outputs, last


class RowOracle:
    """Each followed DFlash row's proposals (its first block's and the batch's rounds', `BatchEngine._propose`)
    replaced by its true greedy continuation for the first k positions of each block (k cycling through `pattern`),
    then a wrong token, so rounds accept all, none or part of a block. The drafter still runs, so its caches behave
    as in a real run."""

    def __init__(self, monkeypatch, pattern=PATTERN):
        self.rows, self.accepts, self.pattern = {}, [], pattern
        propose = BatchEngine._propose

        def oracle_propose(engine, row, hidden, logits):
            propose(engine, row, hidden, logits)
            if row.uid in self.rows:
                row.proposal = self.proposal(row, hidden.shape[0] + 1)

        monkeypatch.setattr(BatchEngine, "_propose", oracle_propose)

    def follow(self, engine, uid, reference):
        self.rows[uid] = reference

    def proposal(self, row, size):
        reference = self.rows[row.uid]
        anchor = row.produced - 1  # the anchor's index in the generated tokens
        correct = self.pattern[len(self.accepts) % len(self.pattern)]
        self.accepts.append(min(correct + 1, size))
        truth = reference[anchor + 1 : anchor + size]
        return mx.array([t if j < correct else (t + 1) % VOCAB for j, t in enumerate(truth)])


def test_greedy_rows_equal_greedy_ar_whatever_each_round_accepts(tiny, monkeypatch):
    """Rows of different prompt lengths, max_tokens and block sizes accept all, none or part of their blocks in the
    same rounds: each keeps its own share of the verified positions, and every output is greedy AR's."""
    model, tokenizer, draft = tiny["dflash"]
    references = [alone(model, tokenizer, None, prompt, max_tokens, {"mode": "ar"}) for prompt, max_tokens, _ in GREEDY]
    oracle = RowOracle(monkeypatch)
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(prompt, max_tokens, options) for prompt, max_tokens, options in pinned(GREEDY)]
    for uid, reference in zip(uids, references):
        oracle.follow(engine, uid, reference)
    outputs, last = drain(engine)
    assert [outputs[uid] for uid in uids] == references
    assert {1, 8} <= set(oracle.accepts) and any(1 < a < 8 for a in oracle.accepts)
    assert all(last[uid].finished == "length" for uid in uids)
    assert last[uids[0]].stats.acceptance_length > 2


def record_proposals(monkeypatch):
    """id(ChainVerify) -> the chains it proposed (its first block's and the batch's rounds'), from the real drafter."""
    recorded = {}
    propose, choose = ChainVerify.propose, ChainVerify.choose

    def keep(verify, proposal):
        tokens = proposal.tokens if isinstance(proposal, Sampled) else proposal
        recorded.setdefault(id(verify), []).append(tokens.tolist())
        return proposal

    monkeypatch.setattr(ChainVerify, "propose", lambda verify, *args: keep(verify, propose(verify, *args)))
    monkeypatch.setattr(ChainVerify, "choose", lambda verify, *args: keep(verify, choose(verify, *args)))
    return recorded


@pytest.mark.parametrize("name", ["dflash", "dflash2"])
def test_the_batched_drafter_proposes_what_each_row_would_alone(tiny, monkeypatch, name):
    """One drafter forward over rows of their own context lengths and block sizes proposes, for each row, the chain
    its own forward would (DFlash2: the selector's walk); the outputs are each request's alone."""
    model, tokenizer, draft = tiny[name]
    recorded = record_proposals(monkeypatch)
    expected = []
    for prompt, max_tokens, options in pinned(GREEDY):
        tokens = alone(model, tokenizer, draft, prompt, max_tokens, options)
        expected.append((tokens, list(recorded.values())[-1] if options.get("mode") != "ar" else None))
        recorded.clear()
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(prompt, max_tokens, options) for prompt, max_tokens, options in pinned(GREEDY)]
    verifies = {row.uid: row.verify for row in engine.waiting}
    outputs, _ = drain(engine)
    for uid, (tokens, proposals) in zip(uids, expected):
        assert outputs[uid] == tokens
        assert recorded.get(id(verifies[uid])) == proposals


@pytest.mark.parametrize("name", ["dflash", "dflash2"])
def test_seeded_sampled_rows_equal_their_runs_alone(tiny, name):
    """Each row draws from its own stream, as `mx.random.seed(seed)` does for a request alone: the same tokens, rows
    joining as others finish (two rows at a time)."""
    model, tokenizer, draft = tiny[name]
    expected = [alone(model, tokenizer, draft, *request) for request in SAMPLED]
    engine = BatchEngine(model, tokenizer, draft_model=draft, max_rows=2)
    uids = [engine.insert(*request) for request in SAMPLED]
    outputs, last = drain(engine)
    assert [outputs[uid] for uid in uids] == expected
    if name == "dflash":
        assert last[uids[0]].stats.acceptance_length > 1  # some rounds ratio-test proposals in


def test_adaptive_rows_equal_greedy_ar_at_every_width_and_through_skipped_drafts(tiny, monkeypatch):
    """Adaptive rows verify the width the batch chooses (forced here through 1..8 in turn) and rounds skip the
    drafter (forced: two of every five), while their proposals are right for 0..7 tokens: the rows the drafter has
    not read wait for its next forward, and every output is greedy AR's."""
    model, tokenizer, draft = tiny["dflash"]
    references = [alone(model, tokenizer, None, prompt, max_tokens, {"mode": "ar"}) for prompt, max_tokens, _ in GREEDY]
    oracle = RowOracle(monkeypatch)
    widths, drafts = iter(range(10**6)), iter(range(10**6))
    monkeypatch.setattr(BatchWidth, "width", lambda self, gains, *rest: 1 + next(widths) % 8)
    monkeypatch.setattr(BatchWidth, "drafts", lambda self: next(drafts) % 5 not in (1, 2))
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(prompt, max_tokens, options) for prompt, max_tokens, options in GREEDY]
    for uid, reference in zip(uids, references):
        oracle.follow(engine, uid, reference)
    outputs, last = drain(engine)
    assert [outputs[uid] for uid in uids] == references
    stats = last[uids[0]].stats
    assert stats.rounds["ar"] > 0 and stats.draft_forwards < stats.forwards - 1  # skipped and width-1 rounds
    assert max(stats.accept_lengths) > 2


@pytest.mark.parametrize("name", ["dflash", "dflash2"])
def test_sampled_adaptive_rows_follow_the_target_distribution(tiny, monkeypatch, name):
    """Eight rows at a time at temperature 1, 3 tokens each: the second and third are drafted (whole chains: a flat
    cost curve), matched against the target's draws, and each third token is checked against the target's own
    distribution given the two before it. The control commits every draft without looking at the target's draws:
    the test must tell it apart."""
    model, tokenizer, draft = tiny[name]
    monkeypatch.setattr(batch, "measured_costs", lambda *args: FLAT)
    monkeypatch.setattr(tokenizer, "_eos_token_ids", set())
    prompt = [5, 17, 42, 9]

    def sample():
        engine = BatchEngine(model, tokenizer, draft_model=draft)
        uids = [engine.insert(prompt, 3, {"temp": 1.0, "seed": seed, "block_size": 3}) for seed in range(300)]
        outputs, last = drain(engine)
        assert all(last[uid].stats.draft_forwards == 1 for uid in uids)  # the third token's round was drafted
        return [outputs[uid] for uid in uids]

    assert ks_uniform_p_value(randomized_pit(model, prompt, sample())) > 1e-3
    monkeypatch.setattr(Matched, "committed", lambda matched: matched.drafts.tolist() + [0])
    assert ks_uniform_p_value(randomized_pit(model, prompt, sample())) < 1e-3


def test_a_row_inserted_after_two_rounds_changes_no_output(tiny):
    model, tokenizer, draft = tiny["dflash"]
    requests = [GREEDY[0], SAMPLED[2], GREEDY[1]]
    expected = [alone(model, tokenizer, draft, *request) for request in requests]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    first = [engine.insert(*request) for request in requests[:2]]
    outputs, _ = drain(engine, steps=3)  # the prefills, then two rounds
    assert all(len(outputs[uid]) > 2 for uid in first)
    late = engine.insert(*requests[2])
    outputs, _ = drain(engine, outputs)
    assert [outputs[uid] for uid in first + [late]] == expected


def test_a_cancelled_row_leaves_the_others_undisturbed(tiny):
    model, tokenizer, draft = tiny["dflash"]
    requests = [GREEDY[0], SAMPLED[1], SAMPLED[2]]
    expected = [alone(model, tokenizer, draft, *request) for request in requests]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(*request) for request in requests]
    queued = engine.insert([1, 2, 3], 5)
    assert engine.cancel(queued)  # still waiting
    outputs, _ = drain(engine, steps=3)
    assert engine.cancel(uids[1]) and not engine.cancel(uids[1])
    outputs, last = drain(engine, outputs)
    assert uids[1] not in last and queued not in outputs
    assert outputs[uids[0]] == expected[0] and outputs[uids[2]] == expected[2]
    assert expected[1][: len(outputs[uids[1]])] == outputs[uids[1]]


def test_a_stop_token_ends_its_row_as_it_ends_a_request(tiny):
    model, tokenizer, draft = tiny["dflash"]
    full = alone(model, tokenizer, draft, *GREEDY[0])
    stop = full[5]
    tokenizer._eos_token_ids = {stop}
    try:
        expected = alone(model, tokenizer, draft, *GREEDY[0])
        engine = BatchEngine(model, tokenizer, draft_model=draft)
        uids = [engine.insert(*GREEDY[0]), engine.insert(*GREEDY[2])]
        outputs, last = drain(engine)
    finally:
        tokenizer._eos_token_ids = set()
    assert outputs[uids[0]] == expected == full[: full.index(stop)]
    assert last[uids[0]].finished == "stop"


def test_a_request_of_one_token_never_joins(tiny):
    model, tokenizer, draft = tiny["dflash"]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uid = engine.insert([5, 17], 1)
    (event,) = engine.step()
    assert (event.uid, len(event.tokens), event.finished, len(engine)) == (uid, 1, "length", 0)


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "qwen3_moe", "gemma4_text"])
def test_sliding_window_and_moe_targets_batch(family, tmp_path):
    """Windows of 8 (far shorter than the outputs), attention sinks, experts, K/V shared across layers."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dllm.benchmark.tiny import save_tokenizer
    from tests.test_target_families import make_drafter, make_target

    save_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    tokenizer._eos_token_ids = set()
    model, draft = make_target(family), make_drafter()
    requests = [
        ([5, 17, 42, 9, 3, 3, 8, 1, 2, 9, 11], 24, {}),
        ([3] * 3, 20, {"mode": "ar"}),
        ([100, 7, 64], 20, {"block_size": 4, "temp": 0.9, "seed": 4, "speculation": "chain"}),
    ]
    expected = [alone(model, tokenizer, draft, *request) for request in requests]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(*request) for request in requests]
    outputs, _ = drain(engine)
    assert [outputs[uid] for uid in uids] == expected


def test_an_engine_without_a_drafter_batches_ar_rows(tiny):
    model, tokenizer, _ = tiny["dflash"]
    requests = [GREEDY[1], SAMPLED[1], ([7, 7, 7, 7, 7], 6, {"temp": 0.5, "seed": 8})]
    expected = [alone(model, tokenizer, None, *request) for request in requests]
    engine = BatchEngine(model, tokenizer)
    uids = [engine.insert(*request) for request in requests]
    outputs, _ = drain(engine)
    assert [outputs[uid] for uid in uids] == expected


def test_recurrent_targets_are_refused_in_one_line(tiny):
    from tests.test_target_families import make_target

    _, tokenizer, _ = tiny["dflash"]
    with pytest.raises(DLLMError, match="'qwen3_next' cannot be batched: its .* layers are not K/V caches"):
        BatchEngine(make_target("qwen3_next"), tokenizer)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"speculation": "tree"}, "verify chains: speculation='tree' runs one request at a time"),
        ({"tree_budget": 4}, "unknown option tree_budget for batched decoding"),
        ({"block_size": 9}, "block size must be between 2 and the drafter's trained 8"),
        ({"mode": "ar", "block_size": 4}, "block_size is for dflash rows"),
        ({"mode": "quadratic-spec"}, "batched rows run mode ar or dflash"),
        ({"sampler": print}, "unknown option sampler for batched decoding"),
        ({"temp": -1}, "temp must be >= 0"),
    ],
)
def test_bad_options_are_refused_at_insert(tiny, options, message):
    model, tokenizer, draft = tiny["dflash"]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    with pytest.raises(DLLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.insert([1, 2], 4, options)
    with pytest.raises(DLLMError, match="needs a draft model"):
        BatchEngine(model, tokenizer).insert([1, 2], 4, {"mode": "dflash"})


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """(target, tokenizer, drafter): a tiny llama whose even layers attend within windows of 8, and a drafter."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dllm.benchmark.tiny import save_tokenizer
    from tests.test_target_families import make_drafter, make_target

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    tokenizer._eos_token_ids = set()
    return make_target("llama"), tokenizer, make_drafter()


def pair(tiny, sliding, kind):
    return tiny["dflash"] if kind == "kv" else sliding


def held_keys(cache) -> np.ndarray:
    """The keys a one-row cache holds, in position order (a window's: its last positions)."""
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_dllm.models.cache import WindowKVCache, rotating_rows

    if isinstance(cache, RotatingKVCache):
        return np.array(rotating_rows(cache)[0])
    return np.array(cache.keys if isinstance(cache, WindowKVCache) else cache.keys[..., : cache.offset, :])


@pytest.mark.parametrize("kind, layers", [("kv", "ar"), ("sliding", "ar"), ("sliding", "speculative")])
def test_a_row_taken_out_is_what_a_one_row_prefill_of_its_tokens_leaves(tiny, sliding, kind, layers):
    """Rows of 11, 3 and 6 prompt tokens join, verify blocks of 3 and keep 3, 1 and 2 of them, then verify one more
    each: each row taken out (as plain AR's caches, whose windows are mlx-lm's RotatingKVCache, or a speculative
    target's, WindowKVCache) is the cache a one-row prefill of its tokens leaves (windows of 8: its last 8 rows), and
    the next forwards on either give the same logits."""
    model = pair(tiny, sliding, kind)[0]
    fresh = (lambda: make_prompt_cache(model)) if layers == "ar" else Target(model).make_cache
    held = [[5, 17, 42, 9, 3, 3, 8, 1, 2, 9, 11], [3, 3, 3], [100, 7, 64, 1, 2, 3]]
    ragged = [RaggedKVCache() for _ in fresh()]
    for prompt in held:
        cache = fresh()
        model(mx.array([prompt]), cache=cache)
        for layer, row in zip(ragged, cache):
            layer.join(row)
    for ids, kept in [([[4, 5, 6], [7, 8, 9], [10, 11, 12]], [3, 1, 2]), ([[13], [14], [15]], [1, 1, 1])]:
        for layer in ragged:
            layer.mark()
        model(mx.array(ids), cache=ragged)
        for layer in ragged:
            layer.keep(kept)
        for tokens, row_ids, count in zip(held, ids, kept):
            tokens += row_ids[:count]
    for index, tokens in enumerate(held):
        expected = fresh()
        model(mx.array([tokens]), cache=expected)
        taken = [layer.row(index, like) for layer, like in zip(ragged, fresh())]
        windowed = 0
        for got, want in zip(taken, expected):
            rows = held_keys(got)
            assert type(got) is type(want) and got.offset == want.offset == len(tokens)
            assert rows.shape[2] == (len(tokens) if type(got) is KVCache else min(len(tokens), 8))
            windowed += rows.shape[2] < len(tokens)
            np.testing.assert_allclose(rows, held_keys(want)[..., -rows.shape[2] :, :], atol=1e-5)
        assert windowed == (2 if kind == "sliding" and len(tokens) > 8 else 0)
        for ids in ([[20, 21]], [[22]]):
            np.testing.assert_allclose(model(mx.array(ids), cache=taken), model(mx.array(ids), cache=expected),
                                       atol=1e-4)


FOLLOW_UP = [44, 12, 8]  # a conversation's next user turn
STATES = 32  # a prompt cache's size: room for every state these conversations leave
# A conversation's first turn (prompt, max_tokens, options): DFlash chains (their drafts compared), AR, adaptive.
TURNS = [
    ([5, 17, 42, 9, 3, 3, 8, 1, 2, 9, 11], 13, {"speculation": "chain"}),
    ([3] * 3, 9, {"mode": "ar"}),
    ([100, 7, 64], 12, {"block_size": 4, "speculation": "chain"}),
    ([9, 9, 8, 1, 2], 10, {}),
]


def mode_of(options, draft) -> str:
    return options.get("mode") or ("ar" if draft is None else "dflash")


def batched(model, tokenizer, draft, requests, cache=None, recorded=None):
    """The requests decoded together, each with its prompt state from `cache` (None: none) as the server begins it:
    [(tokens, cached tokens, the chains its row proposed: `record_proposals`' `recorded`, or None)]."""
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    states = [NO_REUSE if cache is None else cache.begin(model, draft, mode_of(options, draft), prompt)
              for prompt, _, options in requests]
    uids = [engine.insert(*request, prompt_state=state) for request, state in zip(requests, states)]
    verifies = [row.verify for row in engine.waiting]
    if recorded is not None:
        recorded.clear()  # another engine's verifies are gone: their ids may be reused
    outputs, _ = drain(engine)
    results = [(outputs[uid], state.start, None if recorded is None or verify is None else recorded.get(id(verify)))
               for uid, state, verify in zip(uids, states, verifies)]
    if recorded is not None:
        recorded.clear()  # these verifies go too: a later one with a reused id must not add to their chains
    return results


def lone(model, tokenizer, draft, prompt, max_tokens, options, cache=None):
    """(tokens, cached tokens) of `stream_generate` alone (a DFlash request: a chain) under the server's key, whose
    drafter is the server's whatever the mode."""
    options = options if options.get("mode") == "ar" else {**options, "speculation": "chain"}
    tokens, response = [], None
    for response in mlx_dllm.stream_generate(model, tokenizer, prompt, max_tokens, draft_model=draft,
                                             prompt_cache=cache, **options):
        tokens += response.tokens
    return tokens, response.cached_tokens


def second_turns(requests, answers):
    """Each conversation's second turn: its first prompt, the answer and FOLLOW_UP."""
    return [(prompt + answer[0] + FOLLOW_UP, max_tokens, options)
            for (prompt, max_tokens, options), answer in zip(requests, answers)]


@pytest.mark.parametrize("pattern", [PATTERN, [7]], ids=["mixed", "whole-blocks"])
@pytest.mark.parametrize("kind", ["kv", "sliding"])
def test_batched_turns_resume_and_answer_as_without_reuse_and_alone(tiny, sliding, monkeypatch, kind, pattern):
    """Conversations' first turns, batched (their proposals right for all, none or part of each block, or every
    block whole, so a last round is cut at max_tokens), leave their states; their second turns, batched, resume them
    (all of turn 1 but a last anchor the target did not hold) and answer what they answer batched without reuse and
    alone, the chains proposing the same drafts (the drafter resumed with the rows it had read and the features it
    had not)."""
    model, tokenizer, draft = pair(tiny, sliding, kind)
    monkeypatch.setattr(batch, "measured_costs", lambda *args: FLAT)
    references = [lone(model, tokenizer, None, prompt, max_tokens, {"mode": "ar"})[0]
                  for prompt, max_tokens, _ in TURNS]
    oracle = RowOracle(monkeypatch, pattern)
    oracle.rows = dict(enumerate(references))  # a fresh engine's uids count from 0
    cache = PromptCache(STATES)
    firsts = batched(model, tokenizer, draft, TURNS, cache)
    oracle.rows = {}
    assert [tokens for tokens, _, _ in firsts] == references and max(oracle.accepts) > 2
    recorded = record_proposals(monkeypatch)
    requests = second_turns(TURNS, firsts)
    warm = batched(model, tokenizer, draft, requests, cache, recorded)
    cold = batched(model, tokenizer, draft, requests, None, recorded)
    alone_ = [lone(model, tokenizer, draft, *request) for request in requests]
    assert [tokens for tokens, _, _ in warm] == [tokens for tokens, _, _ in cold] == [t for t, _ in alone_]
    assert [drafts for _, _, drafts in warm] == [drafts for _, _, drafts in cold]
    assert sum(drafts is not None for _, _, drafts in warm) == 2
    for (prompt, _, options), (answer, _, _), (_, cached, _) in zip(TURNS, firsts, warm):
        whole = len(prompt) + len(answer)  # turn 1's prompt and answer
        if mode_of(options, draft) == "ar":
            assert cached == whole - 1  # the last token's forward never ran
        else:  # a last round cut at max_tokens kept the last token's row too: always, where every block is whole
            assert cached == whole if pattern == [7] else cached in (whole - 1, whole)
    assert all(cached == 0 for _, cached, _ in cold)


@pytest.mark.parametrize("kind", ["kv", "sliding"])
def test_batched_and_lone_runs_resume_each_others_states(tiny, sliding, monkeypatch, kind):
    """A lone run resumes what a batched row left and a batched row what a lone run left (the server's key: the
    model, its drafter and the mode), answering what it answers cold."""
    model, tokenizer, draft = pair(tiny, sliding, kind)
    monkeypatch.setattr(batch, "measured_costs", lambda *args: FLAT)
    cache = PromptCache(STATES)
    requests = second_turns(TURNS, batched(model, tokenizer, draft, TURNS, cache))
    cold = [lone(model, tokenizer, draft, *request)[0] for request in requests]
    warm = [lone(model, tokenizer, draft, *request, cache=cache) for request in requests]
    assert [tokens for tokens, _ in warm] == cold
    assert all(cached >= len(prompt) - len(FOLLOW_UP) - 1 for (prompt, _, _), (_, cached) in zip(requests, warm))
    cache = PromptCache(STATES)
    requests = second_turns(TURNS, [lone(model, tokenizer, draft, *request, cache=cache) for request in TURNS])
    cold = [lone(model, tokenizer, draft, *request)[0] for request in requests]
    warm = batched(model, tokenizer, draft, requests, cache)
    assert [tokens for tokens, _, _ in warm] == cold
    assert all(cached >= len(prompt) - len(FOLLOW_UP) - 1 for (prompt, _, _), (_, cached, _) in zip(requests, warm))


def test_cancelled_and_failed_rows_leave_nothing_and_a_finished_one_its_state(tiny):
    """A row cancelled mid-way and one whose logits go non-finite after four tokens store nothing, not even their
    prompts' states; a row ended by `finish` (a stop string the server found) leaves its state, which the next turn
    resumes."""
    model, tokenizer, draft = tiny["dflash"]
    cache = PromptCache(STATES)
    requests = [([5, 17, 42, 9], 30, {"speculation": "chain"}), ([3] * 11, 30, {"mode": "ar"}),
                ([100, 7, 64], 30, {"block_size": 4})]
    engine = BatchEngine(model, tokenizer, draft_model=draft)
    uids = [engine.insert(*request, prompt_state=cache.begin(model, draft, mode_of(request[2], draft), request[0]))
            for request in requests]
    engine.waiting[1].select = TokenSelector(processors=[lambda history, logits: logits * float("nan")
                                                         if history.size >= 4 else logits])
    outputs, _ = drain(engine, steps=3)
    assert engine.cancel(uids[0])
    outputs, last = drain(engine, outputs, steps=4)
    assert last[uids[1]].finished == "error" and len(cache) == 0
    assert engine.finish(uids[2]) and not engine.finish(uids[2]) and len(cache) > 0
    prompt, max_tokens, options = requests[2]
    follow_up = (prompt + outputs[uids[2]] + FOLLOW_UP, 6, options)
    ((tokens, cached, _),) = batched(model, tokenizer, draft, [follow_up], cache)
    assert tokens == lone(model, tokenizer, draft, *follow_up)[0]
    assert cached >= len(prompt) + len(outputs[uids[2]]) - 1


def measure_throughput(rows: int = 4, max_tokens: int = 64) -> None:
    """Aggregate tokens/s of `rows` requests batched against the same requests one at a time (tiny DFlash pair,
    greedy; random weights accept about one token a round, so this measures batching, not speculation)."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    target, draft_folder = build_tiny("dflash", folder)
    model, tokenizer = mlx_dllm.load(str(target))
    draft = mlx_dllm.load(str(draft_folder))[0]
    tokenizer._eos_token_ids = set()
    requests = [([5 + i, 17, 42, 9][: 2 + i % 3], max_tokens, {} if i % 4 else {"mode": "ar"}) for i in range(rows)]
    start = time.perf_counter()
    produced = sum(len(alone(model, tokenizer, draft, *request)) for request in requests)
    one_at_a_time = produced / (time.perf_counter() - start)
    engine = BatchEngine(model, tokenizer, draft_model=draft, max_rows=rows)
    for request in requests:
        engine.insert(*request)
    start = time.perf_counter()
    produced = sum(len(tokens) for tokens in drain(engine)[0].values())
    batched = produced / (time.perf_counter() - start)
    print(f"{rows} rows x {max_tokens} tokens: one at a time {one_at_a_time:.1f} tok/s, batched {batched:.1f} tok/s "
          f"({batched / one_at_a_time:.2f}x)")


if __name__ == "__main__":
    for rows in (1, 2, 4, 8):
        measure_throughput(rows)
