"""Continuous batching with speculation: several requests decoded together, rows joining between rounds and leaving
when done (for a server's worker thread: `insert`, `step`, `cancel`).

A round verifies every row in ONE target forward: a DFlash row its anchor and drafted chain, an AR row its one
token, right-padded to the widest row (a padded position comes after the row's real ones, so causal attention
keeps it from them). Each row commits its own accepted prefix and the target's token after it (ChainVerify's
decision: matched against the target's tokens, or the ratio test for sampled rows) and keeps that many of the
verified positions: the caches are RaggedKVCache (models/ragged.py), whose rows hold their own lengths, so each
row's rollback forgets its own tail and moves nothing. One drafter forward then drafts every DFlash row's next
block from its own new context rows (the kept positions' features) and at its own block size, padded the same way;
the drafter's context caches are ragged as well. A new row is prefilled alone, drafts its first block alone (its
context is its whole prompt), then joins the batch's caches.

Each request decodes as `stream_generate` would alone with the same options (DFlash rows with
speculation='chain'): greedy rows token for token; seeded sampled rows draw from their own streams
(common.KeyStream), the draws `mx.random.seed(seed)` gives one request, in the same order, so they commit the same
tokens wherever the batch's logits equal one request's (bit for bit on the CPU in float32; a GPU's matmuls may round
a batch's rows differently in the last bits). Rows without a seed draw from MLX's global stream.

Chains only: trees and speculation='auto' (which chooses from this machine's costs of one request's forwards) run
one request at a time, as do recurrent targets, whose states cannot be rows of their own lengths.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, List, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import KVCache

from ..errors import DLLMError
from ..kernels.attention import check_fits
from ..models.cache import WindowKVCache
from ..models.ragged import RaggedKVCache
from ..models.target import Target
from .arguments import (
    SEED_LIMIT,
    check_models,
    embedding_rows,
    encode_prompt,
    tokenizer_eos_ids,
    whole_number,
    wrap_tokenizer,
)
from .common import NOT_FINITE, KeyStream, Sampling, Stats, TokenSelector, check_sampling
from .dflash import BLOCK_SIZE, ChainVerify, DraftHead, Sampled, bind_target, prefill

DEFAULT_MAX_ROWS = 8
OPTIONS = ("temp", "top_p", "top_k", "min_p", "seed", "mode", "block_size", "speculation")
CLEAR_CACHE_EVERY = 256  # committed tokens, as the front's


class Event(NamedTuple):
    """What a step did for one request: its new tokens, its finish reason once it is done ("stop": a stop token,
    "length": max_tokens, "error": the model's logits were not finite), else None, and its running stats."""

    uid: int
    tokens: List[int]
    finished: Optional[str]
    stats: Stats


class Stepped(NamedTuple):
    """An AR row's round: the target's token after its anchor."""

    token: mx.array

    def committed(self) -> List[int]:
        return self.token.tolist()


@dataclass
class Row:
    """One request in the batch."""

    uid: int
    prompt: mx.array
    max_tokens: int
    select: TokenSelector
    verify: Optional[ChainVerify]  # None: plain AR
    block_size: int
    stats: Stats = field(default_factory=Stats)
    produced: int = 0  # tokens committed, the prefill's included
    anchor: int = 0  # the last committed token, the next verify's first position
    proposal: Any = None  # the chain the next verify checks (DFlash rows), on the device

    def chain(self) -> mx.array:
        if self.verify is None:
            return mx.zeros((0,), dtype=mx.int32)
        return self.proposal.tokens if isinstance(self.proposal, Sampled) else self.proposal

    def decide(self, logits: mx.array):
        """The round's decision from this row's verify logits [width, V] (its padding included)."""
        if self.verify is None:
            return Stepped(self.select(logits[:1]))
        return self.verify.decide(logits[: self.chain().shape[0] + 1], self.proposal)

    def next_block(self) -> int:
        """The next block's size: the drafter's, or what max_tokens leaves of it (as one request's rounds)."""
        return min(self.block_size, self.max_tokens - self.produced + 1)


def ragged_caches(target: Target) -> List[RaggedKVCache]:
    """One ragged cache per layer cache of the target; layers that are not K/V are refused."""
    layers = target.make_cache()
    for layer in layers:
        if type(layer) not in (KVCache, WindowKVCache):
            raise DLLMError(
                f"target '{target.family}' cannot be batched: its {type(layer).__name__} layers are not K/V caches "
                "(recurrent state); serve its requests one at a time"
            )
    return [RaggedKVCache() for _ in layers]


class BatchEngine:
    """Decodes several requests together (see the module's docstring). Synchronous: one thread calls it."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        draft_model: Optional[nn.Module] = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        prefill_step_size: int = 2048,
    ):
        check_models(model, draft_model)
        self.max_rows = whole_number("max_rows", max_rows, 1)
        self.prefill_step_size = whole_number("prefill_step_size", prefill_step_size, 1)
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.eos_ids = tokenizer_eos_ids(self.tokenizer)
        self.vocab_rows = embedding_rows(model)
        self.draft = draft_model
        self.plain = Target(model)  # AR rows' prefill: no features to keep
        self.target = self.plain if draft_model is None else bind_target(draft_model, model)
        self.head = None if draft_model is None else DraftHead(draft_model, self.target)
        self.cache = ragged_caches(self.target)
        self.draft_cache = [] if draft_model is None else [RaggedKVCache() for _ in draft_model.make_cache()]
        self.rows: List[Row] = []  # the batch, in the caches' order (DFlash rows: in the drafter caches' too)
        self.waiting: Deque[Row] = deque()
        self.uids = itertools.count()
        self.committed = 0

    def insert(self, prompt_ids: Sequence[int], max_tokens: int = 256, options: Optional[dict] = None) -> int:
        """Queue a request (token ids, or text the tokenizer encodes as the front does); it joins at the next step
        with room. `options`: temp, top_p, top_k, min_p, seed, mode ("ar" or "dflash"; default: dflash with a
        drafter), and for DFlash rows block_size and speculation ("chain"). Stop strings are the caller's (the
        tokens stream out as ids); the tokenizer's EOS ids end a row."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise DLLMError(f"unknown option {unknown[0]} for batched decoding (it takes {', '.join(OPTIONS)})")
        max_tokens = whole_number("max_tokens", max_tokens, 1)
        prompt = encode_prompt(self.tokenizer, prompt_ids, self.vocab_rows)
        heads = getattr(getattr(self.target.model, "args", None), "num_attention_heads", 1)
        check_fits(heads, min(self.prefill_step_size, prompt.size), prompt.size)  # its prefill's last chunk
        select = self._selector(options)
        verify, block_size = self._verify(options, select)
        row = Row(next(self.uids), prompt, max_tokens, select, verify, block_size)
        self.waiting.append(row)
        return row.uid

    def cancel(self, uid: int) -> bool:
        """Drop a request at once, waiting or running; the others go on undisturbed. False: unknown, or done."""
        for index, row in enumerate(self.waiting):
            if row.uid == uid:
                del self.waiting[index]
                return True
        for index, row in enumerate(self.rows):
            if row.uid == uid:
                self._leave([index])
                return True
        return False

    def step(self) -> List[Event]:
        """One round for every running request, then the waiting ones that fit are prefilled (their first token)."""
        with mx.stream(generation_stream):
            events = self._round() if self.rows else []
            while self.waiting and len(self.rows) < self.max_rows:
                events.append(self._admit(self.waiting.popleft()))
        before, self.committed = self.committed, self.committed + sum(len(event.tokens) for event in events)
        if self.committed // CLEAR_CACHE_EVERY > before // CLEAR_CACHE_EVERY:
            mx.clear_cache()
        return events

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def _selector(self, options: dict) -> TokenSelector:
        temp, top_p = options.get("temp", 0.0), options.get("top_p", 1.0)
        top_k, min_p = options.get("top_k", 0), options.get("min_p", 0.0)
        check_sampling(temp, top_p, top_k, min_p)
        if self.vocab_rows is not None and top_k > self.vocab_rows:
            raise DLLMError(f"top_k {top_k} is above the vocabulary of {self.vocab_rows}")
        seed = options.get("seed")
        keys = None if seed is None else KeyStream(whole_number("seed", seed, 0, SEED_LIMIT - 1))
        return TokenSelector(sampling=None if temp == 0 else Sampling(temp, top_p, top_k, min_p, keys=keys))

    def _verify(self, options: dict, select: TokenSelector):
        """(the row's ChainVerify, its block size), or (None, 0) for an AR row."""
        mode = options.get("mode") or ("ar" if self.draft is None else "dflash")
        if mode not in ("ar", "dflash"):
            raise DLLMError(f"batched rows run mode ar or dflash, not {mode!r}")
        if mode == "ar":
            given = [name for name in ("block_size", "speculation") if options.get(name) is not None]
            if given:
                raise DLLMError(f"{given[0]} is for dflash rows, not ar")
            return None, 0
        if self.draft is None:
            raise DLLMError("mode 'dflash' needs a draft model")
        if options.get("speculation", "chain") not in (None, "chain"):
            raise DLLMError(
                "batched DFlash rows verify chains: speculation='tree' and 'auto' run one request at a time"
            )
        trained = self.draft.block_size
        block_size = trained if options.get("block_size") is None else BLOCK_SIZE.check(options["block_size"])
        if not 2 <= block_size <= trained:
            raise DLLMError(f"block size must be between 2 and the drafter's trained {trained}, got {block_size}")
        return ChainVerify(self.draft, self.target, self.head, select), block_size

    def _admit(self, row: Row) -> Event:
        """Prefill a request alone, draft its first block alone, then add its caches to the batch's."""
        target = self.plain if row.verify is None else self.target
        cache, features, row.anchor = prefill(target, row.prompt, row.select, row.stats, self.prefill_step_size)
        row.produced = 1
        event = self._emit(row, [row.anchor])
        if event.finished:
            return event
        if row.verify is not None:
            draft_cache = self.draft.make_cache()
            row.proposal = row.verify.propose(row.anchor, features, row.next_block(), cache, draft_cache)
            mx.async_eval(row.proposal)
            for ragged, layer in zip(self.draft_cache, draft_cache):
                ragged.join(layer)
        for ragged, layer in zip(self.cache, cache):
            ragged.join(layer)
        self.rows.append(row)
        return event

    def _round(self) -> List[Event]:
        """Verify every row in one forward, commit and keep each row's own share, then draft the DFlash rows' next
        blocks in one drafter forward."""
        chains = [row.chain() for row in self.rows]
        width = 1 + max(chain.shape[0] for chain in chains)
        ids = mx.stack([padded_block(row.anchor, chain, width) for row, chain in zip(self.rows, chains)])
        for layer in self.cache:
            layer.mark()
        logits, features = self.target(ids, self.cache)
        decisions = [row.decide(logits[i]) for i, row in enumerate(self.rows)]
        mx.eval(decisions)  # the round's one host sync
        committed = [decision.committed() for decision in decisions]
        for layer in self.cache:
            layer.keep([len(tokens) for tokens in committed])
        events, contexts = [], []
        for i, (row, tokens, chain) in enumerate(zip(self.rows, committed, chains)):
            # A last round may verify past max_tokens: those tokens are neither emitted nor counted.
            generated = tokens[: row.max_tokens - row.produced]
            row.select.commit(generated)
            row.stats.forwards += 1
            if row.verify is not None:
                row.stats.draft_forwards += 1
                row.stats.count_round("chain", chain.shape[0], len(generated))
                contexts.append(features[i, : len(tokens)])  # the drafter reads the kept positions next
            row.anchor, row.produced = generated[-1], row.produced + len(generated)
            events.append(self._emit(row, generated))
        drafting = [i for i, row in enumerate(self.rows) if row.verify is not None]
        finished = [i for i, event in enumerate(events) if event.finished]
        self._leave(finished)
        self._draft([context for i, context in zip(drafting, contexts) if i not in finished])
        return events

    def _draft(self, contexts: List[mx.array]) -> None:
        """One drafter forward over every DFlash row: its new context rows `contexts[i]` [S_i, F] and its block."""
        drafting = [row for row in self.rows if row.verify is not None]
        if not drafting:
            return
        sizes = [row.next_block() for row in drafting]
        fresh = [context.shape[0] for context in contexts]
        longest, widest = max(fresh), max(sizes)
        context = mx.stack([mx.pad(c, [(0, longest - c.shape[0]), (0, 0)]) for c in contexts])
        block = mx.array([[row.anchor] + [self.draft.mask_token_id] * (widest - 1) for row in drafting])
        for layer in self.draft_cache:
            layer.prepare(fresh, sizes)
        hidden = self.draft(self.target.embed(block), context, self.draft_cache, start=1)
        logits = self.head.logits(hidden)  # one head forward for every row: the head's weights are read once
        for i, (row, size) in enumerate(zip(drafting, sizes)):
            row.proposal = row.verify.choose(hidden[i, : size - 1], row.anchor, logits[i, : size - 1])
        mx.async_eval([row.proposal for row in drafting])  # the drafter runs while the caller streams the tokens

    def _emit(self, row: Row, generated: List[int]) -> Event:
        """The tokens a request shows, up to its first stop token, as the front's (which stops there)."""
        tokens, finished = [], None
        for token in generated:
            if token == NOT_FINITE or token in self.eos_ids:
                finished = "error" if token == NOT_FINITE else "stop"
                break
            tokens.append(token)
        if finished is None and row.produced >= row.max_tokens:
            finished = "length"
        return Event(row.uid, tokens, finished, row.stats)

    def _leave(self, indices: Sequence[int]) -> None:
        """Remove the rows at `indices` from the batch and its caches."""
        if not indices:
            return
        gone = set(indices)
        drafting = [i for i, row in enumerate(self.rows) if row.verify is not None]
        for layer in self.cache:
            layer.filter([i for i in range(len(self.rows)) if i not in gone])
        for layer in self.draft_cache:
            layer.filter([rank for rank, i in enumerate(drafting) if i not in gone])
        self.rows = [row for i, row in enumerate(self.rows) if i not in gone]


def padded_block(anchor: int, chain: mx.array, width: int) -> mx.array:
    """[anchor, chain..., 0...] of `width` ids: the padding sits after the row's real positions, which never see it."""
    parts = [mx.array([anchor], dtype=mx.int32), chain.astype(mx.int32)]
    return mx.concatenate(parts + [mx.zeros((width - 1 - chain.shape[0],), dtype=mx.int32)])
