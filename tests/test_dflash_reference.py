"""Our DFlash loop against z-lab's MLX reference loop (`dflash.model_mlx.stream_generate`, dflash==0.1.0).

A tiny random target and a tiny random drafter, the drafter's weights loaded into both our `dflash.Model` and
z-lab's `DFlashDraftModel`. At temperature 0 the two loops must commit the same tokens in the same rounds,
feed the drafter the same context rows, and the drafter must propose the same block in every round. Two cases:

- `drafter`: the drafters' own proposals (random weights accept almost nothing);
- `oracle`: both drafters still run, but their proposals are replaced, identically on both sides, by the target's
  greedy continuation for the first k positions of each block and a wrong token after (k cycling through
  `PATTERN`), so rounds accept none, part or all of a block and the target cache rolls back by every amount.

Target families: qwen3 (K/V trim) and qwen3_5 (hybrid Gated-DeltaNet: z-lab replays the recurrence to roll back).
z-lab patches the target's layers in place, so each loop gets its own target, built from the same weights.
"""

import importlib
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_tokenizer

from mlx_dllm import stream_generate
from mlx_dllm.models import dflash
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.test_target_families import BASE, HIDDEN, LAYERS, VOCAB

zlab = pytest.importorskip("dflash.model_mlx")

BLOCK = 8
MASK_TOKEN_ID = VOCAB - 1
# The last layer stays out: our target adapter final-norms its output (transformers' `hidden_states[-1]`), z-lab's
# MLX hook records the raw layer output. Real checkpoints never capture the last layer (Qwen3: 1, 9, 17, 25, 33 of 36).
TARGET_LAYER_IDS = [0, 2]
PROMPT = [5, 17, 42, 9, 3]
MAX_TOKENS = 70  # the final rounds run shrunk blocks (min(B, max_tokens - n + 1))
PATTERN = [7, 0, 3, 7, 1, 5, 2]  # correct proposals per round in the oracle case: all, none, part of a block

COMMON = {key: value for key, value in BASE.items() if key != "rope_theta"}  # the family tests' tiny shapes
TARGET_CONFIGS = {
    "qwen3": {"model_type": "qwen3", **BASE},
    # Qwen3.5's text model: layers 0 and 2 Gated-DeltaNet (linear_attention), 1 and 3 full attention.
    "qwen3_5": {
        "model_type": "qwen3_5",
        "text_config": {
            "model_type": "qwen3_5_text",
            **COMMON,
            "full_attention_interval": 2,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "rope_parameters": {
                "type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 0],
            },
        },
    },
}
FAMILIES = ["qwen3", "qwen3_5"]

DRAFT = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=48,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=1024,
)

_TARGET_WEIGHTS = {}


def make_target(family):
    """A fresh mlx-lm model with the family's fixed random weights (z-lab patches its target in place)."""
    config = TARGET_CONFIGS[family]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    if family not in _TARGET_WEIGHTS:
        mx.eval(model.parameters())
        _TARGET_WEIGHTS[family] = tree_flatten(model.parameters())
    model.load_weights(_TARGET_WEIGHTS[family], strict=True)
    mx.eval(model.parameters())
    return model


def drafter_weights():
    mx.random.seed(1)
    model = dflash.Model(dflash_args())
    # Norm weights start at one: perturb them so that a norm applied in the wrong place shows.
    return [
        (name, value + 0.2 * mx.random.normal(value.shape) if name.endswith("norm.weight") else value)
        for name, value in tree_flatten(model.parameters())
    ]


# Gemma-style drafter fields, nested in `dflash_config` where z-lab's `load_draft` reads them.
SCALED = {"input_embedding_scale": 1.7, "output_multiplier": 0.5, "final_logit_softcapping": 3.0}


def dflash_args(dflash_config=None):
    return dflash.ModelArgs(
        **DRAFT, block_size=BLOCK, mask_token_id=MASK_TOKEN_ID, target_layer_ids=list(TARGET_LAYER_IDS),
        dflash_config=dflash_config,
    )


def make_our_drafter(weights, dflash_config=None):
    model = dflash.Model(dflash_args(dflash_config))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


class ZlabDrafter(zlab.DFlashDraftModel):
    """z-lab's drafter, recording every round and, with a `truth`, replacing its proposals by the oracle's."""

    def __call__(self, inputs, target_hidden, cache, logits_start=0):
        log, offset, size = self.log, cache[0].offset, inputs.shape[1]
        logits = super().__call__(inputs, target_hidden, cache, logits_start)
        proposal = mx.argmax(logits, axis=-1)[0].tolist()
        log.caches.append(cache)
        log.rounds.append(Round(size, target_hidden.shape[1], offset, proposal))
        if log.truth is not None:
            # The drafter cache holds the context rows only: its offset is the count of tokens before the anchor.
            proposal = oracle_proposal(log.truth, len(log.verified), cache[0].offset - len(PROMPT), size)
            logits = (mx.arange(logits.shape[-1]) == mx.array(proposal)[:, None]).astype(logits.dtype)[None]
        log.verified.append(proposal)
        return logits


