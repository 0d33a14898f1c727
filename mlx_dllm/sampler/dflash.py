"""DFlash speculative decoding: one drafter forward proposes a block, one target forward verifies it.

A chain (speculation='chain') is verified in one of two ways, both lossless:

- sampled proposals, at temp > 0 with mlx-lm's temp/top_p/top_k/min_p (the selector's explicit `distribution`):
  each x_i is drawn from the drafter's distribution q_i under the same configuration (a DFlash2 drafter's: its
  selector's scores along its sampled walk), and accepted left to right with probability min(1, p_i(x_i) /
  q_i(x_i)), p_i being the target's filtered distribution; the first rejection draws its replacement from
  norm(max(0, p_i - q_i)) (p_i if that is all zero), and a block accepted whole draws the bonus from p at the last
  row. That is speculative sampling (Leviathan et al. 2023, Chen et al. 2023): each token follows the target's
  distribution exactly;
- deterministic proposals otherwise (greedy; a caller's own `sampler=`; logits processors, whose distribution is
  not explicit): the drafter's argmax (a DFlash2 drafter's: its selector's greedy path), accepted iff it equals the
  target's own token at that row (its sample, argmax at temp 0). That is rejection sampling with a one-hot
  proposal, so the output is the target's as well, token for token equal to greedy AR at temp 0.

Trees (speculation='tree'/'auto', TreeVerify) keep deterministic candidates: the drafter's top tokens, or the best
paths through a DFlash2 drafter's candidate lattice.
"""

from typing import Iterator, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import DLLMError
from ..models.drafter import Drafter, chooses_chain, grows_lattice, is_drafter
from ..models.dtypes import compute_dtype
from ..kernels import patterns
from ..models.positioned import check_tree_caches
from ..models.target import Target
from .adaptive import Adaptive, Pinned, kind
from .arguments import whole_number
from .common import NOT_FINITE, Sampling, Stats, TokenSelector, prefill_chunks
from .cost_curve import CONTEXT, cost_curve, curve_key, measure
from .mode import Mode, Option
from .prompt_cache import NO_REUSE, DraftState, PromptState
from .tree import Lattice, follow

BLOCK_SIZE = Option("block_size", int, "draft block size (default: the drafter's)", minimum=2, label="block size")
SPECULATION = Option(
    "speculation",
    str,
    "per round: auto (AR, a chain or a tree, whichever this machine runs fastest; the default), the drafter's best "
    "chain, or a tree of its top tokens (DDTree; a DFlash2 drafter's: the best paths through its candidates)",
    choices=("auto", "chain", "tree"),
)
TREE_BUDGET = Option(
    "tree_budget", int, "draft tree nodes: a tree's (alone it pins one; default: the block size - 1), or the most "
    "auto verifies (default: 32)", minimum=1,
)
AUTO_BUDGET = 32  # the most drafted tokens auto verifies in a round, unless tree_budget says otherwise
AUTO_WIDTH = 4  # candidates per position auto's trees choose from: a fifth-ranked token is rarely worth a node


def block_size_option(block_size, num_draft_tokens) -> Optional[int]:
    """DFlash's block: `block_size`, or mlx-lm's `num_draft_tokens` (the block minus its anchor)."""
    if num_draft_tokens is None:
        return block_size
    if block_size is not None:
        raise DLLMError("give block_size or num_draft_tokens, not both (block size = draft tokens + 1)")
    return whole_number("num_draft_tokens", num_draft_tokens, 1) + 1


def bind_target(draft: Drafter, model: nn.Module) -> Target:
    """Check that `draft` can read `model` and return the target adapter capturing its layers.

    The drafter is cast to the target's compute dtype: mixed dtypes (an fp16 target with a bf16
    drafter) would promote every draft forward, and the target head it feeds, to float32."""
    if not is_drafter(draft):
        raise DLLMError(f"the draft model must be a DFlash drafter, got {type(draft).__name__}")
    target_args = getattr(model, "args", None)
    target_hidden = getattr(target_args, "hidden_size", None)
    if target_hidden is not None and target_hidden != draft.hidden_size:
        raise DLLMError(f"draft hidden size {draft.hidden_size} does not match the target's {target_hidden}")
    target = Target(model, draft.target_layer_ids)
    vocab_rows = target.embed_tokens.weight.shape[0]
    if not 0 <= draft.mask_token_id < vocab_rows:
        raise DLLMError(
            f"mask_token_id {draft.mask_token_id} is outside the target's embedding table ({vocab_rows} rows)"
        )
    dtype = compute_dtype(target.embed_tokens)
    if any(p.dtype != dtype for _, p in tree_flatten(draft.parameters()) if mx.issubdtype(p.dtype, mx.floating)):
        draft.set_dtype(dtype)
    return target


