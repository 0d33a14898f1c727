"""Uniform-state block diffusion with the entropy-bound sampler (DiffusionGemma), transformers semantics.

Each canvas starts as uniform random ids over the whole vocabulary. Every step samples all positions
from the temperature-scaled logits, keeps the lowest-entropy ones while their summed entropy minus the
largest stays within `entropy_bound`, and re-noises every other position. A canvas ends when its argmax
is stable and the mean entropy is low (or after `max_denoising_steps`); its argmax is committed through
the encoder and the next canvas starts.
"""

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError
from .common import NOT_FINITE, Stats, evaluate_chunk
from .mode import Mode, Option
from .prompt_cache import NO_REUSE, PromptState

# Where knobs may sit in a generation_config.json besides the top level (release-candidate conversions).
NESTED_SECTIONS = ("sampler_config", "linear_temperature_schedule_config", "diffusion_stopping_config")


def knob(name: str, kind: type, help: str, **limits) -> Option:
    return Option(name, kind, help, label=f"diffusion option {name}", **limits)


# The denoising knobs: a caller's values and generation_config.json's are checked by the same declarations.
KNOBS = (
    knob("max_denoising_steps", int, "steps per canvas at most", minimum=1),
    knob("entropy_bound", float, "entropy budget of the tokens a step accepts", minimum=0, above_minimum=True),
    knob("t_min", float, "temperature at the last step", minimum=0),
    knob("t_max", float, "temperature at the first step", minimum=0),
    knob("stability_threshold", int, "steps the argmax must hold to stop", minimum=0),
    knob("confidence_threshold", float, "mean entropy to stop under", minimum=0, above_minimum=True),
)
ON_STEP = Option("on_step", callable, "called with each step's StepState", public=False, flag="--visualize")
NOISE = Option("noise", object, "replays recorded random draws (tests)", public=False)