def oracle_proposal(truth, round_index, anchor_index, size):
    """The block's true greedy continuation for its first `PATTERN[round]` proposals, a wrong token after (as
    tests/oracle.py), so the round accepts min(PATTERN[round], size - 1) proposals."""
    correct = PATTERN[round_index % len(PATTERN)]
    block = truth[anchor_index + 1 : anchor_index + size]
    return [t if j < correct else (t + 1) % VOCAB for j, t in enumerate(block)]


def zlab_config(dflash_config=None):
    return zlab.DFlashConfig(
        **DRAFT,
        **(dflash_config or {}),
        vocab_size=VOCAB,
        block_size=BLOCK,
        target_layer_ids=tuple(TARGET_LAYER_IDS),
        num_target_layers=LAYERS,
        mask_token_id=MASK_TOKEN_ID,
    )


def make_zlab_drafter(weights, truth=None, dflash_config=None):
    model = ZlabDrafter(zlab_config(dflash_config))
    model.load_weights(weights, strict=True)  # the same names: fc, hidden_norm, layers.*, norm
    mx.eval(model.parameters())
    model.log = ZlabLog(truth)
    return model


@dataclass
class Round:
    size: int  # block size, anchor included
    context: int  # target feature rows fed to the drafter this round
    offset: int  # drafter cache offset before the round
    proposal: List[int]  # the drafter's own argmax proposals (before any oracle)


@dataclass
class ZlabLog:
    truth: Optional[List[int]]
    rounds: List[Round] = field(default_factory=list)
    verified: List[List[int]] = field(default_factory=list)
    caches: List = field(default_factory=list)


@dataclass
class Run:
    chunks: List[List[int]]  # committed tokens per response: the prefill's token, then one entry per round
    rounds: List[Round]
    verified: List[List[int]]  # the proposals the target verified each round (the oracle's in that case)
    finish_reason: Optional[str]
    reported_accepts: List[int]  # what the loop reports per round (z-lab: response.accepted)
    draft_trims: List[int] = field(default_factory=list)  # z-lab's _trim_recent_cache on the drafter cache
    target_trims: List[int] = field(default_factory=list)  # z-lab's target rollback per round (trim > 0 only)
    acceptance_length: Optional[float] = None  # ours: the last response's mean tokens committed per round

    @property
    def tokens(self):
        return [t for chunk in self.chunks for t in chunk]

    @property
    def accepted(self):
        """Accepted proposals per round: the common prefix of what the round verified and what it committed
        (the bonus token never matches the proposal it replaced, and a cut at max_tokens drops only the bonus)."""
        return [_prefix(p, chunk) for p, chunk in zip(self.verified, self.chunks[1:])]

    def expected_accepted(self):
        """The oracle case's accepted proposals per round."""
        return [min(PATTERN[i % len(PATTERN)], r.size - 1) for i, r in enumerate(self.rounds)]


def _prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    harness = pytest.importorskip("tests.reference.harness")
    folder = tmp_path_factory.mktemp("tokenizer")
    harness.save_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.eos_token_ids = []  # both loops run the full length
    return tokenizer


@pytest.fixture(scope="module")
def greedy():
    """family -> plain mlx-lm greedy decoding of PROMPT (the truth the oracle proposes)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = make_target(family)
            cache[family] = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS)]
        return cache[family]

    return get


@pytest.fixture(scope="module")
def zlab_runs(tokenizer, greedy):
    """(family, case) -> z-lab's run, computed once for the test that checks it and the one comparing ours."""
    cache = {}

    def get(family, case):
        if (family, case) not in cache:
            cache[family, case] = run_zlab(family, greedy(family) if case == "oracle" else None, tokenizer)
        return cache[family, case]

    return get


def run_zlab(family, truth, tokenizer):
    draft = make_zlab_drafter(drafter_weights(), truth)
    draft_trims, target_trims = [], []
    trim, rollback = zlab._trim_recent_cache, zlab._GDNStateCapture.rollback

    def recording_trim(cache, n):
        (draft_trims if any(cache is c for c in draft.log.caches) else target_trims).append(n)
        trim(cache, n)

    def recording_rollback(self, cache, accepted, n):
        target_trims.append(n)
        rollback(self, cache, accepted, n)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zlab, "_trim_recent_cache", recording_trim)
        patch.setattr(zlab._GDNStateCapture, "rollback", recording_rollback)
        responses = list(
            zlab.stream_generate(
                make_target(family), draft, tokenizer, PROMPT, block_size=None, max_tokens=MAX_TOKENS, temperature=0.0
            )
        )
    rounds = [r for r in responses[1:] if r.tokens]  # the first is the prefill's token, the last an empty "length"
    chunks = [r.tokens for r in responses if r.tokens]
    return Run(
        chunks, draft.log.rounds, draft.log.verified, responses[-1].finish_reason, [r.accepted for r in rounds],
        draft_trims, target_trims,
    )