def _accepted_prefix(draft_tokens: List[int], target_tokens: List[int]) -> int:
    accepted = 0
    while accepted < len(draft_tokens) and draft_tokens[accepted] == target_tokens[accepted]:
        accepted += 1
    return accepted


class Sampled(NamedTuple):
    """Proposals drawn from the drafter's distribution: token ids `tokens` [P] and, for the ratio test, the
    probability each was drawn with (`chosen` [P]) and each position's whole proposal distribution `q` [P, S] over
    the token ids `support` [P, S] (None: q's columns are the token ids themselves)."""

    tokens: mx.array
    chosen: mx.array
    q: mx.array
    support: Optional[mx.array]


class DraftHead:
    """Turns the drafter's hidden states into proposals: the argmax of the target's head (or samples from its
    distribution), or, for a drafter with a `draft_vocab`, of those rows alone (a fraction of the head's cost, which
    for a small target exceeds the drafter's layers). Proposals are verified either way, so the output is the
    target's."""

    def __init__(self, draft: Drafter, target: Target):
        self.draft, self.target, self.ids = draft, target, None
        vocab = draft.draft_vocab
        if vocab is not None:
            rows = target.head_module.weight.shape[0]
            if vocab[-1] >= rows:
                raise DLLMError(f"draft_vocab token {vocab[-1]} is outside the target's head ({rows} rows)")
            self.ids = mx.array(vocab, dtype=mx.int32)
            self.weight, self.bias = target.head_rows(vocab)

    def logits(self, hidden: mx.array) -> mx.array:
        """The drafter's logits over its vocabulary (the target's, or the `draft_vocab` rows)."""
        if self.ids is None:
            return self.draft.logits(self.target.lm_head(hidden))
        logits = hidden @ self.weight.T
        return self.draft.logits(logits if self.bias is None else logits + self.bias)

    def token_ids(self, indices: mx.array) -> mx.array:
        return indices if self.ids is None else self.ids[indices]

    def __call__(self, hidden: mx.array, anchor: int, logits: Optional[mx.array] = None) -> mx.array:
        """The chain after `anchor`: the drafter's own choice where it makes one (DFlash2), else each argmax.
        `logits`: `self.logits(hidden)`, where the caller has them (a batch's rows, from one head forward)."""
        if chooses_chain(self.draft):
            return self._walk(hidden, anchor, None, logits)
        return self.token_ids(mx.argmax(self.logits(hidden) if logits is None else logits, axis=-1))

    def sample(self, hidden: mx.array, anchor: int, sampling: Sampling, logits: Optional[mx.array] = None) -> Sampled:
        """The chain after `anchor` drawn under `sampling`: the drafter's own walk where it makes one (DFlash2), else
        each position independently from the drafter's logits, filtered as the target's are."""
        if chooses_chain(self.draft):
            return Sampled(*self._walk(hidden, anchor, sampling, logits))
        log_q = sampling.log_probs(self.logits(hidden) if logits is None else logits)  # [P, S]
        indices = sampling.categorical(log_q)
        q = mx.exp(log_q)
        chosen = mx.take_along_axis(q, indices[:, None], axis=-1)[:, 0]
        support = None if self.ids is None else mx.broadcast_to(self.ids, q.shape)
        return Sampled(self.token_ids(indices), chosen, q, support)

    def _walk(self, hidden: mx.array, anchor: int, sampling: Optional[Sampling], logits: Optional[mx.array]):
        given = {} if logits is None else {"logits": logits}
        return self.draft.propose(hidden, anchor, self, sampling, **given)

    def top(self, hidden: mx.array, width: int):
        """(token ids, log-probabilities), [positions, width] each, most probable first."""
        logits = self.logits(hidden).astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        width = min(width, log_probs.shape[-1])
        best = mx.argpartition(-log_probs, kth=width - 1, axis=-1)[..., :width]  # no sort of the whole vocabulary
        chosen = mx.take_along_axis(log_probs, best, axis=-1)
        order = mx.argsort(-chosen, axis=-1)
        return self.token_ids(mx.take_along_axis(best, order, axis=-1)), mx.take_along_axis(chosen, order, axis=-1)

    def lattice(self, hidden: mx.array, anchor: int, width: int):
        """What a tree grows from (tree.Lattice, as arrays): candidate ids [P, K], per (position, parent candidate)
        the `width` best candidate indices and their log-probabilities [P, K', width]. The drafter's own lattice
        where it scores candidates given their predecessor (DFlash2), else its top tokens per position (K' = 1)."""
        if grows_lattice(self.draft):
            return self.draft.lattice(hidden, anchor, self, width)
        return independent_lattice(*self.top(hidden, width))


