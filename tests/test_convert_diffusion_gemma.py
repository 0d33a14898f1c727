"""DiffusionGemma conversion: streamed shard by shard, mlx-community names, uniform and mixed quantization."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import quantize_model

import mlx_dllm
from mlx_dllm.cli import main
from mlx_dllm.convert import convert
from mlx_dllm.convert.diffusion_gemma import is_eight_bit
from mlx_dllm.errors import DLLMError
from mlx_dllm.checkpoint_files import read_weights
from mlx_dllm.models.diffusion_gemma import VISION_PREFIXES

pytest.importorskip("torch")
ref = pytest.importorskip("tests.reference.diffusion_gemma")
harness = pytest.importorskip("tests.reference.harness")

PROMPT = [5, 17, 42, 9, 100, 3, 3, 250, 7, 64, 12]
CANVAS = [1, 2, 3, 4, 200, 6, 7, 8]
# Every quantizable input dim a multiple of 64, so that the 8-bit group of the mixed recipe applies everywhere.
WIDE = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64, head_dim=16, global_head_dim=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_gemma_hf")
    model = ref.build_model(root / "tiny")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")  # 20 shards of 8-33 KB
    harness.save_tokenizer(root / "sharded")
    ref.build_model(root / "wide", **WIDE)
    return {name: root / name for name in ("tiny", "sharded", "wide")}


def outputs(folder: Path) -> dict:
    files = sorted(folder.glob("model*.safetensors"))
    return {name: value for file in files for name, value in mx.load(str(file)).items()}


def logits(model, self_conditioning=None) -> mx.array:
    cache = model.make_cache()
    model.encode(mx.array([PROMPT]), cache)
    return model.denoise(mx.array([CANVAS]), cache, self_conditioning)


def quantized_modules(model) -> dict:
    return {
        path: (module.bits, module.group_size)
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }


def test_round_trip_is_exact(checkpoints, tmp_path):
    out = convert(checkpoints["sharded"], tmp_path / "mlx")
    converted, tokenizer = mlx_dllm.load(str(out))
    direct, _ = mlx_dllm.load(str(checkpoints["tiny"]))
    assert tokenizer is not None and (out / "generation_config.json").exists()
    first = logits(direct)
    assert mx.array_equal(logits(converted), first).item()
    assert mx.array_equal(logits(converted, first), logits(direct, first)).item()

    written = outputs(out)
    assert not any("rotary_emb" in name or name == "lm_head.weight" for name in written)
    assert "model.decoder.layers.0.experts.gate_up_proj.weight" in written
    assert "model.encoder.language_model.layers.3.layer_scalar" in written
    assert not any(name.startswith("model.encoder.language_model.") and "layer_scalar" not in name for name in written)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) == len(list(checkpoints["sharded"].glob("model-*.safetensors")))
    assert set(index["weight_map"]) == set(written) and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(value.nbytes for value in written.values())


def test_vision_tensors_are_carried_unchanged(checkpoints, tmp_path):
    out = convert(checkpoints["tiny"], tmp_path / "bf16", dtype="bfloat16")
    source, written = read_weights(checkpoints["tiny"]), outputs(out)
    vision = [name for name in source if name.startswith(VISION_PREFIXES)]
    assert len(vision) == 16
    for name in vision:
        assert written[name].dtype == source[name].dtype == mx.float32
        assert mx.array_equal(written[name], source[name]).item(), name
    assert written["model.decoder.embed_tokens.weight"].dtype == mx.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "gemma4_vision" and config["dtype"] == "bfloat16"
    model, _ = mlx_dllm.load(str(out))  # the loader sets the vision tensors aside
    assert logits(model).shape == (1, len(CANVAS), ref.VOCAB)


def test_quantize_alone_follows_mlx_defaults(checkpoints, tmp_path):
    out = convert(checkpoints["wide"], tmp_path / "q4", quantize=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    model, _ = mlx_dllm.load(str(out))
    expected, _ = quantize_model(mlx_dllm.load(str(checkpoints["wide"]))[0], {}, None, None)
    assert set(quantized_modules(model).values()) == {(4, 64)}
    assert quantized_modules(model) == quantized_modules(expected)
    loaded, reference = dict(tree_flatten(model.parameters())), dict(tree_flatten(expected.parameters()))
    assert sorted(loaded) == sorted(reference)
    assert all(mx.array_equal(loaded[name], reference[name]).item() for name in reference)
    assert mx.all(mx.isfinite(logits(model))).item()


def test_mixed_recipe(checkpoints, tmp_path):
    out = convert(checkpoints["wide"], tmp_path / "mixed", quant_recipe="mixed")  # the recipe implies -q
    config = json.loads((out / "config.json").read_text())["quantization"]
    overrides = {path: params for path, params in config.items() if isinstance(params, dict)}
    assert (config["group_size"], config["bits"], config["mode"]) == (64, 4, "affine")
    # embed_tokens + per layer q, k, o, mlp x3, router (+ v on the two sliding layers): 1 + 4 * 7 + 2
    assert len(overrides) == 31 and set(map(json.dumps, overrides.values())) == {'{"group_size": 64, "bits": 8}'}
    assert "model.decoder.embed_tokens" in overrides and "model.decoder.layers.2.router.proj" in overrides
    model, _ = mlx_dllm.load(str(out))
    modules = quantized_modules(model)
    assert modules["model.decoder.embed_tokens"] == modules["model.decoder.layers.0.self_attn.v_proj"] == (8, 64)
    assert modules["model.decoder.layers.1.mlp.down_proj"] == modules["model.decoder.layers.1.router.proj"] == (8, 64)
    assert modules["model.decoder.layers.1.experts.gate_up_proj"] == (4, 64)
    assert modules["model.decoder.self_conditioning.down_proj"] == (4, 64)
    assert len(modules) == 31 + 4 * 2 + 3  # every Linear, Embedding and SwitchLinear

    def predicate(path, module):
        return {"group_size": 64, "bits": 8} if is_eight_bit(path) else True

    float_model, _ = mlx_dllm.load(str(checkpoints["wide"]))
    expected, expected_config = quantize_model(float_model, {}, 64, 4, quant_predicate=predicate)
    assert config == expected_config["quantization"]
    loaded, reference = dict(tree_flatten(model.parameters())), dict(tree_flatten(expected.parameters()))
    assert all(mx.array_equal(loaded[name], reference[name]).item() for name in reference)
    first = logits(model)
    assert mx.all(mx.isfinite(logits(model, first))).item()


def truncate(folder: Path) -> str:
    shard = folder / "model-00003-of-00020.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return r"cannot read model-00003-of-00020\.safetensors: .*incomplete download"


def drop_shard(folder: Path) -> str:
    (folder / "model-00020-of-00020.safetensors").unlink()
    return r"index\.json names model-00020-of-00020\.safetensors, which is missing"


def reshape(folder: Path) -> str:
    name = "model.decoder.layers.1.experts.down_proj"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    weights = mx.load(str(shard))
    weights[name] = weights[name][:, :, :8]
    mx.save_safetensors(str(shard), weights)
    return rf"tensor {name}\.weight has shape \(4, 32, 8\), the model expects \(4, 32, 16\)"


def nan_weight(folder: Path) -> str:
    name = "model.decoder.layers.1.experts.down_proj"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    weights = mx.load(str(shard))
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 5, mx.nan, weights[name])
    mx.save_safetensors(str(shard), weights)
    return rf"tensor {name}\.weight in {shard.name} holds NaN or Inf"


@pytest.mark.parametrize("damage", [truncate, drop_shard, reshape, nan_weight])
def test_damaged_checkpoint_writes_nothing(checkpoints, tmp_path, damage):
    source = shutil.copytree(checkpoints["sharded"], tmp_path / "source")
    pattern = damage(source)
    (tmp_path / "out").mkdir()
    with pytest.raises(DLLMError, match=pattern) as error:
        convert(source, tmp_path / "out" / "model")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_requests_are_refused(checkpoints, tmp_path):
    with pytest.raises(DLLMError, match="unknown quantization recipe 'q2k'"):
        convert(checkpoints["tiny"], tmp_path / "a", quant_recipe="q2k")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(DLLMError, match="mixed quantization recipe is for DiffusionGemma checkpoints only"):
        convert(tmp_path / "qwen", tmp_path / "b", quant_recipe="mixed")
    with pytest.raises(DLLMError, match="cannot quantize: .*bits 7 is not supported"):
        convert(checkpoints["tiny"], tmp_path / "c", quantize=True, q_bits=7)
    quantized = convert(checkpoints["wide"], tmp_path / "d", quantize=True)
    with pytest.raises(DLLMError, match="already quantized"):
        convert(quantized, tmp_path / "e")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d", "qwen"]


def test_peak_memory_stays_near_one_shard(checkpoints, tmp_path):
    """MLX's peak memory while converting 20 shards stays under 3x the largest, which loading them all exceeds."""
    source = checkpoints["sharded"]
    sizes = [file.stat().st_size for file in source.glob("model-*.safetensors")]

    def peak(action) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        action()
        return mx.get_peak_memory() - before

    streamed = peak(lambda: convert(source, tmp_path / "out", quantize=True, q_group_size=32))
    everything = peak(lambda: mx.eval(list(read_weights(source).values())))
    assert len(sizes) >= 8 and everything > 0.8 * sum(sizes)
    assert streamed < 3 * max(sizes) < everything, (streamed, max(sizes), everything)


def test_cli_mixed_recipe(checkpoints, tmp_path):
    args = ["convert", "--hf-path", str(checkpoints["wide"]), "--mlx-path", str(tmp_path / "mixed")]
    result = CliRunner().invoke(main, args + ["-q", "--quant-recipe", "mixed", "--q-bits", "3"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization"]
    assert config["bits"] == 3 and config["model.decoder.embed_tokens"] == {"group_size": 64, "bits": 8}
    model, _ = mlx_dllm.load(str(tmp_path / "mixed"))
    assert quantized_modules(model)["model.decoder.layers.3.experts.down_proj"] == (3, 64)
    result = CliRunner().invoke(main, args + ["--quant-recipe", "q2k"])
    assert result.exit_code == 2 and "Invalid value for '--quant-recipe'" in result.stderr
