"""Config files read defensively, sizes checked before building, and transformers-5 RoPE honoured by mlx-lm targets."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load
from mlx_dllm.configs import check_layer_count, check_sizes, read_json, rope_fields


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "must hold a JSON object, not list"),
        ('"text"', "must hold a JSON object, not str"),
        (b'{"a": "\xff\xfe"}', "is not UTF-8 text"),
        ("{" * 10 + "}" * 10, "is not valid JSON"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ],
)
def test_bad_json_files_are_one_error(tmp_path, content, message):
    with pytest.raises(DLLMError, match=message):
        read_json(write(tmp_path / "config.json", content))


def test_a_fifo_config_is_refused_not_read_forever(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(DLLMError, match="is not a regular file"):
        read_json(tmp_path / "config.json")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 0}, "hidden_size must be between 1 and"),
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
        ({"num_attention_heads": 4.0}, "num_attention_heads must be an integer"),
        ({"vocab_size": True}, "vocab_size must be an integer"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers must be between 1 and 1024"),
        ({"text_config": {"head_dim": -1}}, "text_config: head_dim must be between 1"),
        ({"dflash_config": {"block_size": "16"}}, "dflash_config: block_size must be an integer"),
        ({"dflash_config": {"target_layer_ids": [1, "2"]}}, "target_layer_ids must be a non-negative integer"),
        ({"mask_token_id": -5}, "mask_token_id must be a non-negative integer"),
    ],
)
def test_sizes_are_checked(changes, message):
    with pytest.raises(DLLMError, match=message):
        check_sizes({"hidden_size": 64, "num_attention_heads": 4, **changes})


def test_more_layers_than_the_weights_hold_is_refused():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight"]
    check_layer_count({"num_hidden_layers": 4}, names)
    with pytest.raises(DLLMError, match="num_hidden_layers=900, but the weights hold 4 layers"):
        check_layer_count({"num_hidden_layers": 900}, names)


def edited(source, destination, **changes):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 1000}, "the weights hold 4 layers"),
        ({"hidden_size": 0}, "hidden_size must be between 1"),
        ({"intermediate_size": "128"}, "intermediate_size must be an integer"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be a non-negative integer"),
        ({"eos_token_id": [1, 2.5]}, "eos_token_id must be a non-negative integer"),
    ],
)
def test_load_refuses_bad_configs_in_one_line(mlx_checkpoints, tmp_path, changes, message):
    folder = edited(mlx_checkpoints["qwen3_gqa"]["target"], tmp_path / "m", **changes)
    with pytest.raises(DLLMError, match=message):
        load(str(folder))


def test_generation_config_eos_of_the_wrong_type_is_refused(mlx_checkpoints, tmp_path):
    folder = shutil.copytree(mlx_checkpoints["qwen3_gqa"]["target"], tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": {"id": 1}}))
    with pytest.raises(DLLMError, match="generation_config.json: eos_token_id"):
        load(str(folder))


def test_rope_fields_from_transformers_5_configs():
    assert rope_fields({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}) == {"rope_theta": 1e5}
    yarn = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}
    assert rope_fields({"rope_parameters": yarn}) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    per_type = {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 1e6}}
    assert rope_fields({"rope_parameters": per_type}) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert rope_fields({"rope_theta": 3.0, "rope_parameters": {"rope_theta": 1e5}}) == {}  # legacy fields win


ROPES = {
    "theta_1e5": {"rope_type": "default", "rope_theta": 100000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0},
}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_transformers_5_rope_matches_the_reference(tmp_path, family, rope):
    """A checkpoint saved by transformers 5 keeps RoPE only in rope_parameters; logits must match transformers."""
    torch = pytest.importorskip("torch")
    import transformers

    from tests.reference.harness import save_tokenizer

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_class(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters=dict(ROPES[rope]),
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = model_class(config).eval()
    reference.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 255, size=48)]  # past original_max_position
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    model, _ = load(str(tmp_path))
    logits = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert np.abs(logits - expected).max() < 1e-4