def independent_lattice(tokens: mx.array, log_probs: mx.array):
    """Top tokens per position [P, W] and their log-probabilities, most probable first, as DraftHead.lattice gives
    them: one row per position, whatever the parent."""
    ranked = mx.broadcast_to(mx.arange(tokens.shape[-1]), tokens.shape)
    return tokens, ranked[:, None], log_probs[:, None]


def draft_hidden(draft: Drafter, target: Target, anchor: int, features: mx.array, draft_cache, size: int):
    """One drafter forward over `[anchor, mask x (size-1)]`: its hidden states for positions 1..size-1."""
    block = mx.array([[anchor] + [draft.mask_token_id] * (size - 1)])
    return draft(target.embed(block), features, draft_cache, start=1)[0]


def propose_block(
    draft: Drafter, target: Target, anchor: int, features: mx.array, draft_cache, size: int, head: DraftHead
) -> mx.array:
    """The chain's proposals for positions 1..size-1 (the drafter's most probable token at each, or its own path)."""
    return head(draft_hidden(draft, target, anchor, features, draft_cache, size), anchor)


def sample_block(
    draft: Drafter,
    target: Target,
    anchor: int,
    features: mx.array,
    draft_cache,
    size: int,
    head: DraftHead,
    sampling: Sampling,
) -> Sampled:
    """The chain's proposals for positions 1..size-1 drawn from the drafter's distribution under `sampling`."""
    return head.sample(draft_hidden(draft, target, anchor, features, draft_cache, size), anchor, sampling)


def ratio_test(logits: mx.array, proposal: Sampled, sampling: Sampling):
    """Speculative sampling of a chain, on the device: the target's logits [P+1, V] at the anchor and the P proposals
    -> (accepted proposals, the token after them), 0-d arrays. Proposal i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)) while all before it were; the first rejected row draws from norm(max(0, p - q)) (p
    where that is all zero), a block accepted whole from p at the last row."""
    p = sampling.probs(logits)
    count = proposal.tokens.shape[0]
    drafted = p[:count]
    p_chosen = mx.take_along_axis(drafted, proposal.tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]
    accept = sampling.uniform((count,)) * proposal.chosen < p_chosen
    accepted = mx.cumprod(accept.astype(mx.int32)).sum()
    q = proposal.q
    if proposal.support is not None:
        q = mx.put_along_axis(mx.zeros_like(drafted), proposal.support.astype(mx.int32), q, axis=-1)
    residual = mx.maximum(drafted - q, 0.0)
    total = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), drafted)
    row = mx.take(mx.concatenate([residual, p[count:]]), accepted, axis=0)
    return accepted, sampling.categorical(mx.log(row))


def generate_dflash(
    model: nn.Module,
    prompt: mx.array,
    *,
    draft_model: Drafter,
    select: TokenSelector,
    stats: Stats,
    max_tokens: int,
    prefill_step_size: int = 2048,
    options: Optional[dict] = None,
    prompt_state: PromptState = NO_REUSE,
    **_,
) -> Iterator[List[int]]:
    """Yield the tokens committed by each round (the first yield is the prefill's token)."""
    options = options or {}
    target = bind_target(draft_model, model)  # first: it checks that the drafter is one
    trained = draft_model.block_size
    block_size = options.get("block_size") or trained
    if not 2 <= block_size <= trained:
        raise DLLMError(f"block size must be between 2 and the drafter's trained {trained}, got {block_size}")
    head = DraftHead(draft_model, target)
    budget = options.get("tree_budget")
    speculation = options.get("speculation") or ("tree" if budget else "auto")
    if speculation == "chain":
        if budget is not None:
            raise DLLMError("tree_budget applies to speculation='tree' or 'auto', not to a chain")
        verify = ChainVerify(draft_model, target, head, select)
    elif speculation == "tree":
        check_tree_caches(target.make_cache())
        budget = budget or block_size - 1
        verify = TreeVerify(draft_model, target, head, select, Pinned(budget), width=budget)
    else:
        budget = budget or AUTO_BUDGET
        width = AUTO_WIDTH if trees_run_on(target) else 1  # else chains only: every tree of width 1 is a path
        curve = measured_costs(target, draft_model, head, block_size, budget + 1, width)
        verify = TreeVerify(draft_model, target, head, select, Adaptive(curve, budget), width)
    yield from _decode(
        target, draft_model, verify, prompt, select, stats, max_tokens, block_size, prefill_step_size, prompt_state
    )


