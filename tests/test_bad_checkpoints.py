"""Bad checkpoints: each is one DLLMError from `load`, one `Error:` line (exit 1) from `generate` and `convert`, and
`convert` leaves no output folder. Tiny random checkpoints of each family, edited into their bad forms."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load, stream_generate
from mlx_dllm.benchmark.tiny import build_tiny
from tests.test_cli import assert_user_error, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> its tiny checkpoint folder ("target" and "draft" for the DFlash pair)."""
    root = tmp_path_factory.mktemp("tiny")
    target, draft = build_tiny("dflash", root / "dflash")
    folders = {"target": target, "draft": draft, "dflash2": build_tiny("dflash2", root / "dflash2")[1]}
    for family in ("diffusion-gemma", "nemotron"):
        folders[family] = build_tiny(family, root)[0]
    return folders


def bad_copy(source: Path, tmp_path: Path, config=None, text_config=None, generation=None) -> Path:
    """A copy of `source` with config.json (and its text_config) updated and generation_config.json replaced."""
    folder = shutil.copytree(source, tmp_path / "bad")
    content = json.loads((folder / "config.json").read_text())
    content.update(config or {})
    if text_config is not None:
        content["text_config"].update(text_config)
    (folder / "config.json").write_text(json.dumps(content))
    if generation is not None:
        (folder / "generation_config.json").write_text(generation)
    return folder


def assert_refused(folder: Path, tmp_path: Path, message: str, generate_with=None) -> None:
    """`load`, `convert` and `generate` each refuse `folder` in one line holding `message`; a drafter is generated
    with `generate_with`, the target it drafts for."""
    with pytest.raises(DLLMError, match=re.escape(message)) as error:
        load(str(folder))
    assert "\n" not in str(error.value)
    out = tmp_path / "out"
    result = run("convert", "--hf-path", folder, "--mlx-path", out)
    assert_user_error(result, message)
    assert result.exit_code == 1 and not out.exists() and not list(tmp_path.glob(".out.*"))  # no staging left
    models = ["--model", folder] if generate_with is None else ["--model", generate_with, "--draft-model", folder]
    result = run("generate", *models, "-p", "hi", "-m", 2)
    assert_user_error(result, message)
    assert result.exit_code == 1


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": ["qwen3"]}, "config.json: model_type must be a name, got ['qwen3']"),
        ({"architectures": [123]}, "config.json: architectures must be a list of names, got [123]"),
        ({"architectures": "Qwen3ForCausalLM"}, "architectures must be a list of names, got 'Qwen3ForCausalLM'"),
    ],
)
def test_names_of_the_wrong_type_are_refused(tiny, tmp_path, config, message):
    assert_refused(bad_copy(tiny["target"], tmp_path, config), tmp_path, message)


def test_a_nested_model_type_of_the_wrong_type_is_refused(tiny, tmp_path):
    folder = bad_copy(tiny["diffusion-gemma"], tmp_path, text_config={"model_type": {"a": 1}})
    assert_refused(folder, tmp_path, "config.json text_config: model_type must be a name")


def test_more_experts_per_token_than_experts_is_refused(tiny, tmp_path):
    folder = bad_copy(tiny["diffusion-gemma"], tmp_path, text_config={"top_k_experts": 8})
    assert_refused(folder, tmp_path, "config.json text_config: top_k_experts (8) exceeds num_experts (4)")


@pytest.mark.parametrize(
    "generation, message",
    [
        ("[1, 2]", "generation_config.json must hold a JSON object, not list"),
        ('"text"', "generation_config.json must hold a JSON object, not str"),
        ('{"eos_token_id": "x"}', "generation_config.json: eos_token_id must be a non-negative integer"),
        ('{"eos_token_id": ["a", "b"]}', "generation_config.json: eos_token_id must be a non-negative integer"),
    ],
)
def test_a_bad_generation_config_of_an_mlx_lm_target_is_refused_before_mlx_lm_reads_it(
    tiny, tmp_path, generation, message
):
    assert_refused(bad_copy(tiny["target"], tmp_path, generation=generation), tmp_path, message)


@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
def test_a_rope_field_that_is_not_an_object_is_refused(tiny, tmp_path, field):
    folder = bad_copy(tiny["target"], tmp_path, {field: "linear"})
    assert_refused(folder, tmp_path, f"config.json: {field} must be an object, got 'linear'")


def test_an_attribute_error_while_building_the_model_is_one_line(tiny, tmp_path):
    folder = bad_copy(tiny["diffusion-gemma"], tmp_path, text_config={"per_layer_config": {"1": 5}})
    assert_refused(folder, tmp_path, "'int' object has no attribute 'get'")


def test_the_dflash_converter_refuses_a_drafter_it_cannot_build_in_one_line(tiny, tmp_path):
    folder = bad_copy(tiny["draft"], tmp_path, {"rope_scaling": {"rope_type": "bogus", "factor": 2.0}})
    assert_refused(folder, tmp_path, "Unsupported RoPE type bogus", generate_with=tiny["target"])


