"""What every decoding strategy shares: the response record, running stats and token selection."""

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from ..errors import DLLMError


@dataclass
class GenerationResponse:
    """One streamed chunk; field names follow mlx-lm's GenerationResponse, plus our stats, defined the same way
    in every mode:

    - `forwards`: decoding forwards of the model that commits tokens (AR steps, verify forwards, denoising
      steps and the causal commits that pick the next seed), the prompt's prefill excluded;
    - `draft_forwards`: forwards that only propose tokens (the DFlash drafter, linear-spec's drafting
      passes, quadratic-spec's first draft);
    - `tokens_per_forward`: tokens those decoding forwards produced / `forwards` (the prefill's own token
      left out, so plain AR reads 1.00, a little less when the forward that produced an EOS counts);
    - `acceptance_length`: mean tokens committed per verify round (speculative modes, else None), counting the
      rounds that verified drafted tokens;
    - `speculation`: the speculative rounds by what they verified, as shares ("ar": no drafted token, "chain",
      "tree"), and "mean_budget", the mean drafted tokens verified by the others (DFlash's, and self-speculation's
      block length - 1: the block each cycle chose).
    - `cached_tokens`: prompt tokens resumed from a prompt cache instead of prefilled (counted in `prompt_tokens`,
      not in `prompt_tps`).
    """

    text: str
    token: Optional[int]
    tokens: List[int]
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    mode: str = "ar"
    forwards: int = 0
    draft_forwards: int = 0
    tokens_per_forward: float = 0.0
    acceptance_length: Optional[float] = None
    canvases: int = 0
    speculation: Optional[Dict[str, float]] = None
    cached_tokens: int = 0


@dataclass
class Stats:
    """Counters a strategy updates as it runs; the front turns them into a response."""

    forwards: int = 0  # target forwards (prefill included), or denoiser forwards in diffusion mode
    draft_forwards: int = 0
    accept_lengths: List[int] = field(default_factory=list)  # tokens committed per verify round
    canvases: int = 0  # diffusion blocks denoised
    prefill_forwards: int = 0  # forwards counted in `forwards` that processed the prompt
    prefill_tokens: int = 0  # tokens the prefill's own logits chose (1 after a causal prefill)
    prefill_done: Optional[float] = None  # perf_counter when the first token was ready
    rounds: Dict[str, int] = field(default_factory=dict)  # speculative rounds by what they verified
    verified_nodes: int = 0  # drafted tokens those rounds verified

    def mark_prefill(self):
        self.prefill_done = time.perf_counter()

    @property
    def decoding_forwards(self) -> int:
        return self.forwards - self.prefill_forwards

    def count_round(self, kind: str, nodes: int, committed: int) -> None:
        """A speculative round that verified `nodes` drafted tokens as `kind` ("ar", "chain" or "tree")."""
        self.rounds[kind] = self.rounds.get(kind, 0) + 1
        self.verified_nodes += nodes
        if kind != "ar":
            self.accept_lengths.append(committed)

    @property
    def speculation(self) -> Optional[Dict[str, float]]:
        total = sum(self.rounds.values())
        if not total:
            return None
        shares = {kind: round(self.rounds.get(kind, 0) / total, 3) for kind in ("ar", "chain", "tree")}
        drafted = total - self.rounds.get("ar", 0)
        return {**shares, "mean_budget": round(self.verified_nodes / drafted, 2) if drafted else 0.0}

    @property
    def acceptance_length(self) -> Optional[float]:
        if not self.accept_lengths:
            return None
        return sum(self.accept_lengths) / len(self.accept_lengths)


LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


# The id a selector gives a row whose logits are not finite (overflowed weights or activations): the front
# stops there with one error line. MLX wraps a negative index, so a forward already queued with it stays safe.
NOT_FINITE = -1
NOT_FINITE_MESSAGE = "the model's logits are not finite (NaN or Inf): its weights or activations overflowed"


def check_finite(tokens: List[int]) -> None:
    if NOT_FINITE in tokens:
        raise DLLMError(NOT_FINITE_MESSAGE)


