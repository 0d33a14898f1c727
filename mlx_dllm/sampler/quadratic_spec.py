"""Quadratic self-speculation (NVIDIA's reference `self_spec_generate`): one forward verifies the current
draft and drafts the next one for every possible outcome.

The layout has B rows `[d_i, mask x B]`; row i sits at positions C+i .. C+i+B. The d tokens attend causally
to the cache and to d_0..d_i, so their logits are exactly the AR verification of the draft; the masks of
row i attend to the cache, d_0..d_i and their own row, so they draft the block that follows if d_0..d_i are
accepted. After accepting, the next draft is row (accepted-1): its first token is the AR bonus token.
"""

from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .blocks import ThinkingBudget, block_length, causal_prefill, refuse_unknown
from .common import Stats, TokenSelector

# The layout forward runs rows*(rows+1) tokens: at the checkpoint's 32 rows (1,056 tokens) it is compute-bound.
# Roofline, Nemotron-8B (7.95B non-head parameters, 2 FLOPs each per token) on an M3 Max (400 GB/s, ~14 TFLOP/s)
# and an M4 Pro (273 GB/s, ~9 TFLOP/s): at 4 rows (20 tokens) compute stays within 1.15x of the weight-read time
# in bf16 and 8-bit on both, so a forward costs about one AR step and yields ~2.9 tokens; 5 rows gain <20% in
# bf16 but lose 20% in 8-bit, 8 rows (72 tokens) are 2-4x compute-bound everywhere.
DEFAULT_ROWS = 4


def quadratic_mask(rows: int) -> mx.array:
    """Boolean [L, L] attention among the layout's L = rows*(rows+1) tokens (the cache is always visible)."""
    width = rows + 1
    index = mx.arange(rows * width)
    row, col = index // width, index % width
    query_row, key_row = row[:, None], row[None, :]
    sees_drafts = (col[None, :] == 0) & (key_row <= query_row)  # d_0 .. d_row
    sees_own_row = (col[:, None] != 0) & (key_row == query_row)  # masks: their whole row, bidirectionally
    return sees_drafts | sees_own_row


def keep_draft_kv(cache: List, committed: int, rows: int, accepted: int) -> None:
    """After a layout forward, keep only the first `accepted` d tokens' K/V (causal, AR-exact) after the cache."""
    picks = committed + mx.arange(accepted) * (rows + 1)
    for layer_cache in cache:
        for name in ("keys", "values"):
            buffer = getattr(layer_cache, name)
            buffer[..., committed : committed + accepted, :] = buffer[..., picks, :]
        layer_cache.offset = committed + accepted


def propose(model: nn.Module, hidden: mx.array, position: int) -> List[int]:
    """Draft tokens from mask hidden states (the first sits at absolute `position`): their argmax."""
    return mx.argmax(model.diffusion_head(hidden), axis=-1).tolist()


def generate_quadratic_spec(
    model: nn.Module,
    prompt: mx.array,
    *,
    select: TokenSelector,
    stats: Stats,
    max_tokens: int,
    prefill_step_size: int = 2048,
    options: Optional[dict] = None,
    **_,
) -> Iterator[List[int]]:
    """Yield the prefill's token, then per forward the accepted drafts and the bonus token (1..B tokens)."""
    options = dict(options or {})
    rows = block_length(model, options, default=DEFAULT_ROWS, layout=True)
    budget = ThinkingBudget(options)
    refuse_unknown(options, "quadratic-spec")
    mask_id, width = model.args.mask_token_id, rows + 1
    cache, first = causal_prefill(model, prompt, select, stats, prefill_step_size)
    # The initial draft: d_0 from the causal prefill, d_1.. from masks denoised against the prompt.
    masks = model(mx.array([[mask_id] * rows]), cache, pattern="bidirectional", write_cache=False, head=False)[0]
    stats.draft_forwards += 1
    draft = [first] + propose(model, masks[1:], cache[0].offset + 1)
    yield draft[:1]  # d_0 is the prefill's AR token: already certain
    produced = 1
    layout_mask = quadratic_mask(rows)
    while produced < max_tokens:
        committed = cache[0].offset
        layout = mx.array([[token for d in draft for token in [d] + [mask_id] * rows]])
        mask = mx.concatenate([mx.ones((layout_mask.shape[0], committed), dtype=mx.bool_), layout_mask], axis=1)
        hidden = model(layout, cache, pattern=mask, row_offsets=committed + mx.arange(rows), head=False)[0]
        stats.forwards += 1
        hidden = hidden.reshape(rows, width, -1)
        verified = select(model.diffusion_head(hidden[:, 0]), drafts=draft[1:]).tolist()  # row i: the AR token after d_i
        accepted = 1
        while accepted < rows and verified[accepted - 1] == draft[accepted]:
            accepted += 1
        keep_draft_kv(cache, committed, rows, accepted)
        chosen = hidden[accepted - 1, 2:]  # the masks after the bonus token, conditioned on the accepted prefix
        next_draft = [verified[accepted - 1]] + propose(model, chosen, committed + accepted + 1)
        stats.accept_lengths.append(accepted)
        if budget.force_at(produced + accepted - 1, draft[:accepted]):
            next_draft = [budget.token] + next_draft[:-1]  # the next d_0, accepted unconditionally
        # The bonus token is certain now (it is next cycle's d_0, whose K/V that cycle writes): emit it.
        emitted = draft[1:accepted] + next_draft[:1]
        select.commit(emitted)
        yield emitted
        produced += len(emitted)
        draft = next_draft