def trees_run_on(target: Target) -> bool:
    try:
        check_tree_caches(target.make_cache())
    except DLLMError:
        return False
    return True


def measured_costs(target: Target, draft: Drafter, head: DraftHead, block_size: int, largest: int, width: int):
    """This machine's cost curve for the pair, from the user's cache or measured now on scratch caches."""

    def timing(sizes):
        cache, draft_cache = target.make_cache(), draft.make_cache()
        context = mx.arange(CONTEXT)[None] % target.embed_tokens.weight.shape[0]
        features = target(context, cache)[1]
        draft_hidden(draft, target, 0, features, draft_cache, block_size)  # the drafter reads the context once
        mx.eval(features, [layer.state for layer in cache], [layer.state for layer in draft_cache])

        def verify(tokens: int) -> None:
            cache.mark()
            mx.eval(target(mx.zeros((1, tokens), dtype=mx.int32), cache))
            cache.keep(0)

        def draft_forward() -> None:  # one context row more each time, as in a round
            mx.eval(head.lattice(draft_hidden(draft, target, 0, features[:, -1:], draft_cache, block_size), 0, width))

        return measure(verify, draft_forward, sizes)

    return cost_curve(curve_key(target.model, draft, block_size, width), largest, timing)


class Step(NamedTuple):
    """An AR round: the target's token after the anchor and the anchor's features, queued before the yield."""

    token: mx.array
    features: mx.array


class Verified(NamedTuple):
    """A round's outcome: the committed tokens, the features of the rows the caches kept, and what was verified."""

    committed: List[int]
    features: mx.array
    kind: str  # "ar", "chain" or "tree"
    nodes: int  # drafted tokens verified


class ChainVerify:
    """A chain of proposals verified as one causal block: drawn from the drafter's distribution and ratio-tested
    where the selector's distribution is explicit (`TokenSelector.distribution`), else the drafter's most probable
    token at each position, matched against the target's own token (see the module's docstring). The proposal stays
    on the device: the drafter and the verify run as one graph, with one host sync after the verify."""

    def __init__(self, draft: Drafter, target: Target, head: DraftHead, select: TokenSelector):
        self.draft, self.target, self.head, self.select = draft, target, head, select
        self.unread = None  # every round drafts: no row waits for the drafter

    def propose(self, anchor: int, features: mx.array, size: int, cache, draft_cache):
        sampling = self.select.distribution
        if sampling is None:
            return propose_block(self.draft, self.target, anchor, features, draft_cache, size, self.head)
        return sample_block(self.draft, self.target, anchor, features, draft_cache, size, self.head, sampling)

    def choose(self, hidden: mx.array, anchor: int, logits: Optional[mx.array] = None):
        """The chain from the drafter's hidden states [P, H] of positions 1..P and its `logits` on them (a batch's
        row): drawn where the selector's distribution is explicit, else the drafter's most probable path."""
        sampling = self.select.distribution
        if sampling is None:
            return self.head(hidden, anchor, logits)
        return self.head.sample(hidden, anchor, sampling, logits)

    def __call__(self, anchor: int, proposal, cache, position: int) -> Verified:
        drafts = proposal.tokens if isinstance(proposal, Sampled) else proposal
        cache.mark()
        logits, features = self.target(mx.concatenate([mx.array([anchor]), drafts.astype(mx.int32)])[None], cache)
        decision = self.decide(logits[0], proposal)
        mx.eval(decision)
        committed = decision.committed()
        cache.keep(len(committed))
        return Verified(committed, features[:, : len(committed)], "chain", drafts.shape[0])

    def decide(self, logits: mx.array, proposal):
        """The round's decision on the device, from the target's logits [P+1, V] at the anchor and the P proposals:
        evaluated (a batch evaluates every row's at once) before its `committed` reads it."""
        if isinstance(proposal, Sampled):
            accepted, token = ratio_test(logits, proposal, self.select.distribution)
            finite = mx.isfinite(mx.logsumexp(mx.take(logits, accepted, axis=0).astype(mx.float32)))
            return RatioTested(accepted, token, finite, proposal.tokens)
        return Matched(self.select(logits, drafts=proposal), proposal)