def run_ours(family, truth, tokenizer):
    rounds, verified = [], []
    propose = dflash_strategy.propose_block

    def recording(draft, target, anchor, features, draft_cache, size, head):
        offset = draft_cache[0].offset
        proposal = propose(draft, target, anchor, features, draft_cache, size, head)
        rounds.append(Round(size, features.shape[1], offset, proposal.tolist()))
        if truth is not None:  # our drafter cache, too, holds the context rows only after the call
            proposal = mx.array(oracle_proposal(truth, len(verified), draft_cache[0].offset - len(PROMPT), size))
        verified.append(proposal.tolist())
        return proposal

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dflash_strategy, "propose_block", recording)
        drafter = make_our_drafter(drafter_weights())
        chain = stream_generate(make_target(family), tokenizer, PROMPT, MAX_TOKENS, draft_model=drafter,
                                speculation="chain")  # z-lab's loop verifies the whole block
        responses = list(chain)
    last = responses[-1]
    chunks = [r.tokens for r in responses]
    return Run(chunks, rounds, verified, last.finish_reason, [], acceptance_length=last.acceptance_length)


# -- the drafters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [None, SCALED], ids=["plain", "scaled-and-capped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_drafters_agree(family, fields):
    """Same weights, same inputs: our drafter and z-lab's give the same hidden states and logits, round after round
    (a prompt's context rows, then a partly accepted block's, then a shrunk block), so their caches agree too.
    With the Gemma-style fields set, both scale the block's embeddings and multiply and cap the logits alike."""
    weights = drafter_weights()
    ours, theirs = make_our_drafter(weights, fields), make_zlab_drafter(weights, dflash_config=fields)
    model = make_target(family)
    theirs.bind(model)
    target = dflash_strategy.bind_target(ours, model)
    our_cache, their_cache = ours.make_cache(), theirs.make_cache()
    mx.random.seed(2)
    for context, size, anchor in ((len(PROMPT), BLOCK, 7), (3, BLOCK, 11), (1, 4, 23)):
        features = mx.random.normal((1, context, len(TARGET_LAYER_IDS) * HIDDEN))
        block = mx.array([[anchor] + [MASK_TOKEN_ID] * (size - 1)])
        our_hidden = ours(target.embed(block), features, our_cache, start=1)
        their_hidden = theirs.hidden_states(block, features, their_cache, logits_start=1)
        np.testing.assert_allclose(np.array(our_hidden), np.array(their_hidden), rtol=1e-5, atol=1e-5)
        our_logits, their_logits = ours.logits(target.lm_head(our_hidden)), theirs.compute_logits(their_hidden)
        np.testing.assert_allclose(np.array(our_logits), np.array(their_logits), rtol=1e-5, atol=1e-5)
        assert our_cache[0].offset == their_cache[0].offset


# -- the loops ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["drafter", "oracle"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_zlab_loop_is_lossless(family, case, zlab_runs, greedy):
    """The reference itself: z-lab's greedy output is the target's greedy output, and in the oracle case every
    round accepts what the oracle made right (so the rollback, K/V trim or Gated-DeltaNet replay, is exact)."""
    run = zlab_runs(family, case)
    assert run.tokens == greedy(family)
    assert len(run.tokens) == MAX_TOKENS and run.finish_reason == "length"
    assert run.rounds[-1].size < BLOCK  # the last rounds ran shrunk blocks
    assert run.draft_trims == []  # the drafter cache only ever holds committed rows: _trim_recent_cache never ran
    accepted = run.accepted
    assert run.target_trims == [r.size - a - 1 for r, a in zip(run.rounds, accepted) if r.size - a - 1 > 0]
    assert run.reported_accepts == [len(chunk) for chunk in run.chunks[1:]]  # a + 1, cut at max_tokens
    if case == "oracle":
        assert accepted == run.expected_accepted()
        assert {0, BLOCK - 1} <= set(accepted) and any(0 < a < BLOCK - 1 for a in accepted)
        assert run.reported_accepts[-1] == accepted[-1]  # the last round: all accepted, its bonus cut


@pytest.mark.parametrize("case", ["drafter", "oracle"])
@pytest.mark.parametrize("family", FAMILIES)
def test_our_loop_matches_zlab(family, case, tokenizer, zlab_runs, greedy):
    theirs = zlab_runs(family, case)
    ours = run_ours(family, greedy(family) if case == "oracle" else None, tokenizer)
    assert len(ours.tokens) == MAX_TOKENS >= 64 and ours.finish_reason == theirs.finish_reason == "length"
    assert ours.tokens == theirs.tokens
    assert ours.chunks == theirs.chunks  # the same tokens committed in the same rounds
    assert len(ours.rounds) == len(theirs.rounds)
    for index, (mine, reference) in enumerate(zip(ours.rounds, theirs.rounds)):
        assert mine == reference, f"round {index}"  # block size, context rows, drafter offset, proposals
    assert ours.verified == theirs.verified
    assert ours.accepted == theirs.accepted
    if case == "oracle":
        assert ours.accepted == ours.expected_accepted()
    # Acceptance length: tokens committed per round, the last round's cut at max_tokens included (z-lab's
    # response.accepted).
    assert ours.acceptance_length == pytest.approx(np.mean(theirs.reported_accepts))
