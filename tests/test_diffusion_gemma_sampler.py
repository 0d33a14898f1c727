"""The entropy-bound sampler against transformers' DiffusionGemma generate: replayed random draws give
the same accepted sets, step counts and tokens; independent runs agree in their statistics."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load, stream_generate
from mlx_dllm.sampler.common import Stats
from mlx_dllm.sampler.diffusion import DiffusionSettings, generate_diffusion

ref = pytest.importorskip("tests.reference.diffusion_gemma")

# A random model's argmax never settles, so the reference runs stop on confidence alone (stability 0);
# the stability rule is checked on a scripted denoiser below.
KNOBS = dict(
    max_denoising_steps=12, entropy_bound=0.5, t_min=0.4, t_max=0.8, stability_threshold=0, confidence_threshold=1.3
)
EOS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion_gemma")
    reference = ref.build_model(folder)
    model, tokenizer = load(str(folder))
    return reference, model, tokenizer


class ReplayNoise:
    """Hands our sampler the reference run's recorded canvases and draws, in order."""

    def __init__(self, events):
        self.noise = [mx.array(ids) for kind, ids in events if kind == "noise"]
        self.draws = [mx.array(ids) for kind, ids in events if kind == "draw"]

    def canvas(self, length, vocab_size):
        return self.noise.pop(0)

    def draw(self, logits):
        return self.draws.pop(0)


def _reference_canvases(events):
    """Per canvas: the accepted sets, one per step (a canvas starts with a fresh-noise event)."""
    canvases, previous = [], None
    for kind, value in events:
        if kind == "noise" and previous != "draw" and previous != "accepted":
            canvases.append([])
        if kind == "accepted":
            canvases[-1].append(value[0])
        previous = kind
    return canvases


def _pad_after_eos(tokens, canvas):
    """transformers' output: the canvas holding the first EOS keeps it and pads (0) what follows."""
    out = []
    for begin in range(0, len(tokens), canvas):
        block = tokens[begin : begin + canvas]
        if EOS in block:
            cut = block.index(EOS) + 1
            return out + block[:cut] + [0] * (len(block) - cut)
        out += block
    return out


@pytest.mark.parametrize("seed, prompt", [(0, [5, 9, 33, 4, 7]), (1, [200, 17]), (2, list(range(3, 23)))])
def test_replayed_draws_give_the_reference_run(checkpoint, seed, prompt):
    reference, model, _ = checkpoint
    max_tokens = 3 * ref.CANVAS
    tokens, _, events = ref.generate(reference, prompt, max_tokens, seed=seed, **KNOBS)
    steps, ours, stats = [], [], Stats()
    run = generate_diffusion(
        model,
        mx.array(prompt),
        stats=stats,
        max_tokens=max_tokens,
        options=dict(KNOBS, noise=ReplayNoise(events), on_step=steps.append),
    )
    for canvas in run:
        ours += canvas
        if EOS in canvas:
            break
    expected_canvases = _reference_canvases(events)
    ours_canvases = [[s.accepted for s in steps if s.canvas_index == i] for i in range(stats.canvases)]
    assert ours_canvases == expected_canvases  # same accepted sets, hence the same step counts
    assert _pad_after_eos(ours, ref.CANVAS) == tokens
    assert any(len(c) < KNOBS["max_denoising_steps"] for c in expected_canvases), "no canvas stopped early"


def _welch_z(a, b):
    return abs(np.mean(a) - np.mean(b)) / math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))


def test_statistics_match_the_reference_over_seeds(checkpoint):
    """Steps per canvas and tokens per forward from independent random streams: |z| < 4 (Welch)."""
    reference, model, _ = checkpoint
    prompt, max_tokens, runs = [5, 9, 33, 4, 7], 2 * ref.CANVAS, 16
    reference_steps, reference_tpf, our_steps, our_tpf = [], [], [], []
    for seed in range(runs):
        tokens, tpf, events = ref.generate(reference, prompt, max_tokens, seed=seed, **KNOBS)
        reference_steps += [len(c) for c in _reference_canvases(events)]
        reference_tpf.append(tpf)
        mx.random.seed(seed)
        steps, stats = [], Stats()
        run = generate_diffusion(
            model, mx.array(prompt), stats=stats, max_tokens=max_tokens, options=dict(KNOBS, on_step=steps.append)
        )
        produced = []
        for canvas in run:
            produced += canvas
            if EOS in canvas:
                break
        our_steps += [sum(s.canvas_index == i for s in steps) for i in range(stats.canvases)]
        valid = len([t for t in _pad_after_eos(produced, ref.CANVAS) if t != 0])
        our_tpf.append(valid / stats.forwards)
    assert _welch_z(our_steps, reference_steps) < 4, (np.mean(our_steps), np.mean(reference_steps))
    assert _welch_z(our_tpf, reference_tpf) < 4, (np.mean(our_tpf), np.mean(reference_tpf))