class RatioTested(NamedTuple):
    """A sampled chain's ratio test (`ratio_test`) and whether the row its token came from is finite."""

    accepted: mx.array
    token: mx.array
    finite: mx.array
    drafts: mx.array

    def committed(self) -> List[int]:
        """The accepted proposals and the token after them."""
        accepted, drafts = self.accepted.item(), self.drafts.tolist()
        # A row that is not finite is never accepted (its ratio is NaN); the front stops at the one it reaches.
        return drafts[:accepted] + [self.token.item() if self.finite.item() else NOT_FINITE]


class Matched(NamedTuple):
    """A deterministic chain and the target's own token at each of its rows (and the one after)."""

    targets: mx.array
    drafts: mx.array

    def committed(self) -> List[int]:
        """The proposals that match the target's tokens, and the target's token after them."""
        drafts, targets = self.drafts.tolist(), self.targets.tolist()
        accepted = _accepted_prefix(drafts, targets)
        return drafts[:accepted] + [targets[accepted]]


class TreeVerify:
    """Each round a tree that `policy` shapes from the drafter's lattice (DraftHead.lattice: its top `width` tokens
    per position, DDTree, or the paths through a DFlash2 drafter's candidates under its pair scores), verified
    in one forward whose rows see their ancestors, at position anchor + depth (a tree that is one path, or the
    anchor alone, runs as a plain causal block). The target chooses its own token after every row, as it would
    after that row's path; walking its choices down the tree commits exactly what AR would (greedy or sampled:
    each committed token is the target's own draw given the tokens before it). Its candidates stay deterministic
    (the lattice's best paths) at every temperature, unlike a sampled chain's: with deterministic candidates,
    SpecInfer's recursive rejection over siblings accepts sibling i with probability
    p(x_i) / (1 - p(x_1) - ... - p(x_(i-1))), so some sibling with p(x_1) + p(x_2) + ...: exactly what matching
    the target's own draw accepts; this is that scheme. A policy that skips the drafter makes the round one AR
    step, queued before the yield as AR's are."""

    def __init__(self, draft: Drafter, target: Target, head: DraftHead, select: TokenSelector, policy, width: int):
        self.draft, self.target, self.head, self.select = draft, target, head, select
        self.policy, self.width = policy, width
        self.unread = None  # features of AR steps' rows, for the drafter's next forward

    def propose(self, anchor: int, features: mx.array, size: int, cache, draft_cache):
        if self.unread is not None:
            features = mx.concatenate([self.unread, features], axis=1)
        if not self.policy.drafts():
            self.unread = features
            logits, step_features = self.target(mx.array([[anchor]]), cache)
            return Step(self.select(logits[0]), step_features)
        self.unread = None
        hidden = draft_hidden(self.draft, self.target, anchor, features, draft_cache, size)
        return self.head.lattice(hidden, anchor, self.width)

    def __call__(self, anchor: int, proposal, cache, position: int) -> Verified:
        if isinstance(proposal, Step):
            return Verified(proposal.token.tolist(), proposal.features, "ar", 0)
        lattice = Lattice(*(part.tolist() for part in proposal))  # the round's host sync before the verify
        tree = self.policy.shape(anchor, lattice)
        shape = kind(tree)
        cache.mark()
        ids = mx.array([list(tree.tokens)])
        if shape == "tree":
            positions = mx.array([position + depth for depth in tree.depths])
            logits, features = self.target(ids, cache, patterns.tree(position, tree.parents), positions)
        else:
            logits, features = self.target(ids, cache)
        lineages = [tree.lineage(row) for row in range(len(tree))] if self.select.processors else None
        path, bonus = follow(tree, self.select(logits[0], lineages=lineages).tolist())
        self.policy.observe(tree, path)
        rows = [0] + path
        cache.keep(rows)
        return Verified([tree.tokens[row] for row in path] + [bonus], features[:, mx.array(rows)], shape, len(tree) - 1)


