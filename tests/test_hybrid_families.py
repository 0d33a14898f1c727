"""Hybrid and multimodal target families (Qwen3.5 dense / VLM / MoE, Qwen3-Next, Gemma 4 text / conditional, LFM2,
Nemotron-H): transformers checkpoints convert, load as mlx-lm models and give transformers' float32 logits."""

import inspect

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from mlx_dllm import DLLMError, convert, load
from mlx_dllm.configs import target_fields
from mlx_dllm.loading import check_target_architecture, fuse_experts

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
hybrid = pytest.importorskip("tests.reference.hybrid")

PROMPT = [5, 17, 42, 9, 3, 100, 64, 12, 200, 7, 33, 81]
PREFILL = 7
# float32 on both sides; the gated delta rule is where the two differ most (transformers' own chunked prefill and
# recurrent decode disagree by up to 1e-3 on the Qwen3-Next checkpoint), logits here reach about 7.
ATOL = 2e-4


@pytest.fixture(scope="module", params=list(hybrid.HYBRID_TARGETS))
def family(request, tmp_path_factory):
    """Each family built by transformers, converted and loaded once: its name, folders, model and reference logits."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    reference = hybrid.HYBRID_TARGETS[name](root / "hf")
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT], device=hybrid.DEVICE)).logits[0].float().cpu().numpy()
    convert(str(root / "hf"), str(root / "mlx"))
    model, tokenizer = load(str(root / "mlx"))
    return dict(name=name, hf=root / "hf", mlx=root / "mlx", model=model, tokenizer=tokenizer, logits=logits)


def test_one_forward_matches_transformers(family):
    logits = np.array(family["model"](mx.array([PROMPT]))[0])
    np.testing.assert_allclose(logits, family["logits"], rtol=0, atol=ATOL)


def test_cached_steps_match_transformers(family):
    model = family["model"]
    cache = make_prompt_cache(model)
    steps = [model(mx.array([PROMPT[:PREFILL]]), cache=cache)[0]]
    steps += [model(mx.array([[token]]), cache=cache)[0] for token in PROMPT[PREFILL:]]
    np.testing.assert_allclose(np.array(mx.concatenate(steps)), family["logits"], rtol=0, atol=ATOL)


def test_layers_mix_recurrent_and_attention(family):
    """Hybrids keep at least two recurrent states and one K/V cache; Gemma 4 mixes windowed with global K/V."""
    caches = family["model"].make_cache()
    kinds = [type(cache) for cache in caches]
    if family["name"].startswith("gemma4"):
        assert RotatingKVCache in kinds and KVCache in kinds
        assert all(cache.max_size == hybrid.WINDOW for cache in caches if isinstance(cache, RotatingKVCache))
    else:
        assert kinds.count(ArraysCache) >= 2 and KVCache in kinds
    if family["name"] in ("lfm2", "nemotron_h"):  # the first cache is not the recurrent one, the last is
        assert kinds[0] is KVCache and kinds[-1] is ArraysCache


def test_converted_folder_reads_back_in_transformers(family):
    """The converted config stays a transformers config (the tokenizer loader reads it through AutoConfig)."""
    from transformers import AutoConfig

    assert family["tokenizer"] is not None
    AutoConfig.from_pretrained(family["mlx"])


def test_legacy_rope_copies_go_only_to_families_that_read_them():
    """Gemma 4 reads `rope_parameters` itself; a flat `rope_scaling` of type "proportional" without `rope_theta`
    is what transformers cannot read back from the converted config. Gemma 3 still gets its copies."""
    from mlx_lm.models import gemma3_text, gemma4_text

    hf_config = hybrid.gemma4_text_config().to_dict()
    assert hf_config["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    fields = target_fields(hf_config, inspect.signature(gemma4_text.ModelArgs).parameters)
    assert not {"rope_scaling", "rope_theta", "rope_local_base_freq"} & set(fields)
    gemma3 = {"model_type": "gemma3_text", "rope_parameters": hybrid.GEMMA4_ROPE}
    assert target_fields(gemma3, inspect.signature(gemma3_text.ModelArgs).parameters) == {
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": 0.25},
        "rope_local_base_freq": 1e4,
    }


def test_gemma4_global_head_dim_comes_from_per_layer_config():
    text = hybrid.gemma4_text_config().to_dict()
    assert "global_head_dim" not in text and text["per_layer_config"]
    assert target_fields(text, ["global_head_dim"]) == {"global_head_dim": 32}
    conditional = hybrid.gemma4_vlm_config().to_dict()
    fields = target_fields(conditional, ["text_config", "vocab_size"])
    assert fields["text_config"]["global_head_dim"] == 32
    assert fields["text_config"]["num_global_key_value_heads"] == 1
    assert fields["vocab_size"] == hybrid.VOCAB  # mlx-lm would otherwise impose its own on the text config


@pytest.mark.parametrize(
    "per_layer_config, message",
    [
        ({"2": {"head_dim": 32}, "4": {"head_dim": 64}}, "one override for every global layer"),
        ({"0": {"head_dim": 32}, "2": {"head_dim": 32}, "4": {"head_dim": 32}}, "one override for every global layer"),
        ({"2": {"num_key_value_heads": 2}, "4": {"num_key_value_heads": 2}}, "cannot override .'num_key_value_heads'"),
    ],
)
def test_gemma4_per_layer_overrides_mlx_lm_cannot_build_are_refused(per_layer_config, message):
    text = {**hybrid.gemma4_text_config().to_dict(), "per_layer_config": per_layer_config}
    with pytest.raises(DLLMError, match=message):
        target_fields(text, [])


def test_qwen3_5_text_model_types_are_known():
    """transformers 5 saves text-only Qwen3.5 checkpoints as `qwen3_5_text` / `qwen3_5_moe_text`."""
    for make_config in (hybrid.qwen3_5_text_config, hybrid.qwen3_5_moe_config):
        model_type = make_config().model_type
        assert model_type.endswith("_text")
        check_target_architecture({"model_type": model_type})


def test_qwen3_next_rope_fields_and_defaults():
    config = hybrid.qwen3_next_config().to_dict()
    assert "partial_rotary_factor" not in config and "rope_theta" not in config
    fields = target_fields(config, ["rope_theta", "partial_rotary_factor"])
    assert fields == {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "full_attention_interval": 3}
    bare = {"model_type": "qwen3_next", "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}
    assert target_fields(bare, []) == {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}  # transformers' default


def test_attention_interval_comes_from_layer_types():
    text = hybrid.qwen3_5_text_config().to_dict()
    assert "full_attention_interval" not in text
    assert target_fields(text, []) == {"full_attention_interval": 3}
    text["layer_types"] = ["full_attention"] + ["linear_attention"] * 2 + ["full_attention", "linear_attention"]
    with pytest.raises(DLLMError, match="attention every n-th layer"):
        target_fields(text, [])


def test_lfm2_block_dim_is_the_hidden_size():
    config = hybrid.lfm2_config().to_dict()
    assert "block_dim" not in config
    assert target_fields(config, ["rope_theta"]) == {"rope_theta": 10000.0, "block_dim": 64}


def test_per_expert_tensors_are_fused():
    gate, up, down = (mx.random.normal((2, 4, 3)) for _ in range(3))
    per_expert = {"gate": gate, "up": up, "down": down}
    weights = {f"m.mlp.experts.{e}.{kind}_proj.weight": w[e] for kind, w in per_expert.items() for e in range(2)}
    fused = fuse_experts({**weights, "m.mlp.gate.weight": gate[0]})
    assert sorted(fused) == ["m.mlp.experts.down_proj", "m.mlp.experts.gate_up_proj", "m.mlp.gate.weight"]
    np.testing.assert_array_equal(np.array(fused["m.mlp.experts.gate_up_proj"]), np.concatenate([gate, up], axis=1))
    np.testing.assert_array_equal(np.array(fused["m.mlp.experts.down_proj"]), np.array(down))

