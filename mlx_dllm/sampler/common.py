"""What every decoding strategy shares: the response record, running stats and token selection."""

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..errors import DLLMError


@dataclass
class GenerationResponse:
    """One streamed chunk; field names follow mlx-lm's GenerationResponse, plus our stats."""

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
    decode_tokens_per_forward: float = 0.0


@dataclass
class Stats:
    """Counters a strategy updates as it runs; the front turns them into a response."""

    forwards: int = 0  # target forwards (prefill included), or denoiser forwards in diffusion mode
    draft_forwards: int = 0
    accept_lengths: List[int] = field(default_factory=list)  # tokens committed per verify round
    canvases: int = 0  # diffusion blocks denoised
    prefill_forwards: int = 0  # forwards counted in `forwards` that processed the prompt
    prefill_done: Optional[float] = None  # perf_counter when the first token was ready

    def mark_prefill(self):
        self.prefill_done = time.perf_counter()

    @property
    def acceptance_length(self) -> Optional[float]:
        if not self.accept_lengths:
            return None
        return sum(self.accept_lengths) / len(self.accept_lengths)


TokenSelector = Callable[[mx.array], mx.array]


def make_token_selector(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> TokenSelector:
    """Logits [..., V] -> token ids [...]: argmax at temp 0, else mlx-lm's sampler chain on log-probs."""
    if temp < 0:
        raise DLLMError(f"temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise DLLMError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise DLLMError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise DLLMError(f"min_p must be in [0, 1], got {min_p}")
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)

    def select(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return select


def prefill_chunks(model_call: Callable[[mx.array], mx.array], prompt: mx.array, step: int) -> List[mx.array]:
    """Feed the prompt in chunks of `step` tokens (bounding peak memory); return each chunk's output."""
    outputs = []
    for begin in range(0, prompt.shape[0], step):
        outputs.append(model_call(prompt[begin : begin + step]))
        mx.eval(outputs[-1])
    return outputs
