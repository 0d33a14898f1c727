"""DFlash speculative decoding: one drafter forward proposes a block, one target forward verifies it.

Proposals are the drafter's argmax; the target's token at each position is its own sample (argmax at
temp 0), and a proposal is accepted iff it equals that sample. That is rejection sampling with a
one-hot proposal, so the output follows the target's distribution exactly (lossless).
"""

from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import DLLMError
from ..models.drafter import Drafter, is_drafter
from ..models.dtypes import compute_dtype
from ..models.target import Target
from .arguments import whole_number
from .common import Stats, TokenSelector, prefill_chunks
from .mode import Mode, Option

BLOCK_SIZE = Option("block_size", int, "draft block size (default: the drafter's)", minimum=2, label="block size")


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


class DraftHead:
    """Turns the drafter's hidden states into proposals: the argmax of the target's head, or, for a drafter with
    a `draft_vocab`, of those rows alone (a fraction of the head's cost, which for a small target exceeds the
    drafter's layers). Proposals are verified either way, so the output is the target's."""

    def __init__(self, draft: Drafter, target: Target):
        self.draft, self.target, self.ids = draft, target, None
        vocab = draft.draft_vocab
        if vocab is not None:
            rows = target.head_module.weight.shape[0]
            if vocab[-1] >= rows:
                raise DLLMError(f"draft_vocab token {vocab[-1]} is outside the target's head ({rows} rows)")
            self.ids = mx.array(vocab, dtype=mx.int32)
            self.weight, self.bias = target.head_rows(vocab)

    def __call__(self, hidden: mx.array) -> mx.array:
        if self.ids is None:
            return mx.argmax(self.draft.logits(self.target.lm_head(hidden)), axis=-1)
        logits = hidden @ self.weight.T
        logits = logits if self.bias is None else logits + self.bias
        return self.ids[mx.argmax(self.draft.logits(logits), axis=-1)]


def propose_block(
    draft: Drafter, target: Target, anchor: int, features: mx.array, draft_cache, size: int, head: DraftHead
) -> mx.array:
    """One drafter forward over `[anchor, mask x (size-1)]`: the proposals for positions 1..size-1."""
    block = mx.array([[anchor] + [draft.mask_token_id] * (size - 1)])
    hidden = draft(target.embed(block), features, draft_cache, start=1)
    return head(hidden)[0]


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
    **_,
) -> Iterator[List[int]]:
    """Yield the tokens committed by each round (the first yield is the prefill's token)."""
    target = bind_target(draft_model, model)  # first: it checks that the drafter is one
    trained = draft_model.block_size
    block_size = (options or {}).get("block_size") or trained
    if not 2 <= block_size <= trained:
        raise DLLMError(f"block size must be between 2 and the drafter's trained {trained}, got {block_size}")
    head = DraftHead(draft_model, target)
    yield from _decode(target, draft_model, head, prompt, select, stats, max_tokens, block_size, prefill_step_size)


def _decode(target, draft_model, head, prompt, select, stats, max_tokens, block_size, prefill_step_size):
    """Prefill, then draft -> verify -> accept -> roll back, one round per yield."""
    cache = target.make_cache()
    draft_cache = draft_model.make_cache()

    def target_forward(ids: mx.array):
        return target(ids[None], cache)

    kept, (logits, last_features) = prefill_chunks(
        target_forward, prompt, prefill_step_size, cache, keep=lambda output: output[1]
    )
    features = mx.concatenate(kept + [last_features], axis=1)  # the drafter reads every prompt row
    anchor = int(select(logits[:, -1]).item())
    select.commit([anchor])
    stats.mark_prefill()
    stats.forwards, stats.prefill_forwards, stats.prefill_tokens = 1, 1, 1
    generated, produced = [anchor], 1

    def draft(anchor: int, features: mx.array, size: int) -> mx.array:
        return propose_block(draft_model, target, anchor, features, draft_cache, size, head)

    size = min(block_size, max_tokens - produced + 1)
    proposal = draft(anchor, features, size) if size >= 2 else None
    while True:
        if proposal is not None:
            mx.async_eval(proposal)  # the drafter runs while the front streams the last tokens
        yield generated
        if proposal is None:
            return
        stats.draft_forwards += 1
        cache.mark()
        logits, features = target_forward(mx.concatenate([mx.array([anchor]), proposal.astype(mx.int32)]))
        target_tokens = select(logits[0], drafts=proposal)
        mx.eval(target_tokens, proposal)
        stats.forwards += 1
        draft_tokens, target_tokens = proposal.tolist(), target_tokens.tolist()
        accepted = _accepted_prefix(draft_tokens, target_tokens)
        # A last round may verify one token past max_tokens: that token is neither emitted nor counted.
        generated = (draft_tokens[:accepted] + [target_tokens[accepted]])[: max_tokens - produced]
        select.commit(generated)
        stats.accept_lengths.append(len(generated))
        cache.keep(accepted + 1)
        features = features[:, : accepted + 1]
        anchor = generated[-1]
        produced += len(generated)
        size = min(block_size, max_tokens - produced + 1)
        proposal = draft(anchor, features, size) if size >= 2 else None


MODE = Mode(
    "dflash",
    generate_dflash,
    lossless=True,
    samples=True,
    honours_sampler=True,  # the target's verify logits choose every token
    step_forwards=lambda model, draft, block: [(model, block), (draft, block)],  # one verify, one draft
    options=(BLOCK_SIZE,),
    drafter=True,
    reports=("acceptance_length",),
)
