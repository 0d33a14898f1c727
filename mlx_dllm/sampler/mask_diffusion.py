"""Masked block diffusion (Nemotron-Labs-Diffusion `generate`): confidence unmasking, causal commits.

The prompt is prefilled causally and its last logit gives the seed. Each block is `[seed, mask x (B-1)]`,
denoised by bidirectional forwards over `[cache ; block]` that never write the cache: every step commits
the most confident mask and every mask whose confidence reaches `threshold` (or, without a threshold, an
even schedule). One causal forward then writes the finished block and predicts the next seed.
"""

from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from .common import Stats, prefill_chunks


def transfer_schedule(masks: int, steps: int) -> List[int]:
    """Masks to commit per step without a threshold: an even split, the remainder front-loaded."""
    base, extra = divmod(masks, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def block_options(model: nn.Module, options: dict) -> dict:
    block_length = options.pop("block_length", None) or model.args.block_size
    if block_length < 2:
        raise DLLMError(f"block length must be at least 2, got {block_length}")
    return {"block_length": block_length}


class ThinkingBudget:
    """`max_thinking_tokens` + `end_think_token_id`: once that many tokens are out without the end-of-thinking
    token, it is forced in (once), as the reference generators do."""

    def __init__(self, options: dict):
        self.limit = options.pop("max_thinking_tokens", None)
        self.token = options.pop("end_think_token_id", None)
        if (self.limit is None) != (self.token is None):
            raise DLLMError("max_thinking_tokens and end_think_token_id go together")
        self.done = self.limit is None

    def force_at(self, index: int, tokens: List[int]) -> bool:
        """Whether the token at generation `index` must be the end of thinking, given the `tokens` so far out."""
        if not self.done and self.token in tokens:
            self.done = True
        if self.done or index < self.limit:
            return False
        self.done = True
        return True


def denoise_block(
    model: nn.Module,
    cache: List,
    block: List[int],
    threshold: Optional[float],
    eos_ids: set,
    stats: Stats,
    on_step: Optional[Callable] = None,
) -> List[int]:
    """Unmask `block` in up to len(block) bidirectional steps; the cache is read, never written."""
    mask_id = model.args.mask_token_id
    steps = len(block)
    schedule = transfer_schedule(block.count(mask_id), steps)
    for step in range(steps):
        if mask_id not in block:
            break
        logits = model(mx.array([block]), cache, pattern="bidirectional", write_cache=False)[0]
        stats.forwards += 1
        guesses = mx.argmax(logits, axis=-1)
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
            on_step(step, sorted(committed))
        first_eos = next((i for i, token in enumerate(block) if token in eos_ids), None)
        if first_eos is not None and mask_id not in block[:first_eos]:
            break
    return block


def generate_mask_diffusion(
    model: nn.Module,
    prompt: mx.array,
    *,
    stats: Stats,
    max_tokens: int,
    eos_token_ids=(),
    prefill_step_size: int = 2048,
    options: Optional[dict] = None,
    **_,
) -> Iterator[List[int]]:
    """Yield one committed block at a time (its first token is the seed the previous causal commit predicted)."""
    options = dict(options or {})
    block_length = block_options(model, options)["block_length"]
    threshold = options.pop("threshold", 0.9)
    on_step = options.pop("on_step", None)
    budget = ThinkingBudget(options)
    # causal_context=False is the LLaDA-style variant: prompt and commits encoded bidirectionally, no seed.
    causal = options.pop("causal_context", True)
    pattern = "causal" if causal else "bidirectional"
    if options:
        raise DLLMError(f"unknown option {sorted(options)[0]} for mode diffusion")
    if threshold is not None and not 0 <= threshold <= 1:
        raise DLLMError(f"threshold must be in [0, 1] or None, got {threshold}")
    cache = model.make_cache()
    if causal:
        logits = prefill_chunks(lambda ids: model(ids[None], cache)[:, -1], prompt, prefill_step_size)[-1]
        seed = [int(mx.argmax(logits, axis=-1).item())]
    else:  # one pass: a chunked prompt could not see its later chunks
        mx.eval(model(prompt[None], cache, pattern=pattern))
        seed = []
    stats.forwards, stats.prefill_forwards = 1, 1
    stats.mark_prefill()
    mask_id = model.args.mask_token_id
    block = None
    for block_index in range(-(-max_tokens // block_length)):
        if block is not None:  # commit the previous block; the last one is never committed
            logits = model(mx.array([block]), cache, pattern=pattern)
            stats.forwards += 1
            seed = [int(mx.argmax(logits[0, -1]).item())] if causal else []
        previous = block or []
        block = seed + [mask_id] * (block_length - len(seed))
        start = block_index * block_length
        if budget.force_at(start + block_length - 1, previous + seed):  # the budget ends inside this block
            block[max(budget.limit - start, 0)] = budget.token  # pre-committed before denoising
        step_callback = None if on_step is None else (lambda step, done, b=block_index: on_step(b, step, done))
        block = denoise_block(model, cache, block, threshold, set(eos_token_ids), stats, step_callback)
        stats.canvases += 1
        yield block
