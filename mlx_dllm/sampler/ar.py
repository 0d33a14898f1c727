"""Plain autoregressive decoding: the baseline every other strategy is measured against."""

from typing import Iterator, List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .common import Stats, TokenSelector, prefill_chunks
from .mode import Mode


def generate_ar(
    model: nn.Module,
    prompt: mx.array,
    *,
    select: TokenSelector,
    stats: Stats,
    prefill_step_size: int = 2048,
    **_,
) -> Iterator[List[int]]:
    """Yield one token at a time; the next forward is queued (async_eval) before the current token is yielded."""
    cache = make_prompt_cache(model)
    _, logits = prefill_chunks(lambda ids: model(ids[None], cache=cache), prompt, prefill_step_size, cache)
    token = select(logits[:, -1])
    mx.eval(token)
    stats.prefill_forwards, stats.prefill_tokens = 1, 1
    stats.mark_prefill()
    while True:
        select.commit(token)
        next_token = select(model(token[None], cache=cache)[:, -1])
        mx.async_eval(next_token)
        stats.forwards += 1  # the forward that produced `token`
        yield [token.item()]
        token = next_token


MODE = Mode(
    "ar",
    generate_ar,
    lossless=True,
    samples=True,
    honours_sampler=True,
    step_forwards=lambda model, draft, block: [(model, 1)],
)
