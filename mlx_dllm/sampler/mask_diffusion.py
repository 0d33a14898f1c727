"""Masked block diffusion (Nemotron-Labs-Diffusion `generate`): confidence unmasking, causal commits.

The prompt is prefilled causally and its last logit gives the seed. Each block is `[seed, mask x (B-1)]`,
denoised by bidirectional forwards over `[cache ; block]` that never write the cache: every step commits
the most confident mask and every mask whose confidence reaches `threshold` (or, without a threshold, an
even schedule). One causal forward then writes the finished block and predicts the next seed.
"""

from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .blocks import BLOCK_LENGTH, THINKING, THRESHOLD, ThinkingBudget, block_length, causal_prefill
from .common import Stats, TokenSelector, evaluate_chunk, make_token_selector
from .diffusion import ON_STEP, StepState
from .mode import Mode, Option
from .prompt_cache import NO_REUSE, PromptState

greedy = make_token_selector()


def transfer_schedule(masks: int, steps: int) -> List[int]:
    """Masks to commit per step without a threshold: an even split, the remainder front-loaded."""
    base, extra = divmod(masks, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def denoise_block(
    model: nn.Module,
    cache: List,
    block: List[int],
    threshold: Optional[float],
    eos_ids: set,
    stats: Stats,
    on_step: Optional[Callable[[StepState], None]] = None,
    select: TokenSelector = greedy,
    block_index: int = 0,
) -> List[int]:
    """Unmask `block` in up to len(block) bidirectional steps; the cache is read, never written.
    Guesses come from `select` (argmax, or a sample at a temperature); confidence is always measured on the
    untempered softmax, as the reference does."""
    mask_id = model.args.mask_token_id
    steps = len(block)
    schedule = transfer_schedule(block.count(mask_id), steps)
    for step in range(steps):
        if mask_id not in block:
            break
        logits = model(mx.array([block]), cache, pattern="bidirectional", write_cache=False)[0]
        stats.forwards += 1
        guesses = select(logits)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # over the full vocabulary, mask id included
        confidence = mx.take_along_axis(probs, guesses[:, None], axis=-1)[:, 0]
        guesses, confidence = guesses.tolist(), confidence.tolist()
        ranked = sorted((i for i, token in enumerate(block) if token == mask_id), key=lambda i: -confidence[i])
        if threshold is None:
            committed = ranked[: schedule[step]]
        else:  # the most confident mask always, the others once confident enough
            committed = ranked[:1] + [i for i in ranked[1:] if confidence[i] >= threshold]
        for position in committed:
            block[position] = guesses[position]  # the guess may be the mask id itself; it then stays masked
        if on_step is not None:
            accepted = [token != mask_id for token in block]
            on_step(StepState(block_index, step, list(block), accepted, guesses, committed=sorted(committed)))
        first_eos = next((i for i, token in enumerate(block) if token in eos_ids), None)
        if first_eos is not None and mask_id not in block[:first_eos]:
            break
    return block


def generate_mask_diffusion(
    model: nn.Module,
    prompt: mx.array,
    *,
    select: TokenSelector,
    stats: Stats,
    max_tokens: int,
    eos_token_ids=(),
    prefill_step_size: int = 2048,
    options: Optional[dict] = None,
    prompt_state: PromptState = NO_REUSE,
    **_,
) -> Iterator[List[int]]:
    """Yield one committed block at a time (its first token is the seed the previous causal commit predicted)."""
    options = options or {}
    length = block_length(model, options)
    threshold = options.get("threshold", 0.9)
    on_step = options.get("on_step")
    budget = ThinkingBudget(options)
    # causal_context=False is the LLaDA-style variant: prompt and commits encoded bidirectionally, no seed.
    causal = options.get("causal_context", True)
    pattern = "causal" if causal else "bidirectional"
    if causal:
        cache, first = causal_prefill(model, prompt, select, stats, prefill_step_size, prompt_state)
        seed = [first]
    else:  # one pass: a chunked prompt could not see its later chunks
        cache, seed = model.make_cache(), []
        model(prompt[None], cache, pattern=pattern, head=False)
        evaluate_chunk(cache)
        stats.forwards, stats.prefill_forwards = 1, 1
        stats.mark_prefill()
    mask_id = model.args.mask_token_id
    block, held = None, []  # held: the committed blocks' tokens
    try:
        for block_index in range(-(-max_tokens // length)):
            if block is not None:  # commit the previous block; the last one is never committed
                logits = model(mx.array([block]), cache, pattern=pattern)
                held += block
                stats.forwards += 1
                seed = [int(select(logits[:, -1]).item())] if causal else []
            previous = block or []
            block = seed + [mask_id] * (length - len(seed))
            start = block_index * length
            if budget.force_at(start + length - 1, previous + seed):  # the budget ends inside this block
                block[max(budget.limit - start, 0)] = budget.token  # pre-committed before denoising
            block = denoise_block(model, cache, block, threshold, set(eos_token_ids), stats, on_step, select,
                                  block_index)
            stats.canvases += 1
            yield block
    finally:
        if causal:  # a bidirectional prompt's state is no prefix state (sampler/prompt_cache.py)
            prompt_state.leave(held, [*cache])


CAUSAL_CONTEXT = Option("causal_context", bool, "a causal prompt and commits (off: LLaDA-style, bidirectional)")

MODE = Mode(
    "diffusion",
    generate_mask_diffusion,
    lossless=False,
    samples=True,  # a temperature samples each step's guesses
    honours_sampler=False,  # guesses come from bidirectional logits, not AR ones
    step_forwards=lambda model, draft, block: [(model, block)],  # one unmasking step over the block
    options=(BLOCK_LENGTH, THRESHOLD, CAUSAL_CONTEXT, *THINKING, ON_STEP),
    reports=("canvases",),
)
