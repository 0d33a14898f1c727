"""Continuous batching (sampler/batch.py): every request's output is what `stream_generate` gives it alone, whatever
rows run beside it, join after it or leave before it: greedy and seeded sampling, AR and DFlash rows mixed, DFlash
and DFlash2 drafters, full-attention, sliding-window and MoE targets; adaptive rows at every width the batch
chooses, through rounds that skip the drafter, greedy AR's tokens and, sampled, the target's distribution.

`python -m tests.test_batch_engine` prints the aggregate tokens/s of a batch against the same requests one at a time
on the tiny model (for information: no test times anything)."""

import time

import mlx.core as mx
import pytest

import mlx_dllm
from mlx_dllm import DLLMError
from mlx_dllm.benchmark.tiny import VOCAB, build_tiny
from mlx_dllm.sampler import batch
from mlx_dllm.sampler.adaptive import BatchWidth
from mlx_dllm.sampler.batch import BatchEngine
from mlx_dllm.sampler.cost_curve import CostCurve
from mlx_dllm.sampler.dflash import ChainVerify, Matched, Sampled
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
    replaced by its true greedy continuation for the first k positions of each block (k cycling through PATTERN),
    then a wrong token, so rounds accept all, none or part of a block. The drafter still runs, so its caches behave
    as in a real run."""

    def __init__(self, monkeypatch):
        self.rows, self.accepts = {}, []
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
        correct = PATTERN[len(self.accepts) % len(PATTERN)]
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
