"""What the block strategies of Nemotron-Labs-Diffusion share: block length, thinking budget, causal prefill."""

from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from ..models.rollback import speculative_cache
from .common import Stats, TokenSelector, prefill_chunks
from .mode import Option


# Without max_position_embeddings in the config, no block may exceed this many tokens.
FALLBACK_POSITION_LIMIT = 32768
# Quadratic layouts past 64 rows (4,160 tokens, a 17M-entry mask) are no decoding step any more.
MAX_QUADRATIC_ROWS = 64

# Quadratic-spec's layout forward runs rows*(rows+1) tokens: at the checkpoint's 32 rows (1,056 tokens) it is
# compute-bound.
# Roofline, Nemotron-8B (7.95B non-head parameters, 2 FLOPs each per token) on an M3 Max (400 GB/s, ~14 TFLOP/s)
# and an M4 Pro (273 GB/s, ~9 TFLOP/s): at 4 rows (20 tokens) compute stays within 1.15x of the weight-read time
# in bf16 and 8-bit on both, so a forward costs about one AR step and yields ~2.9 tokens; 5 rows gain <20% in
# bf16 but lose 20% in 8-bit, 8 rows (72 tokens) are 2-4x compute-bound everywhere, 32 rows 30-60x.
DEFAULT_ROWS = 4


BLOCK_LENGTH = Option(
    "block_length",
    int,
    f"block length (default: the checkpoint's; quadratic-spec: {DEFAULT_ROWS} rows, since its rows*(rows+1)-token "
    "forward is compute-bound on Apple GPUs beyond that)",
    minimum=2,
    label="block length",
)
# None: no threshold, an even unmasking schedule (the reference's threshold=None).
THRESHOLD = Option("threshold", float, "unmasking confidence threshold", minimum=0, maximum=1, nullable=True)
# The thinking budget; the front finds the </think> id in the tokenizer when the caller gives none.
THINKING = (
    Option("max_thinking_tokens", int, "force </think> after N tokens", minimum=0),
    Option("end_think_token_id", int, "the id forced at the end of thinking", minimum=0, public=False),
)


def block_length(model: nn.Module, options: dict, default: Optional[int] = None, layout: bool = False) -> int:
    """`block_length` (else `default`, else the checkpoint's block size), checked before it reaches MLX: its
    forward (rows*(rows+1) tokens for the quadratic `layout`) must fit the model's positions."""
    length = BLOCK_LENGTH.check(options.get("block_length") or default or model.args.block_size)
    positions = model.args.max_position_embeddings or FALLBACK_POSITION_LIMIT
    tokens = length * (length + 1) if layout else length
    if tokens > positions or (layout and length > MAX_QUADRATIC_ROWS):
        largest = max(r for r in range(2, MAX_QUADRATIC_ROWS + 1) if r * (r + 1) <= positions) if layout else positions
        raise DLLMError(f"block length {length} is too long for this model (at most {largest})")
    return length


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
        self.limit = options.get("max_thinking_tokens")
        self.token = options.get("end_think_token_id")
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
