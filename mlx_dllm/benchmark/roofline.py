"""A roofline projection for Apple GPUs, labelled as such: not a measurement."""

from typing import Dict, Optional, Tuple

from mlx.utils import tree_flatten

from ..sampler.mode import modes_of

# Assumed Apple GPU specs: memory bandwidth (bytes/s), dense fp16 FLOP/s.
CHIPS = {"M3 Max": (400e9, 14e12), "M4 Max": (546e9, 17e12), "M2 Ultra": (800e9, 27e12)}


def weights(module) -> Tuple[int, int]:
    """(bytes, parameters) of a module's weights."""
    arrays = [v for _, v in tree_flatten(module.parameters())]
    return sum(v.nbytes for v in arrays), sum(v.size for v in arrays)


def forward_seconds(nbytes: int, params: int, tokens: int, chip: str) -> float:
    """max(weight bytes / bandwidth, 2 * params * tokens / peak FLOPs); attention and launches ignored."""
    bandwidth, flops = CHIPS[chip]
    return max(nbytes / bandwidth, 2 * params * tokens / flops)


def block_tokens(model, draft, block_size: Optional[int] = None) -> int:
    """The block one step drafts or denoises: the one asked for, the drafter's, the model's, or DiffusionGemma's
    canvas."""
    block = block_size or getattr(draft, "block_size", None)
    block = block or getattr(getattr(model, "args", None), "block_size", None)
    return block or getattr(model, "canvas_length", 1)


def project(
    chip: str, model, draft, tokens_per_step: Dict[str, float], block_size: Optional[int] = None
) -> Dict[str, float]:
    """Projected speedup over AR per mode: tokens per step x t(AR forward) / t(step)."""
    ar = forward_seconds(*weights(model), 1, chip)
    speedups = {}
    modes = modes_of(model)
    block = block_tokens(model, draft, block_size)
    for mode, tokens in tokens_per_step.items():
        forwards = modes[mode].step_forwards(model, draft, block)
        step = sum(forward_seconds(*weights(module), count, chip) for module, count in forwards)
        speedups[mode] = (tokens or 1.0) * ar / step
    return speedups