def test_diffusion_gemma_without_a_text_config_object_is_refused_by_name(tiny, tmp_path):
    folder = bad_copy(tiny["diffusion-gemma"], tmp_path, {"text_config": None})
    assert_refused(folder, tmp_path, "config.json: text_config must be an object, got None")
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_refused(folder, tmp_path, "DiffusionGemma config.json needs a text_config object, got None")


def relabel(folder: Path, name: str, dtype) -> Path:
    """The tensor `name` stored as `dtype` (its values cast), as a safetensors header that says I32 would load."""
    for file in folder.glob("model*.safetensors"):
        weights = mx.load(str(file))
        if name in weights:
            weights[name] = weights[name].astype(dtype)
            mx.save_safetensors(str(file), weights)
    return folder


@pytest.mark.parametrize(
    "family, name, dtype",
    [
        ("target", "model.layers.0.mlp.up_proj.weight", mx.int32),
        ("target", "model.norm.weight", mx.bool_),
        ("draft", "layers.1.mlp.up_proj.weight", mx.int32),
        ("diffusion-gemma", "model.decoder.layers.0.mlp.up_proj.weight", mx.int16),
        ("diffusion-gemma", "model.decoder.layers.1.experts.gate_up_proj.weight", mx.uint8),
        ("nemotron", "encoder.layers.0.self_attn.q_proj.weight", mx.int32),
    ],
)
def test_an_integer_tensor_for_a_float_parameter_is_refused(tiny, tmp_path, family, name, dtype):
    folder = relabel(shutil.copytree(tiny[family], tmp_path / "bad"), name, dtype)
    dtype_name = str(dtype).rpartition(".")[2]
    generate_with = tiny["target"] if family == "draft" else None
    assert_refused(folder, tmp_path, f" is {dtype_name}, where the model needs a float type", generate_with)
    with pytest.raises(DLLMError, match=re.escape(f"tensor {name}")):
        load(str(folder))


@pytest.mark.parametrize("family, options", [("target", ["-q"]), ("diffusion-gemma", ["--quant-recipe", "mixed"])])
def test_quantized_conversions_still_load_and_a_float_label_on_packed_weights_is_refused(
    tiny, tmp_path, family, options
):
    out = tmp_path / "quantized"
    result = run("convert", "--hf-path", tiny[family], "--mlx-path", out, *options, "--q-group-size", 32)
    assert result.exit_code == 0, result.output
    load(str(out))
    weights = {name: value for file in out.glob("model*.safetensors") for name, value in mx.load(str(file)).items()}
    packed = sorted(name for name, value in weights.items() if value.dtype == mx.uint32)[0]
    relabel(out, packed, mx.float32)
    message = f"tensor {packed} in {out} is float32, where the model needs uint32"
    with pytest.raises(DLLMError, match=re.escape(message)):
        load(str(out))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"vocab_size": 256, "mask_token_id": 300}, "mask_token_id must be a token id below vocab_size 256, got 300"),
        ({"mask_token_id": -1}, "mask_token_id must be a non-negative integer"),
        ({"dflash_config": {"mask_token_id": 2.5}}, "mask_token_id must be a non-negative integer"),
        ({"target_layer_ids": [2, 1, 1]}, "target_layer_ids must be distinct layer ids, got [2, 1, 1]"),
        ({"dflash_config": {"target_layer_ids": [1, 1]}}, "target_layer_ids must be distinct layer ids"),
        ({"target_layer_ids": 3}, "target_layer_ids must be distinct layer ids, got 3"),
        ({"num_target_layers": 4, "target_layer_ids": [1, 4]}, "layer ids below num_target_layers 4, got [1, 4]"),
        ({"dflash_config": {"num_target_layers": 2}}, "layer ids below num_target_layers 2, got [0, 1, 2]"),
        ({"target_layer_ids": [-1, 0]}, "target_layer_ids must be a non-negative integer"),
        ({"target_layer_ids": [0, "1"]}, "target_layer_ids must be a non-negative integer"),
        ({"vocab_size": 256, "dflash_config": {"draft_vocab": [3, 300]}}, "token ids below vocab_size 256"),
        ({"layer_types": ["weird_attention", "full_attention"]}, "layer type 'weird_attention' is not supported"),
        ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}}}, "RoPE per layer type (full_attention)"),
        ({"block_size": 1}, "DFlash block_size must be at least 2"),
    ],
)
def test_a_drafter_that_would_draft_garbage_is_refused(tiny, tmp_path, config, message):
    assert_refused(bad_copy(tiny["draft"], tmp_path, config), tmp_path, message, generate_with=tiny["target"])


