"""Linear self-speculation (Nemotron-Labs-Diffusion `linear_spec_generate`): the model drafts its own block.

Each cycle drafts `[seed, mask x (B-1)]` in one bidirectional forward (LoRA on), verifies
`[seed, d1..dB-1]` in one causal forward (LoRA off, writing the cache), keeps the longest prefix of drafts
the causal pass agrees with plus its next token, and crops the cache back to what was kept. Greedy
output therefore equals greedy AR. B is `block_length` when pinned, else chosen per cycle from this machine's
cost curve and the acceptance so far (`adaptive.BlockChoice`); B = 1 is a plain AR step, with no draft forward.
"""

from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from .blocks import BLOCK_LENGTH, THINKING, THRESHOLD, ThinkingBudget, block_policy, causal_prefill
from .common import Stats, TokenSelector
from .mode import Mode, Option
from .prompt_cache import NO_REUSE, PromptState


def draft_block(
    model: nn.Module, cache: List, seed: int, size: int, threshold: float, lora: bool, stats: Stats
) -> mx.array:
    """The block `[seed, d1..d(size-1)]`, on device: at threshold 0 one pass fills every mask by argmax (no host
    sync, no softmax); else each pass fills the confident masks (or the most confident one)."""
    mask_id = model.args.mask_token_id
    block = mx.array([seed] + [mask_id] * (size - 1), dtype=mx.int32)
    if size < 2:
        return block
    if threshold <= 0:
        logits = model(block[None], cache, pattern="bidirectional", write_cache=False, lora=lora)[0]
        stats.draft_forwards += 1
        return mx.concatenate([block[:1], mx.argmax(logits[1:], axis=-1).astype(mx.int32)])
    block = block.tolist()
    while mask_id in block[1:]:
        logits = model(mx.array([block]), cache, pattern="bidirectional", write_cache=False, lora=lora)[0]
        stats.draft_forwards += 1
        guesses = mx.argmax(logits, axis=-1)
        confidence = mx.take_along_axis(mx.softmax(logits.astype(mx.float32), axis=-1), guesses[:, None], axis=-1)
        guesses, confidence = guesses.tolist(), confidence[:, 0].tolist()
        masked = [i for i in range(1, len(block)) if block[i] == mask_id]
        chosen = [i for i in masked if confidence[i] >= threshold] or [max(masked, key=lambda i: confidence[i])]
        for i in chosen:
            block[i] = guesses[i]
        if all(block[i] == mask_id for i in chosen):
            break  # a mask guessed as the mask id ends the loop
    return mx.array(block, dtype=mx.int32)


def generate_linear_spec(
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
    """Yield the tokens each cycle commits (the first yield is the prefill's token). Each cycle's draft and
    verify are queued before the previous cycle's tokens go out, and read back with one host sync."""
    options = options or {}
    threshold = options.get("threshold") or 0.0
    lora = options.get("lora", model.has_lora)  # by default the LoRA drafts whenever the model has one
    budget = ThinkingBudget(options)
    if lora and not model.has_lora:
        raise DLLMError("no drafter LoRA is loaded (the model folder has no linear_spec_lora/)")
    policy = block_policy(model, options)
    cache, seed = causal_prefill(model, prompt, select, stats, prefill_step_size, prompt_state)

    def queue_cycle(seed: int, produced: int):
        if produced >= max_tokens:
            return None
        size = min(policy.choose(), max_tokens - produced)  # a block yields at most `size` tokens
        block = draft_block(model, cache, seed, size, threshold, lora, stats)
        cache.mark()
        verified = select(model(block[None], cache)[0], drafts=block[1:])
        mx.async_eval(block, verified)
        return block, verified

    produced, generated = 1, [seed]  # the cache holds all but the last (the next seed)
    cycle = queue_cycle(seed, produced)
    try:
        yield [seed]
        while cycle is not None:
            block, verified = (part.tolist() for part in cycle)  # the cycle's one host sync
            cycle = None  # kept below
            stats.forwards += 1
            size, accepted = len(block), 0
            while accepted < size - 1 and verified[accepted] == block[accepted + 1]:
                accepted += 1
            emitted = verified[: accepted + 1]  # the agreed drafts, then the causal pass's own next token
            cache.keep(accepted + 1)
            policy.observe(size, accepted)
            stats.count_round("chain" if size > 1 else "ar", size - 1, accepted + 1)
            produced += len(emitted)
            if budget.force_at(produced - 1, emitted[:-1]):
                emitted[-1] = budget.token  # the next seed: the model goes on after the end of thinking
            select.commit(emitted)
            generated += emitted
            cycle = queue_cycle(emitted[-1], produced)
            yield emitted
    finally:
        if cycle is not None:
            cache.keep(0)  # the queued cycle commits nothing
        prompt_state.leave(generated[:-1], [*cache])


LORA = Option("lora", bool, "draft with the checkpoint's LoRA (default: when it has one)")

MODE = Mode(
    "linear-spec",
    generate_linear_spec,
    lossless=True,
    samples=True,
    honours_sampler=True,  # the causal verify's logits choose every token
    step_forwards=lambda model, draft, block: [(model, block), (model, block)],  # one draft pass, one verify
    options=(BLOCK_LENGTH, THRESHOLD, LORA, *THINKING),
    reports=("acceptance_length", "speculation"),
)