class KeyStream:
    """One request's own random stream: the keys MLX's global stream would give after `mx.random.seed(seed)` (each
    draw splits it), so a request decoded beside others (sampler/batch.py) draws what it would alone."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def __call__(self) -> mx.array:
        self.key, drawn = mx.random.split(self.key)
        return drawn


@dataclass(frozen=True)
class Sampling:
    """An mlx-lm sampling configuration (`make_sampler`'s temp > 0, top_p, top_k, min_p) and, explicitly, the
    distribution its sampler draws from, for speculative sampling's ratio test. Its draws come from `keys`, a
    request's own stream, where given, else from MLX's global one."""

    temp: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    keys: Optional[KeyStream] = field(default=None, compare=False, repr=False)

    def sampler(self) -> Callable[[mx.array], mx.array]:
        if self.keys is None:
            return make_sampler(temp=self.temp, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)
        # make_sampler's chain, drawing from the request's stream.
        return lambda log_probs: self.categorical(self.filtered(log_probs) * (1.0 / self.temp))

    def filtered(self, log_probs: mx.array) -> mx.array:
        """mlx-lm's filters of normalised log-probabilities, in `make_sampler`'s order (top_p, then min_p, then top_k;
        -inf where filtered). A top_k of the row's width or more keeps every token (mlx-lm refuses it)."""
        x = log_probs
        if 0 < self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p != 0.0:
            x = apply_min_p(x, self.min_p)
        if 0 < self.top_k < x.shape[-1]:
            x = apply_top_k(x, self.top_k)
        return x

    def log_probs(self, logits: mx.array) -> mx.array:
        """Rows [..., V] -> the normalised log-probabilities mlx-lm's sampler draws from (-inf where filtered):
        `make_sampler` filters the untempered log-probabilities, then draws from softmax(filtered / temp)."""
        x = logits.astype(mx.float32)
        x = self.filtered(x - mx.logsumexp(x, axis=-1, keepdims=True)) * (1.0 / self.temp)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def probs(self, logits: mx.array) -> mx.array:
        return mx.exp(self.log_probs(logits))

    def categorical(self, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self._key())

    def uniform(self, shape) -> mx.array:
        return mx.random.uniform(shape=shape, key=self._key())

    def _key(self) -> Optional[mx.array]:
        return None if self.keys is None else self.keys()


class TokenSelector:
    """Logits rows [N, V] -> token ids [N]: argmax without a sampler, else the mlx-lm `sampler` on log-probs;
    NOT_FINITE for a row whose logits are not, read from values the selection computes anyway.

    mlx-lm `logits_processors` see, for row i, the committed tokens (`history`, the prompt first) plus the
    first i `drafts` fed after it, or for a tree its own `lineages[i]` (the drafted tokens from the root to row i):
    the history row i predicts after, so a verified block selects what AR would, token by token. Strategies
    `commit` every token they emit.

    `sampling`, where given, is the configuration the sampler was made from (its sampler, if `sampler` is None):
    with no logits processors, `distribution` then names the distribution each row is drawn from.
    """

    def __init__(
        self,
        sampler: Optional[Callable] = None,
        processors: Sequence[LogitsProcessor] = (),
        history=None,
        sampling: Optional[Sampling] = None,
    ):
        self.sampler = sampler if sampler is not None or sampling is None else sampling.sampler()
        self.processors = list(processors)
        self.history = history if history is not None else mx.array([], dtype=mx.int32)
        self.sampling = sampling

    @property
    def distribution(self) -> Optional[Sampling]:
        """The sampling configuration whose `log_probs` are exactly what this selector draws each row from, or None
        where that is not explicit: argmax (temp 0), a caller's own `sampler=`, or logits processors."""
        return None if self.processors else self.sampling

    def __call__(self, logits: mx.array, drafts=None, lineages=None) -> mx.array:
        if self.processors:
            logits = self._process(logits, drafts, lineages)
        if self.sampler is None:
            tokens = mx.argmax(logits, axis=-1)
            witness = mx.take_along_axis(logits, tokens[..., None], axis=-1)  # argmax picks a NaN where there is one
        else:
            logits = logits.astype(mx.float32)
            witness = mx.logsumexp(logits, axis=-1, keepdims=True)
            tokens = self.sampler(logits - witness)
        return mx.where(mx.isfinite(witness[..., 0]), tokens.astype(mx.int32), NOT_FINITE)

    def commit(self, tokens) -> None:
        if self.processors:
            self.history = mx.concatenate([self.history, _ids(tokens, self.history.dtype)])

    def _process(self, logits: mx.array, drafts, lineages) -> mx.array:
        rows = logits.reshape(-1, logits.shape[-1])
        drafts = _ids(drafts if drafts is not None else [], self.history.dtype)
        processed = []
        for i in range(rows.shape[0]):
            fed = drafts[:i] if lineages is None else _ids(lineages[i], self.history.dtype)
            history, row = mx.concatenate([self.history, fed]), rows[i : i + 1]
            for processor in self.processors:
                row = processor(history, row)
            processed.append(row)
        return mx.concatenate(processed).reshape(logits.shape)


def _ids(tokens, dtype) -> mx.array:
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=dtype)
    return tokens.reshape(-1).astype(dtype)


def check_sampling(temp: float, top_p: float, top_k: int, min_p: float) -> None:
    for name, value in (("temp", temp), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DLLMError(f"{name} must be a finite number, got {value!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise DLLMError(f"top_k must be an integer, got {top_k!r}")
    if temp < 0:
        raise DLLMError(f"temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise DLLMError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise DLLMError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise DLLMError(f"min_p must be in [0, 1], got {min_p}")


def make_token_selector(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, **selector_options
) -> TokenSelector:
    """Argmax at temp 0, else mlx-lm's sampler chain; `selector_options` go to TokenSelector."""
    check_sampling(temp, top_p, top_k, min_p)
    return TokenSelector(sampling=None if temp == 0 else Sampling(temp, top_p, top_k, min_p), **selector_options)


def evaluate_chunk(cache: List, *extra) -> None:
    """Evaluate a prefill chunk's K/V (and `extra` outputs to keep), never its head; free what it left."""
    mx.eval([c.state for c in cache], *extra)
    mx.clear_cache()


def prefill_chunks(
    forward: Callable[[mx.array], Any], prompt: mx.array, step: int, cache: List, keep: Optional[Callable] = None
) -> Tuple[List, Any]:
    """mlx-lm's prefill: all but the last token in chunks of `step`, evaluating only the cache and what
    `keep(output)` picks (DFlash's features), then the last token alone. Returns the kept parts and the
    last token's output (its head runs on that one row only)."""
    kept = []
    for begin in range(0, prompt.shape[0] - 1, step):
        output = forward(prompt[begin : min(begin + step, prompt.shape[0] - 1)])
        kept += [keep(output)] if keep is not None else []
        evaluate_chunk(cache, kept[-1:])
    return kept, forward(prompt[-1:])