def test_a_dflash2_drafter_that_would_draft_garbage_is_refused(tiny, tmp_path):
    """Its convolution groups must tile the hidden size, and its codebooks must have the rank its config says (z-lab's
    layout: bare codebook tensors, no `.weight`)."""
    config = json.loads((tiny["dflash2"] / "config.json").read_text())
    bad = bad_copy(tiny["dflash2"], tmp_path, {"dflash_config": {**config["dflash_config"], "conv_group_size": 24}})
    assert_refused(bad, tmp_path, "conv_group_size 24 does not divide hidden_size 64", generate_with=tiny["target"])
    shutil.rmtree(bad)
    bad = shutil.copytree(tiny["dflash2"], tmp_path / "bad")
    weights = mx.load(str(bad / "model.safetensors"))
    for name in ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook"):
        weights[name] = weights.pop(f"{name}.weight")
    weights["candidate_selector.successor_codebook"] = weights["candidate_selector.successor_codebook"][:, :6]
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    assert_refused(bad, tmp_path, "candidate_selector.successor_codebook.weight", generate_with=tiny["target"])


@pytest.mark.parametrize(
    "text_config, message",
    [
        ({"layer_types": ["weird_attention", "full_attention"] * 2}, "layer type 'weird_attention' is not supported"),
        ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, "'rope_type': 'bogus'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "must hold one RoPE per layer type"),
        ({"rope_parameters": {"full_attention": {"rope_type": "bogus", "rope_theta": 1e4}}},
         "rope_type 'bogus' is not supported"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "x": {}},
                              "weird_attention": {}}}, "must hold one RoPE per layer type"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "default"}}}, "needs a positive rope_theta, got None"),
        ({"rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                                 "partial_rotary_factor": 2}}}, "partial_rotary_factor must be in"),
    ],
)
def test_diffusion_gemma_layer_and_rope_kinds_it_cannot_run_are_refused_by_name(tiny, tmp_path, text_config, message):
    assert_refused(bad_copy(tiny["diffusion-gemma"], tmp_path, text_config=text_config), tmp_path, message)


@pytest.mark.parametrize(
    "block_size, message",
    [
        (1, "Nemotron-Labs-Diffusion block_size must be an integer of at least 2, got 1"),
        (0, "block_size must be between 1 and 4096, got 0"),
        ("4", "block_size must be an integer, got '4'"),
    ],
)
def test_a_nemotron_block_size_below_two_is_refused(tiny, tmp_path, block_size, message):
    assert_refused(bad_copy(tiny["nemotron"], tmp_path, {"block_size": block_size}), tmp_path, message)


def test_the_trainer_writes_only_target_layers_the_loader_reads():
    from mlx_dllm.training.drafter_config import check_target_layers

    assert check_target_layers([1, 3], 4) == [1, 3]
    assert check_target_layers([3, 1], 4) == [3, 1]  # features concatenate in this order, as the reference's do
    with pytest.raises(DLLMError, match="--target-layers lists a layer twice"):
        check_target_layers([1, 1], 4)


@pytest.mark.parametrize(
    "family, config, text_config, message",
    [
        ("target", {"num_key_value_heads": 3}, None, "is not a multiple of num_key_value_heads (3)"),
        ("nemotron", {"num_key_value_heads": 3}, None, "is not a multiple of num_key_value_heads (3)"),
        ("diffusion-gemma", None, {"num_global_key_value_heads": 3}, "text_config: num_attention_heads (4) is not a"),
    ],
)
def test_query_heads_that_kv_heads_cannot_group_are_refused(tiny, tmp_path, family, config, text_config, message):
    assert_refused(bad_copy(tiny[family], tmp_path, config, text_config), tmp_path, message)


def test_an_integer_lora_adapter_is_refused(tiny, tmp_path):
    folder = shutil.copytree(tiny["nemotron"], tmp_path / "bad")
    adapter = folder / "linear_spec_lora" / "adapter_model.safetensors"
    weights = mx.load(str(adapter))
    name = sorted(weights)[0]
    weights[name] = weights[name].astype(mx.int32)
    mx.save_safetensors(str(adapter), weights)
    assert_refused(folder, tmp_path, "layer 0 holds int32 tensors, not floats")


@pytest.mark.parametrize("kind", ["I32", "F64"])
def test_a_gguf_tensor_of_a_type_that_is_no_weight_is_one_error(tmp_path, kind):
    gguf = pytest.importorskip("gguf")
    from mlx_dllm.convert.gguf import open_gguf, read_tensor

    file = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    dtype = {"I32": "int32", "F64": "float64"}[kind]
    writer.add_tensor("blk.0.attn_v.weight", np.ones((4, 32), dtype=dtype), raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DLLMError, match=f"GGUF tensor blk.0.attn_v.weight of type {kind} is not a weight we can read"):
        read_tensor(open_gguf(file).tensors[0])


def test_a_drafter_reading_target_layers_in_any_order_loads_and_drafts(tiny, tmp_path):
    """The reference concatenates the target's features in the config's order: an unsorted list is valid."""
    folder = bad_copy(tiny["draft"], tmp_path, {"target_layer_ids": [2, 0, 1]})
    target, tokenizer = load(str(tiny["target"]))
    draft = load(str(folder))[0]
    assert draft.target_layer_ids == [2, 0, 1]
    assert list(stream_generate(target, tokenizer, [5, 6, 7], 4, draft_model=draft))[-1].generation_tokens == 4
