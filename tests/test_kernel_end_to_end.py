"""Every mode's greedy output is unchanged when every attention call of our model files runs the block kernel
(emulated on Linux, real on a Mac), on tiny random checkpoints of the three families."""

import mlx.core as mx
import pytest

from mlx_dllm import load, stream_generate
from mlx_dllm.benchmark import tiny
from mlx_dllm.kernels import metal, patterns, routing

PROMPT = [5, 17, 42, 9, 88, 3, 61, 27]
MAX_TOKENS = 12
CASES = [("dflash", "dflash"), ("diffusion-gemma", "diffusion")] + [
    ("nemotron", mode) for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec")
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.build_tiny(family, root / family) for family in {family for family, _ in CASES}}


OPTIONS = {"diffusion-gemma": {"max_denoising_steps": 3}}  # each emulated canvas step costs seconds


def greedy(model, tokenizer, draft, family, mode):
    mx.random.seed(0)  # DiffusionGemma draws its canvases and its noise
    tokens = []
    prompt, options = mx.array(PROMPT), OPTIONS.get(family, {})
    for response in stream_generate(model, tokenizer, prompt, MAX_TOKENS, draft_model=draft, mode=mode, **options):
        tokens += response.tokens
    return tokens


@pytest.mark.parametrize("family, mode", CASES)
def test_greedy_output_is_unchanged_with_every_attention_on_the_kernel(
    checkpoints, request, monkeypatch, family, mode
):
    model_path, draft_path = checkpoints[family]
    model, tokenizer = load(str(model_path))
    draft = load(str(draft_path))[0] if draft_path else None
    expected = greedy(model, tokenizer, draft, family, mode)  # this backend's stock attention

    if not mx.metal.is_available():
        request.getfixturevalue("metal_emulator")
    launched = []
    real = metal.block_attention
    monkeypatch.setattr(routing, "route", lambda call: routing.KERNEL)
    monkeypatch.setattr(metal, "block_attention", lambda *args: launched.append(args[4]) or real(*args))
    assert greedy(model, tokenizer, draft, family, mode) == expected
    assert launched, "no attention call reached the kernel"
    if mode == "quadratic-spec":  # the layout's pattern itself, not a mask
        assert patterns.QUADRATIC in {pattern.kind for pattern in launched}
