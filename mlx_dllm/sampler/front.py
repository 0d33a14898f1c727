"""The shared front of every decoding strategy: `stream_generate(model, tokenizer, prompt, mode=...)`."""

import time
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit

from ..chat_template import end_of_thinking_id
from ..errors import DLLMError
from ..kernels.attention import check_fits
from .arguments import (
    SEED_LIMIT,
    check_models,
    embedding_rows,
    encode_prompt,
    stop_strings,
    tokenizer_eos_ids,
    whole_number,
    wrap_tokenizer,
)
from .common import GenerationResponse, Sampling, Stats, TokenSelector, check_finite, check_sampling
from .dflash import block_size_option
from .mode import Mode, all_modes, modes_of
from .prompt_cache import NO_REUSE, PromptCache, PromptState
from .stopping import StopStringStream

CLEAR_CACHE_EVERY = 256  # tokens, as mlx-lm's generate_step


def _choose_mode(name: Optional[str], model: nn.Module, draft_model: Optional[nn.Module]) -> Mode:
    """The asked mode, else the draft's, else the model's own default (mlx-lm models: plain AR)."""
    if name is None:
        source = draft_model if draft_model is not None else model
        name = getattr(source, "default_mode", "dflash" if draft_model is not None else "ar")
    modes = modes_of(model)
    if name not in modes:
        if all(name != mode.name for mode in all_modes()):
            raise DLLMError(f"unknown mode '{name}' (choose from {', '.join(modes)})")
        family = type(model).__module__.rsplit(".", 1)[-1]
        raise DLLMError(f"{family} models support {', '.join(modes)}, not {name}")
    mode = modes[name]
    if mode.drafter and draft_model is None:
        raise DLLMError(f"mode '{name}' needs a draft model (--draft-model)")
    return mode


def _thinking_end(options: dict, tokenizer) -> dict:
    """A thinking budget ends with the tokenizer's </think> unless the caller names the id."""
    if options.get("max_thinking_tokens") is None or options.get("end_think_token_id") is not None:
        return options
    token = end_of_thinking_id(tokenizer)
    if token is None:
        raise DLLMError("max_thinking_tokens needs a tokenizer with a </think> token")
    return {**options, "end_think_token_id": token}


