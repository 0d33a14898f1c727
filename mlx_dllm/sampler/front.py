"""The shared front of every decoding strategy: `stream_generate(model, tokenizer, prompt, mode=...)`."""

import time
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import DLLMError
from .ar import generate_ar
from .common import GenerationResponse, Stats, make_token_selector
from .dflash import generate_dflash
from .diffusion import generate_diffusion
from .linear_spec import generate_linear_spec
from .mask_diffusion import generate_mask_diffusion
from .quadratic_spec import generate_quadratic_spec

STRATEGIES = {
    "ar": generate_ar,
    "dflash": generate_dflash,
    "diffusion": generate_diffusion,
    "mask-diffusion": generate_mask_diffusion,
    "linear-spec": generate_linear_spec,
    "quadratic-spec": generate_quadratic_spec,
}
# Options a strategy takes beyond the common ones; anything else is refused, never ignored.
OPTIONED_STRATEGIES = {"diffusion", "mask-diffusion", "linear-spec", "quadratic-spec"}


def _encode(tokenizer: TokenizerWrapper, prompt) -> mx.array:
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    prompt = mx.array(prompt).reshape(-1)
    if prompt.size == 0:
        raise DLLMError("the prompt is empty")
    return prompt


def _choose_mode(mode: Optional[str], model: nn.Module, draft_model: Optional[nn.Module]) -> str:
    """The asked mode, else the draft's, else the model's own default (mlx-lm models: plain AR)."""
    if mode is None:
        source = draft_model if draft_model is not None else model
        mode = getattr(source, "default_mode", "dflash" if draft_model is not None else "ar")
    supported = getattr(model, "modes", ("ar", "dflash"))
    if mode not in STRATEGIES and mode not in supported:
        raise DLLMError(f"unknown mode '{mode}' (choose from {', '.join(supported)})")
    if mode not in supported:
        family = type(model).__module__.rsplit(".", 1)[-1]
        raise DLLMError(f"{family} models support {', '.join(supported)}, not {mode}")
    if mode == "dflash" and draft_model is None:
        raise DLLMError("mode 'dflash' needs a draft model (--draft-model)")
    return mode


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    max_tokens: int = 256,
    *,
    draft_model: Optional[nn.Module] = None,
    mode: Optional[str] = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    block_size: Optional[int] = None,
    prefill_step_size: int = 2048,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream the generated text chunk by chunk; every response carries the running stats.

    `options` go to the strategy, which refuses any it does not know: DiffusionGemma's denoising knobs
    (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`,
    `confidence_threshold`, `on_step`); Nemotron-Labs-Diffusion's `block_length`, `threshold`,
    `causal_context`, `lora`, `max_thinking_tokens` and `end_think_token_id`.
    """
    if max_tokens <= 0:
        raise DLLMError(f"max_tokens must be positive, got {max_tokens}")
    if block_size is not None and block_size < 2:
        raise DLLMError(f"block size must be at least 2, got {block_size}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    mode = _choose_mode(mode, model, draft_model)
    strategy_name = getattr(model, "mode_strategies", {}).get(mode, mode)
    if strategy_name not in STRATEGIES:
        raise DLLMError(f"mode '{mode}' is not implemented yet")
    if options and strategy_name not in OPTIONED_STRATEGIES:
        raise DLLMError(f"unknown option {sorted(options)[0]} for mode {mode}")
    if block_size is not None and mode != "dflash":
        raise DLLMError(f"block size applies to DFlash drafting, not to mode {mode}")
    if strategy_name == "diffusion" and (temp, top_p, top_k, min_p) != (0.0, 1.0, 0, 0.0):
        raise DLLMError("diffusion mode samples with its own schedule: use t_min/t_max, not temp/top_p/top_k/min_p")
    select = make_token_selector(temp, top_p, top_k, min_p)
    prompt = _encode(tokenizer, prompt)
    if seed is not None:
        mx.random.seed(seed)

    stats = Stats()
    eos_ids = set(tokenizer.eos_token_ids)
    strategy = STRATEGIES[strategy_name](
        model,
        prompt,
        draft_model=draft_model,
        select=select,
        stats=stats,
        max_tokens=max_tokens,
        block_size=block_size,
        prefill_step_size=prefill_step_size,
        eos_token_ids=eos_ids,
        options=options,
    )
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    mx.reset_peak_memory()
    start = time.perf_counter()
    emitted: List[int] = []
    text = ""
    finish_reason = None
    try:
        for tokens in strategy:
            new_tokens = []
            for token in tokens:
                if token in eos_ids:
                    finish_reason = "stop"
                    break
                new_tokens.append(token)
                detokenizer.add_token(token)
                if len(emitted) + len(new_tokens) >= max_tokens:
                    finish_reason = "length"
                    break
            emitted += new_tokens
            if finish_reason is not None:
                detokenizer.finalize()
            segment = detokenizer.last_segment
            text += segment
            hit = next((s for s in stop if s and s in text), None)
            if hit is not None:
                cut = len(text) - text.index(hit)
                segment = segment[: max(len(segment) - cut, 0)]
                finish_reason = "stop"
            yield _response(segment, new_tokens, mode, prompt.size, start, stats, len(emitted), finish_reason)
            if finish_reason is not None:
                return
    finally:
        strategy.close()


def _response(segment, tokens, mode, prompt_size, start, stats, generated, finish_reason) -> GenerationResponse:
    now = time.perf_counter()
    prefill_done = stats.prefill_done or now
    forwards = max(stats.forwards, 1)
    return GenerationResponse(
        text=segment,
        token=tokens[-1] if tokens else None,
        tokens=tokens,
        from_draft=len(tokens) > 1,
        prompt_tokens=prompt_size,
        prompt_tps=prompt_size / max(prefill_done - start, 1e-9),
        generation_tokens=generated,
        generation_tps=generated / max(now - prefill_done, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish_reason,
        mode=mode,
        forwards=stats.forwards,
        draft_forwards=stats.draft_forwards,
        tokens_per_forward=generated / forwards,
        decode_tokens_per_forward=(generated - stats.prefill_forwards) / max(forwards - stats.prefill_forwards, 1),
        acceptance_length=stats.acceptance_length,
        canvases=stats.canvases,
    )


def generate(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """Generate the whole text; with `verbose`, stream it and print mlx-lm's summary lines plus ours."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print("=" * 10)
        print(summary(response))
    return text


def summary(response: GenerationResponse) -> str:
    """mlx-lm's three summary lines and one line of our stats."""
    lines = [
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {response.peak_memory:.3f} GB",
    ]
    forwards = "denoising forwards" if response.mode == "diffusion" else "forwards"
    stats = f"Mode: {response.mode}, {forwards}: {response.forwards}"
    per_forward = f"{response.tokens_per_forward:.2f} (decode {response.decode_tokens_per_forward:.2f})"
    stats += f", tokens per forward: {per_forward}"
    if response.acceptance_length is not None:
        stats += f", acceptance length: {response.acceptance_length:.2f}"
    if response.canvases:
        stats += f", canvases: {response.canvases}"
    return "\n".join(lines + [stats])

