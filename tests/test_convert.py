"""convert writes what load reads: exact weights, same logits, quantized and bf16 variants, shards, staging."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.utils
import pytest
from mlx.utils import tree_flatten

import mlx_dllm
from mlx_dllm.convert import common as convert_common
from mlx_dllm.convert import convert
from mlx_dllm.errors import DLLMError
from mlx_dllm.models.dflash import Model as DFlashDraft

PROMPT = mx.array([[5, 17, 42, 9, 100, 3, 3, 250, 7, 64, 12, 33]])


def parameters(model: nn.Module) -> dict:
    return dict(tree_flatten(model.parameters()))


def folder_entries(folder: Path) -> list:
    return sorted(path.name for path in folder.iterdir())


def test_draft_round_trip_is_exact(hf_checkpoints, tmp_path):
    source = hf_checkpoints["qwen3_gqa"]["draft"]
    convert(source, tmp_path / "draft")
    model, tokenizer = mlx_dllm.load(str(tmp_path / "draft"))
    assert isinstance(model, DFlashDraft) and tokenizer is None
    expected = DFlashDraft.sanitize(mx.load(str(source / "model.safetensors")))
    loaded = parameters(model)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == mx.float32
        assert mx.array_equal(loaded[name], value).item(), name
    written = json.loads((tmp_path / "draft" / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    for key in ("architectures", "block_size", "mask_token_id", "target_layer_ids", "layer_types"):
        assert written[key] == original[key]


@pytest.mark.parametrize("name", ["qwen3_gqa", "ministral_sliding"])
def test_target_logits_match_the_hf_folder(hf_checkpoints, tmp_path, name):
    source = hf_checkpoints[name]["target"]
    convert(source, tmp_path / "target")
    converted, tokenizer = mlx_dllm.load(str(tmp_path / "target"))
    direct, _ = mlx_dllm.load(str(source))
    assert tokenizer is not None and (tmp_path / "target" / "tokenizer.json").exists()
    assert (tmp_path / "target" / "generation_config.json").exists()
    assert mx.array_equal(converted(PROMPT), direct(PROMPT)).item()
    assert json.loads((tmp_path / "target" / "config.json").read_text())["model_type"] == name.split("_")[0]


@pytest.mark.parametrize("role", ["target", "draft"])
def test_quantized_output_loads(hf_checkpoints, tmp_path, role):
    convert(hf_checkpoints["qwen3_gqa"][role], tmp_path / "q", quantize=True, q_group_size=32, q_bits=4)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    model, _ = mlx_dllm.load(str(tmp_path / "q"))
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == 4 and m.group_size == 32 for m in quantized)


def test_bfloat16_output(hf_checkpoints, tmp_path):
    convert(hf_checkpoints["ministral_sliding"]["target"], tmp_path / "bf16", dtype="bfloat16")
    model, _ = mlx_dllm.load(str(tmp_path / "bf16"))
    assert {value.dtype for value in parameters(model).values()} == {mx.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_loads(hf_checkpoints, tmp_path, monkeypatch):
    make_shards = mlx_lm.utils.make_shards
    monkeypatch.setattr(mlx_lm.utils, "make_shards", lambda weights, max_file_size_gb=0: make_shards(weights, 0))
    source = hf_checkpoints["qwen3_gqa"]["draft"]
    convert(source, tmp_path / "sharded")
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    model, _ = mlx_dllm.load(str(tmp_path / "sharded"))
    expected = DFlashDraft.sanitize(mx.load(str(source / "model.safetensors")))
    assert all(mx.array_equal(parameters(model)[name], value).item() for name, value in expected.items())


def test_force_replaces_only_a_previous_conversion(hf_checkpoints, tmp_path):
    out = tmp_path / "out" / "model"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    with pytest.raises(DLLMError, match="already exists"):
        convert(hf_checkpoints["qwen3_gqa"]["draft"], out)
    with pytest.raises(DLLMError, match="not an mlx-dllm conversion"):
        convert(hf_checkpoints["qwen3_gqa"]["draft"], out, force=True)
    assert folder_entries(out) == ["stale.txt"]
    (out / "stale.txt").unlink()
    convert(hf_checkpoints["qwen3_gqa"]["target"], out)
    convert(hf_checkpoints["qwen3_gqa"]["draft"], out, force=True)
    assert "tokenizer.json" not in folder_entries(out) and (out / "model.safetensors").exists()
    assert folder_entries(out.parent) == ["model"]


def test_interrupted_save_leaves_the_old_folder_and_no_temp(hf_checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out" / "model"
    convert(hf_checkpoints["qwen3_gqa"]["target"], out)
    before = folder_entries(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_common, "save_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_checkpoints["qwen3_gqa"]["draft"], out, force=True)
    assert folder_entries(out.parent) == ["model"] and folder_entries(out) == before
    with pytest.raises(KeyboardInterrupt):
        convert(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "fresh" / "model")
    assert folder_entries(tmp_path / "fresh") == []


def test_wrong_shape_names_the_tensor(hf_checkpoints, tmp_path):
    source = tmp_path / "draft"
    shutil.copytree(hf_checkpoints["qwen3_gqa"]["draft"], source)
    (tmp_path / "out").mkdir()
    weights = mx.load(str(source / "model.safetensors"))
    weights["layers.1.mlp.up_proj.weight"] = mx.zeros((97, 64))
    mx.save_safetensors(str(source / "model.safetensors"), weights)
    with pytest.raises(DLLMError, match=r"layers\.1\.mlp\.up_proj\.weight has shape \(97, 64\).*\(96, 64\)"):
        convert(source, tmp_path / "out" / "model")
    del weights["layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(source / "model.safetensors"), weights)
    with pytest.raises(DLLMError, match=r"lacks layers\.1\.mlp\.up_proj\.weight \(96, 64\)"):
        convert(source, tmp_path / "out" / "model")
    assert folder_entries(tmp_path / "out") == []


def test_module_stays_callable_after_submodule_import(hf_checkpoints, tmp_path):
    import mlx_dllm.convert  # rebinds the package attribute to the module

    assert mlx_dllm.convert(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "draft") == tmp_path / "draft"


def test_quiet_prints_no_info_lines(hf_checkpoints, tmp_path, capsys):
    convert(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "loud")
    assert "[INFO] Saved to" in capsys.readouterr().out
    convert(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "quiet", quiet=True)
    assert "[INFO]" not in capsys.readouterr().out
