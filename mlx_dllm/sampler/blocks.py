"""What the block strategies of Nemotron-Labs-Diffusion share: block length, thinking budget, causal prefill."""

from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from .common import Stats, TokenSelector, prefill_chunks


def block_length(model: nn.Module, options: dict) -> int:
    length = options.pop("block_length", None) or model.args.block_size
    if length < 2:
        raise DLLMError(f"block length must be at least 2, got {length}")
    return length


def refuse_unknown(options: dict, mode: str) -> None:
    if options:
        raise DLLMError(f"unknown option {sorted(options)[0]} for mode {mode}")


def causal_prefill(
    model: nn.Module, prompt: mx.array, select: TokenSelector, stats: Stats, step: int
) -> Tuple[List, int]:
    """A fresh cache holding the prompt's causal K/V, and the token the prompt's last logit selects."""
    cache = model.make_cache()
    logits = prefill_chunks(lambda ids: model(ids[None], cache)[:, -1], prompt, step)[-1]
    token = int(select(logits).item())
    stats.forwards, stats.prefill_forwards = 1, 1
    stats.mark_prefill()
    return cache, token


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
