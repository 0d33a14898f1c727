"""What the block strategies of Nemotron-Labs-Diffusion share: the block length (pinned, or chosen per cycle), the
thinking budget, the causal prefill."""

from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from ..models.rollback import speculative_cache
from .adaptive import BlockChoice, FixedBlock, linear_cost, quadratic_cost
from .common import Stats, TokenSelector, prefill_chunks
from .cost_curve import CONTEXT, CostCurve, cost_curve, curve_key, measure
from .mode import Option
from .prompt_cache import NO_REUSE, PromptState


# Without max_position_embeddings in the config, no block may exceed this many tokens.
FALLBACK_POSITION_LIMIT = 32768
# Quadratic layouts past 64 rows (4,160 tokens, a 17M-entry mask) are no decoding step any more.
MAX_QUADRATIC_ROWS = 64

# The most rows quadratic-spec chooses from when no block length is pinned. Its layout forward runs rows*(rows+1)
# tokens. Roofline, Nemotron-8B (7.95B non-head parameters, 2 FLOPs each per token) on an M3 Max (400 GB/s,
# ~14 TFLOP/s) and an M4 Pro (273 GB/s, ~9 TFLOP/s): at 4 rows (20 tokens) compute stays within 1.15x of the
# weight-read time in bf16 and 8-bit, so a forward costs about one AR step; 8 rows (72 tokens) are 2-4x compute-bound
# everywhere, the checkpoint's 32 rows (1,056 tokens) 30-60x. Once compute-bound, the cost grows with rows^2 and the
# tokens at most with rows: more rows lose even when every draft is accepted.
AUTO_ROWS = 8


BLOCK_LENGTH = Option(
    "block_length",
    int,
    "block length (default: the checkpoint's; linear-spec and quadratic-spec choose theirs per cycle from this "
    f"machine's measured forward costs and the acceptance so far, up to the checkpoint's block and {AUTO_ROWS} rows)",
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


def longest(model: nn.Module, layout: bool = False) -> int:
    """The longest block whose forward fits the model's positions: in tokens, or in rows for the quadratic `layout`
    (rows*(rows+1) tokens)."""
    positions = model.args.max_position_embeddings or FALLBACK_POSITION_LIMIT
    if not layout:
        return positions
    return max(r for r in range(2, MAX_QUADRATIC_ROWS + 1) if r * (r + 1) <= positions)


def block_length(model: nn.Module, options: dict, layout: bool = False) -> int:
    """`block_length` (else the checkpoint's block size), checked before it reaches MLX: its forward must fit the
    model's positions."""
    given = options.get("block_length")
    length = BLOCK_LENGTH.check(model.args.block_size if given is None else given)
    if length > longest(model, layout):
        raise DLLMError(f"block length {length} is too long for this model (at most {longest(model, layout)})")
    return length


def adaptive_limit(model: nn.Module, layout: bool = False) -> int:
    """The longest block the adaptive choice considers: the checkpoint's (its drafts were trained up to it), or
    AUTO_ROWS rows for the quadratic layout."""
    return min(AUTO_ROWS if layout else model.args.block_size, longest(model, layout))


def measured_costs(model: nn.Module) -> CostCurve:
    """This machine's cost curve for a self-speculating model, from the user's cache or measured now on a scratch
    cache, up to the longest forward either mode chooses: causal forwards over n tokens (written, then rolled back),
    and one draft forward (bidirectional, with the LoRA, writing nothing) over the largest size."""
    rows = adaptive_limit(model, layout=True)
    largest = max(adaptive_limit(model), rows * (rows + 1))

    def timing(sizes):
        cache = speculative_cache(model)
        model(mx.arange(CONTEXT)[None] % model.args.vocab_size, cache, head=False)
        mx.eval([c.state for c in cache])

        def verify(tokens: int) -> None:
            cache.mark()
            mx.eval(model(mx.zeros((1, tokens), dtype=mx.int32), cache))
            cache.keep(0)

        def draft() -> None:
            block = mx.zeros((1, largest), dtype=mx.int32)
            mx.eval(model(block, cache, pattern="bidirectional", write_cache=False, lora=model.has_lora))

        return measure(verify, draft, sizes)

    return cost_curve(curve_key(model), largest, timing)


def block_policy(model: nn.Module, options: dict, layout: bool = False):
    """What chooses each cycle's block: a pinned `block_length` (checked), else the block with the most expected
    tokens per second on this machine's cost curve, from 1 token (an AR step) in linear-spec or 2 rows in
    quadratic-spec (one row drafts nothing)."""
    if options.get("block_length") is not None:
        return FixedBlock(block_length(model, options, layout))
    curve = measured_costs(model)
    if layout:
        return BlockChoice(quadratic_cost(curve), 2, adaptive_limit(model, layout=True))
    return BlockChoice(linear_cost(curve), 1, adaptive_limit(model))


def causal_prefill(
    model: nn.Module, prompt: mx.array, select: TokenSelector, stats: Stats, step: int,
    prompt_state: PromptState = NO_REUSE,
) -> Tuple[List, int]:
    """A cache holding the prompt's causal K/V (it rolls back: `mark`, `keep`), fresh or resumed from `prompt_state`,
    and the token the prompt's last logit selects."""
    cache = speculative_cache(model, caches=prompt_state.resume())
    _, logits = prefill_chunks(lambda ids: model(ids[None], cache), prompt[prompt_state.start :], step, cache)
    prompt_state.prompt_end([*cache])
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