class ScriptedDenoiser:
    """Stands in for the model: the same peaked logits every step (a stable, confident canvas)."""

    text = type("Text", (), {"vocab_size": 16})()
    canvas_length = 4
    embedding_dtype = mx.float32

    def __init__(self):
        self.calls = 0

    def denoise(self, canvas, cache, self_conditioning=None):
        self.calls += 1
        return mx.broadcast_to(mx.where(mx.arange(16) == 3, 30.0, -30.0), (1, 4, 16))


@pytest.mark.parametrize("threshold, forwards", [(0, 1), (1, 2), (2, 3), (None, 12)])
def test_stability_needs_threshold_unchanged_argmax_steps(threshold, forwards):
    """transformers' history starts at -1: with threshold k the earliest stop is after forward k+1."""
    from mlx_dllm.sampler.diffusion import RandomNoise, denoise_canvas

    settings = DiffusionSettings(max_denoising_steps=12, stability_threshold=threshold)
    model = ScriptedDenoiser()
    tokens = denoise_canvas(model, [], settings, RandomNoise(), Stats())
    assert model.calls == forwards and tokens == [3, 3, 3, 3]


def test_front_picks_diffusion_and_reports_canvases(checkpoint, monkeypatch):
    _, model, tokenizer = checkpoint
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    responses = list(stream_generate(model, tokenizer, [5, 9, 33], 20, seed=3, **KNOBS))
    last = responses[-1]
    assert last.mode == "diffusion" and last.canvases == 3 and last.generation_tokens == 20
    assert last.tokens_per_forward == pytest.approx(20 / last.forwards)
    assert sum(len(r.tokens) for r in responses) == 20


def test_settings_come_from_generation_config_flat_or_nested():
    nested = {
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
        "linear_temperature_schedule_config": {"t_min": 0.2, "t_max": 0.9},
        "diffusion_stopping_config": {"stability_threshold": 2, "confidence_threshold": 0.01},
        "max_denoising_steps": 20,
        "t_min": None,
    }
    settings = DiffusionSettings.resolve(nested, {"entropy_bound": 0.25, "t_max": None})
    assert (settings.entropy_bound, settings.t_min, settings.t_max) == (0.25, 0.2, 0.9)
    assert (settings.max_denoising_steps, settings.stability_threshold, settings.confidence_threshold) == (20, 2, 0.01)
    assert settings.temperature(20) == pytest.approx(0.9) and settings.temperature(1) == pytest.approx(0.235)
    assert DiffusionSettings.resolve(None, {}) == DiffusionSettings()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0.5}, "unknown option temperature for mode diffusion"),
        ({"max_denoising_steps": 0}, "max_denoising_steps must be at least 1, got 0"),
        ({"entropy_bound": 0.0}, "entropy_bound must be > 0"),
        ({"t_min": 0.9, "t_max": 0.5}, "temperatures need"),
        ({"confidence_threshold": -1.0}, "confidence_threshold must be > 0"),
    ],
)
def test_bad_diffusion_options(checkpoint, options, message):
    _, model, tokenizer = checkpoint
    with pytest.raises(DLLMError, match=message):
        list(stream_generate(model, tokenizer, [5, 9], 8, **options))


def test_diffusion_model_refuses_other_modes(checkpoint):
    _, model, tokenizer = checkpoint
    with pytest.raises(DLLMError, match="support diffusion, not ar"):
        list(stream_generate(model, tokenizer, [5, 9], 8, mode="ar"))


@pytest.mark.parametrize(
    "options, message",
    [({"temp": 0.7}, "own schedule, not temp"), ({"block_size": 4}, "unknown option block_size for mode diffusion")],
)
def test_ar_sampling_flags_are_refused_in_diffusion_mode(checkpoint, options, message):
    _, model, tokenizer = checkpoint
    with pytest.raises(DLLMError, match=message):
        list(stream_generate(model, tokenizer, [5, 9], 8, **options))


def test_random_draw_follows_the_weights():
    """The exponential race picks id i with probability w_i / sum(w): chi-square over 40k draws."""
    from mlx_dllm.sampler.diffusion import RandomNoise

    mx.random.seed(0)
    weights = mx.array([1.0, 2.0, 3.0, 4.0, 0.0])
    draws = np.array(RandomNoise().draw(mx.broadcast_to(weights, (1, 40000, 5))))[0]
    observed = np.bincount(draws, minlength=5)
    expected = np.array([0.1, 0.2, 0.3, 0.4]) * 40000
    assert observed[4] == 0
    assert ((observed[:4] - expected) ** 2 / expected).sum() < 16.3  # chi-square, 3 dof, p = 0.001


def test_entropy_from_one_exp_pass_is_exact():
    from mlx_dllm.sampler.diffusion import softmax_weights_and_entropy

    logits = mx.random.normal((2, 3, 50)) * 4
    weights, entropy = softmax_weights_and_entropy(logits)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = -(mx.exp(log_probs) * log_probs).sum(axis=-1)
    np.testing.assert_allclose(np.array(entropy), np.array(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.array(weights / weights.sum(-1, keepdims=True)), np.array(mx.exp(log_probs)), rtol=1e-5
    )
