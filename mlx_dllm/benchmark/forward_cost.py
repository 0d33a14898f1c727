"""The forward-cost curve: one forward of N new tokens over a 256-token cache, as a ratio to N = 1."""

import statistics
import time
from typing import Callable, Dict, List

import mlx.core as mx

from ..models.rollback import speculative_cache

CACHE_TOKENS = 256
NEW_TOKENS = (1, 2, 4, 8, 16, 32, 64)
WARMUP_TRIALS = 2


def make_cache(model) -> List:
    return speculative_cache(model)


def causal_forward(model) -> Callable:
    """The model's causal, cache-writing forward: DiffusionGemma's encoder, else the model itself."""
    if hasattr(model, "encode"):
        return lambda ids, cache: model.encode(ids, cache)
    return lambda ids, cache: model(ids, cache=cache)


def token_ids(count: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(2, vocab - 1, (1, count), key=mx.random.key(seed))


def forward_cost(model, vocab: int, trials: int) -> Dict[int, float]:
    """Median milliseconds per new-token count; each forward evaluated alone, counts interleaved, the K/V it
    wrote trimmed again so every forward sees the same 256-token cache."""
    forward = causal_forward(model)
    cache = make_cache(model)
    mx.eval(forward(token_ids(CACHE_TOKENS, vocab, 0), cache))
    inputs = {n: token_ids(n, vocab, n) for n in NEW_TOKENS}
    mx.eval(list(inputs.values()))
    times = {n: [] for n in NEW_TOKENS}
    for trial in range(WARMUP_TRIALS + trials):
        for n in NEW_TOKENS:
            start = time.perf_counter()
            cache.mark()
            mx.eval(forward(inputs[n], cache))
            elapsed = time.perf_counter() - start
            cache.keep(0)
            if trial >= WARMUP_TRIALS:
                times[n].append(1e3 * elapsed)
    return {n: statistics.median(v) for n, v in times.items()}


def cost_lines(milliseconds: Dict[int, float]) -> List[str]:
    one = milliseconds[1]
    lines = [f"{'new tokens':>10} {'ms':>9} {'x 1-token':>10}"]
    lines += [f"{n:>10} {ms:>9.2f} {ms / one:>10.2f}" for n, ms in milliseconds.items()]
    return lines
