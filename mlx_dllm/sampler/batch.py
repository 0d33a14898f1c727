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

Prompt-cache reuse (`insert(prompt_state=...)`, sampler/prompt_cache.py) is a lone run's: a new row resumes the state
an earlier request left for its prompt's prefix and prefills only the rest, and a row that finishes cleanly (a stop
token, max_tokens, or `finish`) leaves its own: its rows of the batch's caches taken out as the one-row caches it
would hold alone, under a lone run's key, so batched and lone requests resume each other's states. A cancelled or
failed row leaves nothing.

Adaptive rows (speculation 'auto', the default, as alone): a round's cost is one forward over rows x width
positions whatever each row drafted, so the batch chooses one width per round (adaptive.BatchWidth, from this
machine's cost curve and each row's drafter confidences, calibrated by what the target accepted in that row) and each
adaptive row verifies that many of its drafts; when drafted rounds commit more slowly than AR steps of the same rows,
rounds skip the drafter (every DFlash row adaptive), and the rows the drafter has not read wait for its next forward.
Their proposals are the drafter's deterministic path at every temperature, matched against the target's own draws
(as auto's trees alone), so the width may depend on them: each committed token is the target's draw either way.

Each request's output is what `stream_generate` gives it alone: greedy rows token for token (adaptive ones equal
greedy AR); rows pinning speculation='chain' and AR rows, seeded, draw from their own streams (common.KeyStream),
the draws `mx.random.seed(seed)` gives one request, in the same order, so they commit the same tokens wherever the
batch's logits equal one request's (bit for bit on the CPU in float32; a GPU's matmuls may round a batch's rows
differently in the last bits); seeded adaptive rows follow the target's distribution, with other draws than alone
(whose auto may verify trees). Rows without a seed draw from MLX's global stream.

