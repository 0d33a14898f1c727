"""Plain autoregressive decoding: the baseline every other strategy is measured against."""

from typing import Iterator, List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .common import Stats, TokenSelector, prefill_chunks
from .mode import Mode
from .prompt_cache import NO_REUSE, PromptState


def generate_ar(
    model: nn.Module,
    prompt: mx.array,
    *,
    select: TokenSelector,
    stats: Stats,
    prefill_step_size: int = 2048,
    prompt_state: PromptState = NO_REUSE,
    **_,
) -> Iterator[List[int]]:
    """Yield one token at a time; the next forward is queued (async_eval) before the current token is yielded."""
    cache = prompt_state.resume() or make_prompt_cache(model)
    rest = prompt[prompt_state.start :]
    _, logits = prefill_chunks(lambda ids: model(ids[None], cache=cache), rest, prefill_step_size, cache)
    prompt_state.prompt_end(cache)
    token = select(logits[:, -1])
    mx.eval(token)
    stats.prefill_forwards, stats.prefill_tokens = 1, 1
    stats.mark_prefill()
    generated = []  # every one is in the cache: its forward is queued before it is yielded
    try:
        while True:
            select.commit(token)
            next_token = select(model(token[None], cache=cache)[:, -1])
            mx.async_eval(next_token)
            stats.forwards += 1  # the forward that produced `token`
            generated.append(token.item())
            yield generated[-1:]
            token = next_token
    finally:
        prompt_state.leave(generated, cache)


MODE = Mode(
    "ar",
    generate_ar,
    lossless=True,
    samples=True,
    honours_sampler=True,
    step_forwards=lambda model, draft, block: [(model, 1)],
)
