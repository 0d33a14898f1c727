"""DiffusionGemma forward parity with transformers' DiffusionGemmaForBlockDiffusion (float32)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load
from mlx_dllm.models.diffusion_gemma import ModelArgs

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.reference.diffusion_gemma")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion_gemma")
    return ref.build_model(folder), folder


def _random(seed, prompt_length):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, ref.VOCAB, prompt_length).tolist()
    canvases = [rng.integers(0, ref.VOCAB, ref.CANVAS).tolist() for _ in range(2)]
    self_conditioning = (rng.standard_normal((1, ref.CANVAS, ref.VOCAB)) * 3).astype(np.float32)
    return prompt, canvases, self_conditioning


def _compare(reference, model, prompt, canvases, self_conditioning, prefill_chunk=None):
    """Encode the prompt, denoise canvas 1 (without and with self-conditioning), commit its argmax,
    then denoise canvas 2: the max abs logit error of each forward."""
    ref_cache, cache = ref.new_cache(reference), model.make_cache()
    ref.encode(reference, prompt, ref_cache)
    chunk = prefill_chunk or len(prompt)
    for begin in range(0, len(prompt), chunk):
        model.encode(mx.array([prompt[begin : begin + chunk]]), cache)
    errors = []
    for canvas in canvases:
        for signal in (None, self_conditioning):
            expected = ref.denoise(reference, canvas, ref_cache, signal).numpy()
            sc = None if signal is None else mx.array(signal)
            ours = np.array(model.denoise(mx.array([canvas]), cache, sc))
            errors.append(float(np.abs(expected - ours).max()))
        committed = expected[0].argmax(-1).tolist()
        ref.encode(reference, committed, ref_cache)
        model.encode(mx.array([committed]), cache)
    return errors


@pytest.mark.parametrize(
    "prompt_length, chunk", [(5, None), (13, None), (21, 6)], ids=["short", "past-window", "chunked"]
)
def test_encoder_and_denoiser_match_reference(checkpoint, prompt_length, chunk):
    reference, folder = checkpoint
    model, _ = load(str(folder))
    errors = _compare(reference, model, *_random(prompt_length, prompt_length), prefill_chunk=chunk)
    assert max(errors) <= TOLERANCE, errors


def test_legacy_global_head_fields_load_the_same_model(checkpoint, tmp_path):
    """Older checkpoints carry global_head_dim / num_global_key_value_heads instead of per_layer_config."""
    reference, folder = checkpoint
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text.pop("per_layer_config")
    text.update(global_head_dim=16, num_global_key_value_heads=1)
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load(str(tmp_path))
    errors = _compare(reference, model, *_random(3, 11))
    assert max(errors) <= TOLERANCE, errors


def test_empty_per_layer_config_keeps_the_base_attention_shape(tmp_path):
    """transformers writes `per_layer_config: {}` when full and sliding layers share their shape."""
    reference = ref.build_model(tmp_path, global_head_dim=8, num_global_key_value_heads=2)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["per_layer_config"] == {}
    model, _ = load(str(tmp_path))
    errors = _compare(reference, model, *_random(4, 11))
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": None}, "missing the expert fields num_experts"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all' is not supported"),
        ({"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ],
)
def test_config_it_cannot_honour_is_refused(checkpoint, change, message):
    _, folder = checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(change)
    config["text_config"] = {k: v for k, v in config["text_config"].items() if v is not None}
    with pytest.raises(DLLMError, match=message):
        ModelArgs.from_dict(config)
