"""What the block strategies of Nemotron-Labs-Diffusion share: block length, thinking budget, causal prefill."""

import numbers
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from ..models.rollback import speculative_cache
from .arguments import whole_number
from .common import Stats, TokenSelector, prefill_chunks


# Without max_position_embeddings in the config, no block may exceed this many tokens.
FALLBACK_POSITION_LIMIT = 32768
# Quadratic layouts past 64 rows (4,160 tokens, a 17M-entry mask) are no decoding step any more.
MAX_QUADRATIC_ROWS = 64


def block_length(model: nn.Module, options: dict, default: Optional[int] = None, layout: bool = False) -> int:
    """`block_length` (else `default`, else the checkpoint's block size), checked before it reaches MLX: an
    integer >= 2 whose forward (rows*(rows+1) tokens for the quadratic `layout`) fits the model's positions."""
    length = options.pop("block_length", None)
    length = (default or model.args.block_size) if length is None else length
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise DLLMError(f"block length must be an integer, got {length!r}")
    if length < 2:
        raise DLLMError(f"block length must be at least 2, got {length}")
    positions = model.args.max_position_embeddings or FALLBACK_POSITION_LIMIT
    tokens = length * (length + 1) if layout else length
    if tokens > positions or (layout and length > MAX_QUADRATIC_ROWS):
        largest = max(r for r in range(2, MAX_QUADRATIC_ROWS + 1) if r * (r + 1) <= positions) if layout else positions
        raise DLLMError(f"block length {length} is too long for this model (at most {largest})")
    return int(length)


def threshold_option(options: dict, default: Optional[float]) -> Optional[float]:
    """`threshold`: a confidence in [0, 1], or None where the mode allows it; checked, not trusted."""
    threshold = options.pop("threshold", default)
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise DLLMError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def flag_option(options: dict, name: str, default: Optional[bool]) -> Optional[bool]:
    value = options.pop(name, default)
    if value is not None and not isinstance(value, bool):
        raise DLLMError(f"{name} must be true or false, got {value!r}")
    return value


def refuse_unknown(options: dict, mode: str) -> None:
    if options:
        raise DLLMError(f"unknown option {sorted(options)[0]} for mode {mode}")


def causal_prefill(
    model: nn.Module, prompt: mx.array, select: TokenSelector, stats: Stats, step: int
) -> Tuple[List, int]:
    """A fresh cache holding the prompt's causal K/V (it rolls back: `mark`, `keep`), and the token the prompt's
    last logit selects."""
    cache = speculative_cache(model)
    _, logits = prefill_chunks(lambda ids: model(ids[None], cache), prompt, step, cache)
    token = int(select(logits[:, -1]).item())
    select.commit([token])
    stats.forwards, stats.prefill_forwards, stats.prefill_tokens = 1, 1, 1
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
        if self.limit is not None:
            self.limit = whole_number("max_thinking_tokens", self.limit, 0)
            self.token = whole_number("end_think_token_id", self.token, 0)
        self.done = self.limit is None

    def force_at(self, index: int, tokens: List[int]) -> bool:
        """Whether the token at generation `index` must be the end of thinking, given the `tokens` so far out."""
        if not self.done and self.token in tokens:
            self.done = True
        if self.done or index < self.limit:
            return False
        self.done = True
        return True
