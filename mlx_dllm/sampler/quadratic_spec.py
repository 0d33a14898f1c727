"""Quadratic self-speculation (NVIDIA's reference `self_spec_generate`): one forward verifies the current
draft and drafts the next one for every possible outcome.

The layout has B rows `[d_i, mask x B]`; row i sits at positions C+i .. C+i+B. The d tokens attend causally
to the cache and to d_0..d_i, so their logits are exactly the AR verification of the draft; the masks of
row i attend to the cache, d_0..d_i and their own row, so they draft the block that follows if d_0..d_i are
accepted. After accepting, the next draft is row (accepted-1): its first token is the AR bonus token.

B is `block_length` when pinned, else chosen per forward from this machine's cost curve and the acceptance so far
(`adaptive.BlockChoice`): fewer rows cut the next draft, more rows pad it (`resize`).
"""

from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..kernels import patterns
from .blocks import BLOCK_LENGTH, THINKING, ThinkingBudget, block_policy, causal_prefill
from .common import Stats, TokenSelector
from .mode import Mode
from .prompt_cache import NO_REUSE, PromptState


def propose(model: nn.Module, hidden: mx.array, position: int) -> mx.array:
    """Draft tokens from mask hidden states (the first sits at absolute `position`): their argmax, on device."""
    return mx.argmax(model.diffusion_head(hidden), axis=-1).astype(mx.int32)


def layout_forward(model: nn.Module, cache: List, draft: mx.array, select: TokenSelector):
    """Queue one layout forward over `draft` (on device); returns the cache length before it, its hidden rows
    and the verify tokens. The pattern is two integers: the attention kernel computes who sees whom."""
    rows, committed = draft.shape[0], cache[0].offset
    masks = mx.full((rows, rows), model.args.mask_token_id, dtype=mx.int32)
    layout = mx.concatenate([draft[:, None], masks], axis=1).reshape(1, -1)
    pattern = patterns.quadratic(prefix=committed, rows=rows)
    cache.mark()
    hidden = model(layout, cache, pattern=pattern, row_offsets=committed + mx.arange(rows), head=False)[0]
    hidden = hidden.reshape(rows, rows + 1, -1)
    verified = select(model.diffusion_head(hidden[:, 0]), drafts=draft[1:])  # row i: the AR token after d_i
    mx.async_eval(draft, verified)
    return committed, hidden, verified


def resize(draft: mx.array, rows: int, mask_id: int) -> mx.array:
    """The draft cut to `rows` tokens, or grown to them with the mask id. A layout of R rows drafts R tokens for the
    next one, so growing by what was drafted would never grow; mask ids are verified like any draft (accepted only
    where the model itself predicts that id: the output stays AR's), and after one cycle of such rows the bigger
    layout drafts a full block."""
    if rows <= draft.shape[0]:
        return draft[:rows]
    return mx.concatenate([draft, mx.full((rows - draft.shape[0],), mask_id, dtype=mx.int32)])


def generate_quadratic_spec(
    model: nn.Module,
    prompt: mx.array,
    *,
    select: TokenSelector,
    stats: Stats,
    max_tokens: int,
    prefill_step_size: int = 2048,
    options: Optional[dict] = None,
    prompt_state: PromptState = NO_REUSE,
    **_,
) -> Iterator[List[int]]:
    """Yield the prefill's token, then per forward the accepted drafts and the bonus token (1..B tokens).
    The next draft stays on device and the next layout forward is queued before the tokens go out."""
    options = options or {}
    policy = block_policy(model, options, layout=True)
    budget = ThinkingBudget(options)
    mask_id = model.args.mask_token_id
    rows = policy.choose()
    cache, first = causal_prefill(model, prompt, select, stats, prefill_step_size, prompt_state)
    # The initial draft: d_0 from the causal prefill, d_1.. from masks denoised against the prompt.
    masks = model(mx.array([[mask_id] * rows]), cache, pattern="bidirectional", write_cache=False, head=False)[0]
    stats.draft_forwards += 1
    draft = mx.concatenate([mx.array([first], dtype=mx.int32), propose(model, masks[1:], prompt.shape[0] + 1)])
    real = rows  # the draft's tokens that the model drafted, before any mask-id padding
    produced = 1
    generated = [first]  # the cache holds all but the last (the bonus, next cycle's d_0)
    step = layout_forward(model, cache, draft, select) if produced < max_tokens else None
    try:
        yield [first]  # d_0 is the prefill's AR token: already certain
        while step is not None:
            committed, hidden, verified = step
            step = None  # kept below
            drafted, verified = draft.tolist(), verified.tolist()  # the cycle's one host sync
            stats.forwards += 1
            rows, accepted = len(drafted), 1
            while accepted < rows and verified[accepted - 1] == drafted[accepted]:
                accepted += 1
            cache.keep([i * (rows + 1) for i in range(accepted)])  # the accepted d tokens' K/V (causal, AR-exact)
            chosen = hidden[accepted - 1, 2:]  # the masks after the bonus token, conditioned on the accepted prefix
            bonus = verified[accepted - 1]
            next_draft = propose(model, chosen, committed + accepted + 1)
            policy.observe(real, min(accepted, real) - 1)  # d_0 is certain; padding is no draft of the model's
            stats.count_round("chain", rows - 1, accepted)
            if budget.force_at(produced + accepted - 1, drafted[:accepted]):
                bonus, next_draft = budget.token, mx.concatenate([mx.array([bonus], dtype=mx.int32), next_draft[:-1]])
            draft = mx.concatenate([mx.array([bonus], dtype=mx.int32), next_draft])
            next_rows = policy.choose()
            draft, real = resize(draft, next_rows, mask_id), min(rows, next_rows)
            # The bonus token is certain now (it is next cycle's d_0, whose K/V that cycle writes): emit it.
            emitted = drafted[1:accepted] + [bonus]
            select.commit(emitted)
            generated += emitted
            produced += len(emitted)
            step = layout_forward(model, cache, draft, select) if produced < max_tokens else None
            yield emitted
    finally:
        if step is not None:
            cache.keep(0)  # the queued layout commits nothing
        prompt_state.leave(generated[:-1], [*cache])


MODE = Mode(
    "quadratic-spec",
    generate_quadratic_spec,
    lossless=True,
    samples=True,
    honours_sampler=True,  # the d tokens' causal logits choose every token
    # One layout forward of rows*(rows+1) tokens verifies a draft and drafts the next.
    step_forwards=lambda model, draft, rows: [(model, rows * (rows + 1))],
    options=(BLOCK_LENGTH, *THINKING),
    reports=("acceptance_length", "speculation"),
)
