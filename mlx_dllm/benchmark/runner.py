"""Greedy runs of every method on the same weights: mlx-lm's plain generation and our modes, interleaved.

A method is `mlx_lm`, a mode's name, or a mode with options: `NAME:OPTION=VALUE[:OPTION=VALUE...]`, e.g.
`dflash:speculation=tree:tree_budget=16`, checked by the mode's own declarations.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import mlx.core as mx

from ..errors import DLLMError
from ..sampler.mode import Mode, modes_of

MLX_LM = "mlx_lm"


@dataclass
class Sample:
    """One greedy generation, with the numbers as each API reports them."""

    tokens: List[int]
    generation_tps: float
    prompt_tps: float
    peak_memory_gb: float
    tokens_per_forward: float
    acceptance_length: Optional[float]
    step_tokens: List[int] = field(default_factory=list)  # tokens committed per decoding step
    speculation: Optional[Dict[str, float]] = None  # speculative rounds by what they verified


def run_mlx_lm(model, tokenizer, prompt: List[int], max_tokens: int, draft=None) -> Sample:
    from mlx_lm.generate import stream_generate

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens))
    tokens = [r.token for r in responses]
    if responses[-1].finish_reason == "stop":
        tokens.pop()  # mlx-lm reports the EOS token; ours does not
    last = responses[-1]
    return Sample(tokens, last.generation_tps, last.prompt_tps, last.peak_memory, 1.0, None, [1] * (len(tokens) - 1))


def split_method(method: str) -> Tuple[str, Dict[str, str]]:
    """(mode name, {option: text}) of `NAME:OPTION=VALUE:...`."""
    name, *settings = method.split(":")
    options = {}
    for setting in settings:
        option, equals, value = setting.partition("=")
        if not equals or not option or not value:
            raise DLLMError(f"--modes {method}: write a mode's options as NAME:OPTION=VALUE, e.g. "
                            "dflash:speculation=tree:tree_budget=16")
        options[option] = value
    return name, options


def method_options(mode: Mode, method: str, given: Dict[str, str]) -> Dict:
    """The method's options, typed and checked by the mode's declarations."""
    declared = {option.name: option for option in mode.options}
    typed = {}
    for name, text in given.items():
        option = declared.get(name)
        if option is None or not option.served:
            raise DLLMError(f"--modes {method}: {mode.name} has no option {name}")
        if option.kind is bool:
            typed[name] = {"true": True, "false": False}.get(text.lower(), text)
        elif option.kind in (int, float):
            try:
                typed[name] = option.kind(text)
            except ValueError:
                typed[name] = text  # refused below, in the declaration's words
        else:
            typed[name] = text
    try:
        return mode.check_options(typed)
    except DLLMError as error:
        raise DLLMError(f"--modes {method}: {error}") from None


def method_mode(model, method: str) -> Mode:
    return modes_of(model)[split_method(method)[0]]


def mode_runner(mode: Mode, block_size: Optional[int] = None, options: Optional[Dict] = None) -> Callable:
    """One of our modes with its `options`; `block_size` is the drafter's block (None: its trained one)."""
    options = options or {}

    def run(model, tokenizer, prompt: List[int], max_tokens: int, draft=None) -> Sample:
        from ..sampler import stream_generate

        drafting = {"draft_model": draft, "block_size": block_size} if mode.drafter else {}
        kwargs = {**drafting, **options}
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens, mode=mode.name, **kwargs))
        last = responses[-1]
        steps = [len(r.tokens) for r in responses[1:] if r.tokens]  # the first holds the prefill's token
        tokens = [t for r in responses for t in r.tokens]
        return Sample(
            tokens,
            last.generation_tps,
            last.prompt_tps,
            last.peak_memory,
            last.tokens_per_forward,
            last.acceptance_length,
            steps,
            last.speculation,
        )

    return run


def runners(model, methods: List[str], block_size: Optional[int] = None) -> Dict[str, Callable]:
    found = {}
    for method in methods:
        if method == MLX_LM:
            found[method] = run_mlx_lm
            continue
        name, given = split_method(method)
        mode = modes_of(model)[name]
        found[method] = mode_runner(mode, block_size, method_options(mode, method, given))
    return found


def lossless(model, methods: List[str]) -> Set[str]:
    """The methods whose greedy output must equal greedy AR: mlx-lm's, and the modes declared lossless."""
    return {m for m in methods if m == MLX_LM or method_mode(model, m).lossless}


def rotated(methods: List[str], repeat: int) -> List[str]:
    """The method order of one repeat: rotated each repeat, so no method always runs first or warm."""
    shift = repeat % len(methods)
    return methods[shift:] + methods[:shift]


def first_divergence(tokens: List[int], reference: List[int]) -> Optional[int]:
    if tokens == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def run_all(
    model,
    tokenizer,
    draft,
    prompts: List[List[int]],
    run: Dict[str, Callable],
    max_tokens: int,
    repeats: int,
    progress=None,
):
    """Samples per method of `run` (over repeats and prompts) and the lossless methods' divergences from the
    reference."""
    methods = list(run)
    for method in methods:  # warm-up: compile paths and fill allocator pools outside the measurement
        run[method](model, tokenizer, prompts[0], min(max_tokens, 8), draft)
    reference = MLX_LM if MLX_LM in methods else ("ar" if "ar" in methods else None)
    exact = lossless(model, methods)
    samples = {m: [] for m in methods}
    mismatches = []
    for repeat in range(repeats):
        for index, prompt in enumerate(prompts):
            outputs = {}
            for method in rotated(methods, repeat + index):
                mx.reset_peak_memory()
                outputs[method] = run[method](model, tokenizer, prompt, max_tokens, draft)
                samples[method].append(outputs[method])
            mismatches += check_outputs(outputs, reference, exact, repeat, index)
            if progress is not None:
                progress()
    return samples, mismatches


def check_outputs(
    outputs: Dict[str, Sample], reference: Optional[str], exact: Set[str], repeat: int, prompt: int
) -> List[dict]:
    if reference is None:
        return []
    found = []
    for method, sample in outputs.items():
        if method in exact and method != reference:
            position = first_divergence(sample.tokens, outputs[reference].tokens)
            if position is not None:
                found.append(
                    {"method": method, "reference": reference, "repeat": repeat, "prompt": prompt, "position": position}
                )
    return found
