"""Drafter forward parity with the transformers reference, both weight layouts, and the window cache."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import load
from mlx_dllm.kernels import attention
from mlx_dllm.models.cache import WindowKVCache
from mlx_dllm.models.dflash import sliding_mask

torch = pytest.importorskip("torch")
harness = pytest.importorskip("tests.reference.harness")

TOLERANCE = 1e-4  # float32, max abs error on the drafter's final hidden states


def _random_calls(draft_config, lengths, block_size, seed=0):
    rng = np.random.default_rng(seed)
    features = len(draft_config.target_layer_ids) * draft_config.hidden_size
    return [
        {
            "features": rng.standard_normal((1, s, features)).astype(np.float32),
            "block_embeddings": rng.standard_normal((1, block_size, draft_config.hidden_size)).astype(np.float32),
        }
        for s in lengths
    ]


def _ours(draft, calls):
    cache = draft.make_cache()
    outputs = []
    for call in calls:
        out = draft(mx.array(call["block_embeddings"]), mx.array(call["features"]), cache)
        outputs.append(np.array(out))
    return outputs, cache


def _max_errors(draft_torch, draft_mlx, calls):
    reference = harness.reference_draft_forward(draft_torch, calls)
    ours, cache = _ours(draft_mlx, calls)
    return [float(np.abs(r.numpy() - o).max()) for r, o in zip(reference, ours)], cache


@pytest.mark.parametrize("lengths", [[7], [7, 3, 1, 5]], ids=["fresh", "incremental"])
def test_drafter_forward_matches_reference(hf_checkpoints, mlx_checkpoints, lengths):
    checkpoint = hf_checkpoints["qwen3_gqa"]
    draft, _ = load(str(mlx_checkpoints["qwen3_gqa"]["draft"]))
    calls = _random_calls(checkpoint["draft_model"].config, lengths, block_size=8)
    errors, cache = _max_errors(checkpoint["draft_model"], draft, calls)
    assert max(errors) <= TOLERANCE, errors
    assert all(c.offset == sum(lengths) for c in cache)  # context rows only, never the block


def test_zlab_layout_loads_to_the_same_drafter(hf_checkpoints, tmp_path):
    """z-lab checkpoints name the fusion `fc`/`hidden_norm` and keep ids in `dflash_config`."""
    checkpoint = hf_checkpoints["qwen3_gqa"]
    weights = mx.load(str(checkpoint["draft"] / "model.safetensors"))
    renamed = {
        k.replace("encoder.fc.", "fc.").replace("encoder.output_norm_enc.", "hidden_norm."): v
        for k, v in weights.items()
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), renamed)
    config = json.loads((checkpoint["draft"] / "config.json").read_text())
    config["architectures"] = ["DFlashDraftModel"]
    config["model_type"] = "qwen3"
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["dflash_config"] = {
        "target_layer_ids": config.pop("target_layer_ids"),
        "mask_token_id": config.pop("mask_token_id"),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    zlab, _ = load(str(tmp_path))
    glimmer, _ = load(str(checkpoint["draft"]))
    calls = _random_calls(checkpoint["draft_model"].config, [6, 2], block_size=8, seed=3)
    for a, b in zip(_ours(zlab, calls)[0], _ours(glimmer, calls)[0]):
        np.testing.assert_array_equal(a, b)


def test_sliding_drafter_matches_reference(hf_checkpoints, tmp_path):
    """Muse Glimmer's sliding layers: a bidirectional window narrower than the cached context."""
    target_config = hf_checkpoints["qwen3_gqa"]["target_model"].config
    layer_types = ["sliding_attention", "full_attention"]
    reference = harness.build_draft(target_config, tmp_path, layer_types=layer_types, sliding_window=4)
    draft, _ = load(str(tmp_path))
    calls = _random_calls(reference.config, [9, 3, 2, 6], block_size=8, seed=5)
    errors, _ = _max_errors(reference, draft, calls)
    assert max(errors) <= TOLERANCE, errors


def test_window_cache_rolls_back_past_its_window():
    """Attention through WindowKVCache equals full-cache attention under the same window, across rollbacks."""
    window, heads, dim = 5, 2, 8
    rng = np.random.default_rng(0)
    cache = WindowKVCache(window)
    all_keys = []
    for step, (new, rollback) in enumerate([(7, 2), (1, 0), (4, 3), (6, 5), (1, 1), (3, 0)]):
        keys = mx.array(rng.standard_normal((1, heads, new, dim)).astype(np.float32))
        queries = mx.array(rng.standard_normal((1, heads, new, dim)).astype(np.float32))
        pattern = cache.causal_pattern()
        kept_keys, kept_values = cache.update_and_fetch(keys, keys * 2)
        ours = attention(queries, kept_keys, kept_values, 0.3, pattern)

        all_keys.append(keys)
        full = mx.concatenate(all_keys, axis=2)
        positions = mx.arange(full.shape[2])
        full_mask = sliding_mask(positions[-new:], positions, window, causal=True)
        expected = mx.fast.scaled_dot_product_attention(queries, full, full * 2, scale=0.3, mask=full_mask)
        np.testing.assert_allclose(np.array(ours), np.array(expected), atol=1e-6, err_msg=f"step {step}")

        cache.trim(rollback)
        if rollback:
            all_keys = [mx.concatenate(all_keys, axis=2)[..., : full.shape[2] - rollback, :]]
        assert cache.offset == sum(k.shape[2] for k in all_keys)


ROPE_VARIANTS = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_VARIANTS))
def test_scaled_rope_drafter_matches_reference(hf_checkpoints, tmp_path, rope):
    """llama3 and YaRN RoPE (gpt-oss drafts use YaRN) at positions past the original context."""
    target_config = hf_checkpoints["qwen3_gqa"]["target_model"].config
    reference = harness.build_draft(target_config, tmp_path, rope_parameters=ROPE_VARIANTS[rope])
    draft, _ = load(str(tmp_path))
    calls = _random_calls(reference.config, [70, 3, 40], block_size=8, seed=7)
    errors, _ = _max_errors(reference, draft, calls)
    assert max(errors) <= TOLERANCE, errors


def test_gpt_oss_style_drafter_dispatches_on_architecture(tmp_path):
    """The gpt-oss drafter says model_type gpt_oss, has attention biases, YaRN and a nested block size."""
    from mlx.utils import tree_flatten

    from mlx_dllm.models import dflash

    config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "gpt_oss",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 48,
        "attention_bias": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 131072,
        "dflash_config": {"target_layer_ids": [1, 2], "mask_token_id": 200, "block_size": 8},
    }
    model = dflash.Model(dflash.ModelArgs.from_dict(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load(str(tmp_path))
    assert isinstance(loaded, dflash.Model) and loaded.args.block_size == 8
    assert "bias" in loaded.layers[0].self_attn.o_proj
    names = dict(tree_flatten(loaded.parameters()))
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(names[name]), np.array(value))