Chains only: trees (speculation='tree', a tree_budget) run one request at a time, as do recurrent targets, whose
states cannot be rows of their own lengths.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, List, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..errors import DLLMError
from ..kernels.attention import check_fits
from ..models.cache import WindowKVCache
from ..models.ragged import RaggedKVCache
from ..models.target import Target
from .adaptive import BatchWidth, Calibration, chain_gains
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
from .dflash import (
    BLOCK_SIZE,
    ChainVerify,
    DraftHead,
    Sampled,
    bind_target,
    draft_hidden,
    measured_costs,
    prefill,
    resumed_prefill,
)
from .prompt_cache import NO_REUSE, DraftState, PromptState

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
    adaptive: bool = False  # verifies as many drafts as the batch's width (else its whole block)
    stats: Stats = field(default_factory=Stats)
    produced: int = 0  # tokens committed, the prefill's included
    anchor: int = 0  # the last committed token, the next verify's first position
    proposal: Any = None  # the chain the next verify checks (DFlash rows), on the device; None: nothing drafted
    confidences: Any = None  # adaptive rows: the drafter's probability at each drafted position, on the device
    judged: List[float] = field(default_factory=list)  # adaptive rows: those of the drafts verified this round
    calibration: Calibration = field(default_factory=Calibration)
    unread: Optional[mx.array] = None  # DFlash rows: features of committed positions the drafter has not read [S, F]
    prompt_state: PromptState = NO_REUSE
    held: List[int] = field(default_factory=list)  # the tokens after the prompt that the target's caches hold

    def chain(self) -> mx.array:
        if self.proposal is None:
            return mx.zeros((0,), dtype=mx.int32)
        return self.proposal.tokens if isinstance(self.proposal, Sampled) else self.proposal

    def decide(self, logits: mx.array):
        """The round's decision from this row's verify logits [width, V] (its padding included)."""
        if self.proposal is None:
            return Stepped(self.select(logits[:1]))
        return self.verify.decide(logits[: self.chain().shape[0] + 1], self.proposal)

    def read(self, features: mx.array) -> None:
        """Add the features of positions this round kept to those the drafter reads next."""
        self.unread = features if self.unread is None else mx.concatenate([self.unread, features])

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
        self.policy: Optional[BatchWidth] = None  # measured at the first adaptive row

    def insert(self, prompt_ids: Sequence[int], max_tokens: int = 256, options: Optional[dict] = None,
               prompt_state: PromptState = NO_REUSE) -> int:
        """Queue a request (token ids, or text the tokenizer encodes as the front does); it joins at the next step
        with room. `options`: temp, top_p, top_k, min_p, seed, mode ("ar" or "dflash"; default: dflash with a
        drafter), and for DFlash rows block_size and speculation ("auto", the default, or "chain"). Stop strings are
        the caller's (the tokens stream out as ids); the tokenizer's EOS ids end a row. `prompt_state`: the request's
        link to a prompt cache (`PromptCache.begin` with this engine's model and drafter and the row's mode, as a
        lone run's), whose state it resumes and to which it leaves its own once it finishes cleanly."""
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
        adaptive = verify is not None and options.get("speculation") in (None, "auto")
        row = Row(next(self.uids), prompt, max_tokens, select, verify, block_size, adaptive, prompt_state=prompt_state)
        self.waiting.append(row)
        return row.uid

    def cancel(self, uid: int) -> bool:
        """Drop a request at once, waiting or running, keeping nothing of it; the others go on undisturbed. False:
        unknown, or done."""
        return self._drop(uid, keep=False)

    def finish(self, uid: int) -> bool:
        """End a request as if it had finished (at a stop string its caller found): a running one leaves its state to
        its prompt cache as a finished row does. False: unknown, or done."""
        return self._drop(uid, keep=True)

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
        if options.get("speculation") not in (None, "auto", "chain"):
            raise DLLMError("batched DFlash rows verify chains: speculation='tree' runs one request at a time")
        trained = self.draft.block_size
        block_size = trained if options.get("block_size") is None else BLOCK_SIZE.check(options["block_size"])
        if not 2 <= block_size <= trained:
            raise DLLMError(f"block size must be between 2 and the drafter's trained {trained}, got {block_size}")
        return ChainVerify(self.draft, self.target, self.head, select), block_size

    def _admit(self, row: Row) -> Event:
        """Prefill a request alone after the state it resumes, draft its first block alone, then add its caches to
        the batch's."""
        cache, drafter = self._prefill(row)
        row.produced = 1
        event = self._emit(row, [row.anchor])
        if event.finished:
            if event.finished != "error":
                self._store(row, [*cache] if drafter is None else [*cache, drafter])
            return event
        if drafter is not None:
            if row.adaptive and self.policy is None:
                largest = self.max_rows * self.draft.block_size
                curve = measured_costs(self.target, self.draft, self.head, self.draft.block_size, largest, 1)
                self.policy = BatchWidth(curve, self.draft.block_size)
            hidden = draft_hidden(self.draft, self.target, row.anchor, drafter.unread, drafter.caches,
                                  row.next_block())
            self._propose(row, hidden, self.head.logits(hidden))
            for ragged, layer in zip(self.draft_cache, drafter.caches):
                ragged.join(layer)
        for ragged, layer in zip(self.cache, cache):
            ragged.join(layer)
        self.rows.append(row)
        return event

    def _prefill(self, row: Row):
        """The row's prompt prefilled alone after the state its prompt state resumes, which gets the prompt's end, as
        alone (ar.py's caches; dflash's, `resumed_prefill`): (the target's layer caches, the drafter's part
        (DraftState), None for an AR row); the row's anchor is the prefill's token."""
        state = row.prompt_state
        if row.verify is not None:
            cache, drafter, row.anchor = resumed_prefill(self.target, self.draft, row.prompt, row.select, row.stats,
                                                         self.prefill_step_size, state)
            return cache, drafter
        cache = state.resume() or make_prompt_cache(self.plain.model)
        cache, _, row.anchor = prefill(self.plain, row.prompt[state.start :], row.select, row.stats,
                                       self.prefill_step_size, cache)
        state.prompt_end(cache)
        return cache, None

    def _round(self) -> List[Event]:
        """Verify every row in one forward, commit and keep each row's own share, then draft the DFlash rows' next
        blocks in one drafter forward."""
        blocks = sum(row.proposal is not None for row in self.rows)  # the drafter forward's rows
        chosen = self._width(blocks)  # 0: no adaptive row drafted
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
        if chosen:
            self.policy.observe(sum(len(tokens) for tokens in committed), len(self.rows), width, blocks)
        events = []
        for i, (row, tokens, chain) in enumerate(zip(self.rows, committed, chains)):
            # A last round may verify past max_tokens: those tokens are neither emitted nor counted.
            generated = tokens[: row.max_tokens - row.produced]
            row.select.commit(generated)
            row.stats.forwards += 1
            if row.verify is not None:
                row.stats.draft_forwards += row.proposal is not None
                row.stats.count_round("chain" if chain.shape[0] else "ar", chain.shape[0], len(generated))
                for j, q in enumerate(row.judged[: len(tokens)]):  # drafts the target judged: up to its first miss
                    row.calibration.observe(q, j < len(tokens) - 1)
                row.read(features[i, : len(tokens)])  # the drafter reads the kept positions next
            row.held += [row.anchor] + tokens[:-1]  # the kept positions: the anchor and the accepted drafts
            row.anchor, row.produced = generated[-1], row.produced + len(generated)
            events.append(self._emit(row, generated))
        ended = [i for i, event in enumerate(events) if event.finished]
        for i in ended:
            if events[i].finished != "error":
                self._keep_state(i)
        self._leave(ended)
        self._draft()
        return events

    def _width(self, blocks: int) -> int:
        """Cut the adaptive rows' chains to the batch's width for this round (BatchWidth): that width, or 0 where no
        adaptive row drafted."""
        adaptive = [row for row in self.rows if row.adaptive and row.proposal is not None]
        for row in self.rows:
            row.judged = []
        if not adaptive:
            return 0
        confidences = [row.confidences.tolist() for row in adaptive]  # the host sync the choice needs
        others = [row for row in self.rows if not (row.adaptive and row.proposal is not None)]
        floor = 1 + max((row.chain().shape[0] for row in others), default=0)
        gains = [chain_gains(drafted, row.calibration) for row, drafted in zip(adaptive, confidences)]
        width = self.policy.width(gains, len(others), floor, len(self.rows), blocks)
        for row, drafted in zip(adaptive, confidences):
            row.proposal, row.judged = row.proposal[: width - 1], drafted[: width - 1]
        return width

    def _draft(self) -> None:
        """One drafter forward over every DFlash row: the context rows it has not read and its block; or none, where
        every DFlash row is adaptive and the policy skips the drafter this round (AR steps)."""
        drafting = [row for row in self.rows if row.verify is not None]
        for row in drafting:
            row.proposal = None
        if not drafting or (all(row.adaptive for row in drafting) and not self.policy.drafts()):
            return
        sizes = [row.next_block() for row in drafting]
        fresh = [row.unread.shape[0] for row in drafting]
        longest, widest = max(fresh), max(sizes)
        context = mx.stack([mx.pad(row.unread, [(0, longest - n), (0, 0)]) for row, n in zip(drafting, fresh)])
        block = mx.array([[row.anchor] + [self.draft.mask_token_id] * (widest - 1) for row in drafting])
        for layer in self.draft_cache:
            layer.prepare(fresh, sizes)
        hidden = self.draft(self.target.embed(block), context, self.draft_cache, start=1)
        logits = self.head.logits(hidden)  # one head forward for every row: the head's weights are read once
        for i, (row, size) in enumerate(zip(drafting, sizes)):
            row.unread = None
            self._propose(row, hidden[i, : size - 1], logits[i, : size - 1])

    def _propose(self, row: Row, hidden: mx.array, logits: mx.array) -> None:
        """The row's chain from the drafter's hidden states [P, H] and logits [P, S] after its anchor: an adaptive
        row's deterministic path and the drafter's probability at each position (its most probable token's: a
        DFlash2 path's tokens are chosen with their predecessors, and calibration maps either to the target's),
        else its verify's choice. Queued: the drafter runs while the caller streams the tokens."""
        if row.adaptive:
            row.proposal = self.head(hidden, row.anchor, logits)
            logits = logits.astype(mx.float32)
            row.confidences = mx.exp(logits.max(axis=-1) - mx.logsumexp(logits, axis=-1))
            mx.async_eval(row.proposal, row.confidences)
        else:
            row.proposal = row.verify.choose(hidden, row.anchor, logits)
            mx.async_eval(row.proposal)

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

    def _drop(self, uid: int, keep: bool) -> bool:
        """Remove a request, waiting or running (its state kept first where `keep`); False: unknown, or done."""
        for index, row in enumerate(self.waiting):
            if row.uid == uid:
                del self.waiting[index]
                return True
        for index, row in enumerate(self.rows):
            if row.uid == uid:
                if keep:
                    self._keep_state(index)
                self._leave([index])
                return True
        return False

    def _keep_state(self, index: int) -> None:
        """Leave the state of the row at `index` to its prompt cache: its rows of the batch's caches taken out as the
        one-row caches it would hold alone (ar.py's layer caches; a DFlash row's target caches and the drafter's part,
        with the features the drafter has not read), holding its prompt and `held`."""
        row = self.rows[index]
        if row.prompt_state.cache is None:
            return  # nothing would keep it
        like = make_prompt_cache(self.plain.model) if row.verify is None else self.target.make_cache()
        entry = [ragged.row(index, layer) for ragged, layer in zip(self.cache, like)]
        if row.verify is not None:
            rank = sum(other.verify is not None for other in self.rows[:index])  # its row of the drafter's caches
            drafter = [ragged.row(rank, layer) for ragged, layer in zip(self.draft_cache, self.draft.make_cache())]
            entry.append(DraftState(drafter, None if row.unread is None else row.unread[None]))
        self._store(row, entry)

    @staticmethod
    def _store(row: Row, entry: List) -> None:
        """Hand a row's state (holding its prompt and `held`) to its prompt cache, as the front does for a call that
        did not fail."""
        row.prompt_state.leave(row.held, entry)
        row.prompt_state.store()

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