def _selector(mode: Mode, temp, top_p, top_k, min_p, sampler, logits_processors, vocab_rows, prompt):
    """The token selector: mlx-lm's `sampler` and `logits_processors` where the mode honours them."""
    sampling = (temp, top_p, top_k, min_p) != (0.0, 1.0, 0, 0.0)
    check_sampling(temp, top_p, top_k, min_p)
    if vocab_rows is not None and top_k > vocab_rows:
        raise DLLMError(f"top_k {top_k} is above the vocabulary of {vocab_rows}")
    if sampling and not mode.samples:
        raise DLLMError(f"mode {mode.name} samples with its own schedule, not temp/top_p/top_k/min_p")
    custom = [name for name, value in (("sampler", sampler), ("logits_processors", logits_processors)) if value]
    if custom and not mode.honours_sampler:
        honouring = ", ".join(dict.fromkeys(m.name for m in all_modes() if m.honours_sampler))
        raise DLLMError(f"{' and '.join(custom)} apply to AR logits ({honouring} modes)")
    if sampler is not None:
        if sampling:
            raise DLLMError("give either sampler= or temp/top_p/top_k/min_p, not both")
        if not callable(sampler):
            raise DLLMError(f"sampler must be callable, got {type(sampler).__name__}")
    processors = list(logits_processors or ())
    if not all(callable(p) for p in processors):
        raise DLLMError("logits_processors must be a list of callables (tokens, logits) -> logits")
    sampling = Sampling(temp, top_p, top_k, min_p) if sampler is None and temp != 0 else None
    return TokenSelector(sampler, processors, prompt, sampling)


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
    stop: Union[str, Sequence[str]] = (),
    block_size: Optional[int] = None,
    num_draft_tokens: Optional[int] = None,
    prefill_step_size: int = 2048,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[PromptCache] = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream the generated text chunk by chunk; every response carries the running stats.

    `sampler` and `logits_processors` are mlx-lm's (`make_sampler`, `make_logits_processors`); they apply
    wherever tokens come from AR logits (ar, and the verify of dflash, linear-spec and quadratic-spec).
    `num_draft_tokens` is mlx-lm's name for DFlash's `block_size` - 1. Text that could begin a `stop` string
    is held back until it is decided.
    `prompt_cache` (a PromptCache) resumes the longest usable state an earlier call left for this prompt's prefix and
    keeps this call's states for later ones (`cached_tokens` in the responses; see sampler/prompt_cache.py).
    `options` are the mode's own (see its `MODE` declaration; None means: the default); another mode's are
    refused: DiffusionGemma's denoising knobs (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`,
    `stability_threshold`, `confidence_threshold`, `on_step`); Nemotron-Labs-Diffusion's `block_length`,
    `threshold`, `causal_context`, `lora`, `max_thinking_tokens` (ended by the tokenizer's </think> unless
    `end_think_token_id` names another id).
    """
    check_models(model, draft_model)
    max_tokens = whole_number("max_tokens", max_tokens, 1)
    prefill_step_size = whole_number("prefill_step_size", prefill_step_size, 1)
    if seed is not None:
        seed = whole_number("seed", seed, 0, SEED_LIMIT - 1)
    stops = stop_strings(stop)
    tokenizer = wrap_tokenizer(tokenizer)
    chosen = _choose_mode(mode, model, draft_model)
    block_size = block_size_option(block_size, num_draft_tokens)
    options = chosen.check_options({**options, **({} if block_size is None else {"block_size": block_size})})
    options = _thinking_end(options, tokenizer)
    vocab_rows = embedding_rows(model)
    prompt = encode_prompt(tokenizer, prompt, vocab_rows)
    # The last prompt chunk attends to the whole prompt, in whichever attention the model runs.
    check_fits(
        getattr(getattr(model, "args", None), "num_attention_heads", 1),
        min(prefill_step_size, prompt.size),
        prompt.size,
    )
    select = _selector(chosen, temp, top_p, top_k, min_p, sampler, logits_processors, vocab_rows, prompt)
    eos_ids = tokenizer_eos_ids(tokenizer)
    if seed is not None:
        mx.random.seed(seed)
    stats = Stats()
    state = NO_REUSE
    if prompt_cache is not None:
        if not isinstance(prompt_cache, PromptCache):
            raise DLLMError(f"prompt_cache must be a PromptCache, got {type(prompt_cache).__name__}")
        state = prompt_cache.begin(model, draft_model, chosen.name, prompt.tolist())
    strategy = chosen.run(
        model,
        prompt,
        draft_model=draft_model,
        select=select,
        stats=stats,
        max_tokens=max_tokens,
        prefill_step_size=prefill_step_size,
        eos_token_ids=eos_ids,
        options=options,
        prompt_state=state,
    )
    responder = Responder(tokenizer, chosen, prompt.size, max_tokens, eos_ids, stops, state)
    yield from _stream(model, strategy, stats, responder, state)


def _stream(model, strategy, stats, responder, state):
    """Run the strategy on mlx-lm's generation stream under its wired limit; turn its tokens into responses.
    The states it leaves go to the prompt cache unless it failed (a caller that stops reading is no failure)."""
    mx.reset_peak_memory()
    failed = False
    try:
        with wired_limit(model, [generation_stream]):
            while True:
                with mx.stream(generation_stream):
                    tokens = next(strategy, None)
                before = responder.committed
                # A strategy ends only at max_tokens.
                response = responder.add(tokens or [], stats, None if tokens is not None else "length")
                if responder.committed // CLEAR_CACHE_EVERY > before // CLEAR_CACHE_EVERY:
                    mx.clear_cache()
                yield response
                if response.finish_reason is not None:
                    return
    except BaseException as error:
        failed = not isinstance(error, GeneratorExit)  # an interrupt may leave a round half done
        raise
    finally:
        with mx.stream(generation_stream):
            strategy.close()  # a strategy leaves its state as it stops
        if not failed:
            state.store()


class Responder:
    """One request's committed tokens -> its responses, for the front and for each row of the server's batch: an EOS
    id, max_tokens or a stop string ends it; the text is the tokenizer's streaming detokenizer's (one per request),
    held back while a stop string could begin in it; every response carries the running stats."""

    def __init__(self, tokenizer, mode: Mode, prompt_size: int, max_tokens: int, eos_ids, stops,
                 prompt_state: PromptState = NO_REUSE):
        self.text = StopStringStream(tokenizer.detokenizer, stops)  # mlx-lm hands each caller a fresh one
        self.mode, self.prompt_size, self.max_tokens, self.eos_ids = mode, prompt_size, max_tokens, eos_ids
        self.prompt_state = prompt_state  # its cached tokens are known once the strategy has resumed it
        self.start = time.perf_counter()
        self.committed = self.emitted = 0

    def add(self, tokens: List[int], stats: Stats, finish_reason: Optional[str] = None) -> GenerationResponse:
        """The response to one step's committed tokens. `finish_reason`: an end the caller already knows ("length":
        the strategy is done; "stop": the caller ended at an EOS id it did not pass)."""
        check_finite(tokens)
        for token in tokens:
            if token in self.eos_ids:
                finish_reason = "stop"
                break
            self.text.add(token)
            self.committed += 1
            if self.committed >= self.max_tokens:
                finish_reason = "length"
                break
        segment, released = self.text.release(final=finish_reason is not None)
        if self.text.stopped:
            finish_reason = "stop"
        self.emitted += len(released)
        return self._response(segment, released, stats, finish_reason)

    def _response(self, segment, tokens, stats: Stats, finish_reason) -> GenerationResponse:
        now = time.perf_counter()
        prefill_done = stats.prefill_done or now
        decoded = max(self.emitted - stats.prefill_tokens, 0)  # tokens the decoding forwards produced
        mode, cached = self.mode, self.prompt_state.start
        return GenerationResponse(
            text=segment,
            token=tokens[-1] if tokens else None,
            tokens=tokens,
            from_draft=len(tokens) > 1,
            prompt_tokens=self.prompt_size,
            prompt_tps=(self.prompt_size - cached) / max(prefill_done - self.start, 1e-9),  # tokens it prefilled
            generation_tokens=self.emitted,
            generation_tps=self.emitted / max(now - prefill_done, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            mode=mode.name,
            forwards=stats.decoding_forwards,
            draft_forwards=stats.draft_forwards,
            tokens_per_forward=decoded / max(stats.decoding_forwards, 1),
            acceptance_length=stats.acceptance_length if "acceptance_length" in mode.reports else None,
            canvases=stats.canvases,
            speculation=stats.speculation if "speculation" in mode.reports else None,
            cached_tokens=cached,
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
    """mlx-lm's three summary lines and one line of our stats, with the same fields in every mode (see
    GenerationResponse for their definitions)."""
    acceptance = "-" if response.acceptance_length is None else f"{response.acceptance_length:.2f}"
    return "\n".join(
        [
            f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
            f"Peak memory: {response.peak_memory:.3f} GB",
            f"Mode: {response.mode}, forwards: {response.forwards}, draft forwards: {response.draft_forwards}, "
            f"tokens per forward: {response.tokens_per_forward:.2f}, acceptance length: {acceptance}"
            + _rounds(response.speculation),
        ]
    )


def _rounds(speculation) -> str:
    """What the speculative rounds verified: ", rounds: ar 12%, chain 70%, tree 18%, mean budget 4.6" (else "-")."""
    if not speculation:
        return ", rounds: -"
    shares = ", ".join(f"{kind} {speculation[kind]:.0%}" for kind in ("ar", "chain", "tree"))
    return f", rounds: {shares}, mean budget {speculation['mean_budget']:.1f}"