@dataclass
class DiffusionSettings:
    """The denoising knobs; defaults are transformers' global fallbacks."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: Optional[float] = 0.4
    t_max: Optional[float] = 0.8
    stability_threshold: Optional[int] = 1
    confidence_threshold: Optional[float] = 0.005

    @classmethod
    def resolve(cls, generation_config: Optional[Dict], overrides: Dict) -> "DiffusionSettings":
        """generation_config.json (flat or nested forms), then explicit overrides (None means: keep); the mode
        declaration has refused any name that is not a knob."""
        names = {f.name for f in fields(cls)}
        values = {}
        config = generation_config or {}
        for section in (config, *(config.get(s) or {} for s in NESTED_SECTIONS)):
            values.update({k: v for k, v in section.items() if k in names and v is not None})
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Each knob by its declaration (strings, booleans, lists, inf and nan from a hand-edited
        generation_config.json are refused), then the temperatures together."""
        for option in KNOBS:
            if getattr(self, option.name) is not None:
                option.check(getattr(self, option.name))
        if self.t_min is not None and self.t_max is not None and not self.t_min < self.t_max:
            raise DLLMError(f"temperatures need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def temperature(self, remaining: int) -> float:
        """Linear in the steps *remaining*: t_max on the first step, never reaching t_min."""
        if self.t_min is None or self.t_max is None:
            return 1.0
        return self.t_min + (self.t_max - self.t_min) * remaining / self.max_denoising_steps

    @property
    def adaptive_stop(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None


class RandomNoise:
    """The sampler's random draws, from `mx.random` (seeded by the caller); tests replay recorded ones instead."""

    def canvas(self, length: int, vocab_size: int) -> mx.array:
        return mx.random.randint(0, vocab_size, (1, length))

    def draw(self, weights: mx.array) -> mx.array:
        """One id per position with probability proportional to `weights` (an exponential race, exact)."""
        return mx.argmax(weights / -mx.log(mx.random.uniform(shape=weights.shape)), axis=-1)


@dataclass
class StepState:
    """What a denoising step leaves behind, for `on_step` (the --visualize redraw), in both diffusion modes."""

    canvas_index: int
    step: int
    canvas: List[int]  # the next step's input: accepted samples (DiffusionGemma) or commits, noise or masks elsewhere
    accepted: List[bool]
    argmax: List[int]
    mean_entropy: Optional[float] = None  # DiffusionGemma's stopping statistic
    committed: List[int] = field(default_factory=list)  # mask diffusion: the positions this step unmasked


def softmax_weights_and_entropy(logits: mx.array):
    """Unnormalised softmax weights and the entropy of each position, with a single exp pass over the vocab."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = mx.exp(shifted)
    total = weights.sum(axis=-1)
    return weights, mx.log(total) - (weights * shifted).sum(axis=-1) / total


def entropy_bound_mask(entropy: mx.array, bound: float) -> mx.array:
    """Accept the lowest-entropy positions while cumsum(sorted H) - H <= bound (the lowest always)."""
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    selected = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= bound
    return mx.put_along_axis(mx.zeros(entropy.shape, dtype=mx.bool_), order, selected, axis=-1)


def sample_step(logits: mx.array, temperature: mx.array, bound: mx.array, noise):
    """Temper the logits, draw every position, accept by the entropy bound and re-noise the rest."""
    logits = logits / temperature
    weights, entropy = softmax_weights_and_entropy(logits)
    accepted = entropy_bound_mask(entropy, bound)
    canvas = mx.where(accepted, noise.draw(weights), noise.canvas(*logits.shape[1:]))
    argmax = mx.where(mx.isfinite(entropy), mx.argmax(logits, axis=-1).astype(mx.int32), NOT_FINITE)
    return canvas, accepted, argmax, entropy.mean(), logits


# With live random draws the whole step compiles into one graph (a third of its host time on CPU);
# replayed draws stay eager, since compiling would freeze them into the graph.
random_sample_step = mx.compile(
    partial(sample_step, noise=RandomNoise()), inputs=mx.random.state, outputs=mx.random.state
)


def should_stop(settings: DiffusionSettings, argmax: mx.array, mean_entropy: mx.array, history: List) -> mx.array:
    """Stable (argmax equal to each of the last `stability_threshold` ones) and confident (mean entropy below
    the threshold); like transformers' history filled with -1, too short a history is never stable."""
    if not settings.adaptive_stop or len(history) < settings.stability_threshold:
        return mx.array(False)
    stop = mean_entropy < settings.confidence_threshold
    for previous in history:
        stop = stop & mx.array_equal(argmax, previous)
    return stop


def denoise_canvas(
    model: nn.Module,
    cache: List,
    settings: DiffusionSettings,
    noise,
    stats: Stats,
    on_step: Optional[Callable[[StepState], None]] = None,
    canvas_index: int = 0,
) -> List[int]:
    """Denoise one canvas against the committed cache; return its argmax tokens."""
    canvas = noise.canvas(model.canvas_length, model.text.vocab_size)
    self_conditioning = None
    history: List[mx.array] = []
    argmax = canvas
    step_fn = random_sample_step if type(noise) is RandomNoise else partial(sample_step, noise=noise)
    bound = mx.array(settings.entropy_bound)
    for step, remaining in enumerate(range(settings.max_denoising_steps, 0, -1)):
        logits = model.denoise(canvas, cache, self_conditioning)
        stats.forwards += 1
        temperature = mx.array(settings.temperature(remaining))
        canvas, accepted, argmax, mean_entropy, logits = step_fn(logits, temperature, bound)
        # The next step conditions on this step's tempered logits, stored in the embedding dtype.
        self_conditioning = logits.astype(model.embedding_dtype)
        stop = should_stop(settings, argmax, mean_entropy, history)
        mx.eval(canvas, self_conditioning, argmax, stop)  # the step's one host sync
        if on_step is not None:
            state = (canvas[0].tolist(), accepted[0].tolist(), argmax[0].tolist(), mean_entropy.item())
            on_step(StepState(canvas_index, step, *state))
        if stop.item():
            break
        if settings.stability_threshold:
            history = (history + [argmax])[-settings.stability_threshold :]
    return argmax[0].tolist()


def generate_diffusion(
    model: nn.Module,
    prompt: mx.array,
    *,
    stats: Stats,
    max_tokens: int,
    prefill_step_size: int = 2048,
    options: Optional[Dict] = None,
    prompt_state: PromptState = NO_REUSE,
    **_,
) -> Iterator[List[int]]:
    """Yield one committed canvas at a time; the front stops at EOS or `max_tokens`."""
    options = dict(options or {})
    noise = options.pop("noise", None) or RandomNoise()
    on_step = options.pop("on_step", None)
    settings = DiffusionSettings.resolve(getattr(model.args, "generation_config", None), options)
    cache = prompt_state.resume() or model.make_cache()

    def encode(ids: mx.array):
        model.encode(ids[None], cache)  # only the K/V are evaluated: the hidden states are never needed
        evaluate_chunk(cache)

    for begin in range(prompt_state.start, prompt.shape[0], prefill_step_size):
        encode(prompt[begin : begin + prefill_step_size])
    prompt_state.prompt_end(cache)
    stats.mark_prefill()
    tokens, held = None, []  # held: the encoded canvases' tokens
    try:
        for canvas_index in range(-(-max_tokens // model.canvas_length)):  # integer ceil: any size of int
            if tokens is not None:
                encode(mx.array(tokens))  # commit the previous canvas; the last one is never encoded
                held += tokens
            tokens = denoise_canvas(model, cache, settings, noise, stats, on_step, canvas_index)
            stats.canvases += 1
            yield tokens
    finally:
        prompt_state.leave(held, cache)


MODE = Mode(
    "diffusion",
    generate_diffusion,
    lossless=False,
    samples=False,  # its temperatures are its own schedule (t_min, t_max)
    honours_sampler=False,
    step_forwards=lambda model, draft, block: [(model, block)],  # one denoising step over the canvas
    options=(*KNOBS, ON_STEP, NOISE),
    reports=("canvases",),
)