def prefill(target: Target, prompt: mx.array, select: TokenSelector, stats: Stats, step: int, cache=None,
            unread: Optional[mx.array] = None):
    """(the target's caches, the features of every row the drafter has not read: `unread` (a resumed state's), then
    the prompt's (None where the target captures none), the token the prompt's last logit selects). `cache`: the
    target's caches already holding what precedes `prompt` (a resumed state), else fresh ones."""
    cache = target.make_cache() if cache is None else cache
    keep = (lambda output: output[1]) if target.capture_layer_ids else None
    kept, (logits, last_features) = prefill_chunks(lambda ids: target(ids[None], cache), prompt, step, cache, keep)
    rows = [f for f in (unread, *kept, last_features) if f is not None]
    features = mx.concatenate(rows, axis=1) if rows else None
    anchor = int(select(logits[:, -1]).item())
    select.commit([anchor])
    stats.mark_prefill()
    stats.forwards, stats.prefill_forwards, stats.prefill_tokens = 1, 1, 1
    return cache, features, anchor


def resumed_prefill(target: Target, draft: Drafter, prompt: mx.array, select: TokenSelector, stats: Stats, step: int,
                    prompt_state: PromptState):
    """Prefill what `prompt_state` does not resume of `prompt` after the state it resumes (else from scratch), and
    hand it the prompt's end: (the target's caches, the drafter's part: its caches and the features of every row it
    has not read, the token the prompt's last logit selects)."""
    resumed = prompt_state.resume()
    drafter = resumed[-1] if resumed else DraftState(draft.make_cache(), None)
    cache, features, anchor = prefill(target, prompt[prompt_state.start :], select, stats, step,
                                      target.make_cache(resumed[:-1]) if resumed else None, drafter.unread)
    prompt_state.prompt_end([*cache, DraftState(drafter.caches, features)])
    return cache, DraftState(drafter.caches, features), anchor


def _decode(target, draft_model, verify, prompt, select, stats, max_tokens, block_size, prefill_step_size,
            prompt_state):
    """Prefill, then draft (or queue an AR step) -> verify -> accept -> roll back, one round per yield. The state
    resumed and left is the target's caches and the drafter's part (DraftState)."""
    cache, drafter, anchor = resumed_prefill(target, draft_model, prompt, select, stats, prefill_step_size,
                                             prompt_state)
    features, draft_cache = drafter.unread, drafter.caches
    generated, produced = [anchor], 1
    committed = [anchor]  # the target holds all but the anchor, unless a round cut at max_tokens or an AR step kept it
    anchor_held = False

    def draft(anchor: int, features: mx.array):
        size = min(block_size, max_tokens - produced + 1)
        if size < 2:
            return None
        return verify.propose(anchor, features, size, cache, draft_cache)

    proposal = draft(anchor, features)
    try:
        while True:
            if proposal is not None:
                mx.async_eval(proposal)  # the drafter (or an AR step) runs while the front streams the last tokens
            yield generated
            if proposal is None:
                return
            # The cache holds the prompt and every committed token but the anchor, which sits next.
            outcome = verify(anchor, proposal, cache, prompt.shape[0] + produced - 1)
            stats.forwards += 1
            stats.draft_forwards += not isinstance(proposal, Step)
            # A last round may verify one token past max_tokens: that token is neither emitted nor counted.
            generated = outcome.committed[: max_tokens - produced]
            anchor_held = len(generated) < len(outcome.committed)  # cut: the target kept the new anchor's row too
            select.commit(generated)
            stats.count_round(outcome.kind, outcome.nodes, len(generated))
            anchor = generated[-1]
            produced += len(generated)
            committed += generated
            features = outcome.features
            proposal = draft(anchor, features)
    finally:
        # Rows the drafter has not read: those a tree's AR steps kept back, those no draft read (the last round's),
        # and a queued AR step's, which also put the anchor in the target's cache.
        unread = [verify.unread]
        if proposal is None:
            unread.append(features)
        elif isinstance(proposal, Step):
            unread.append(proposal.features)
            anchor_held = True
        held = committed if anchor_held else committed[:-1]
        unread = [rows for rows in unread if rows is not None]
        prompt_state.leave(held, [*cache, DraftState(draft_cache, mx.concatenate(unread, axis=1) if unread else None)])


MODE = Mode(
    "dflash",
    generate_dflash,
    lossless=True,
    samples=True,
    honours_sampler=True,  # the target's verify logits choose every token
    step_forwards=lambda model, draft, block: [(model, block), (draft, block)],  # one verify, one draft
    options=(BLOCK_SIZE, SPECULATION, TREE_BUDGET),
    drafter=True,
    reports=("acceptance_length", "speculation"),
)
