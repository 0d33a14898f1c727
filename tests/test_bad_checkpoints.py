"""Bad checkpoints: each is one DLLMError from `load`, one `Error:` line (exit 1) from `generate` and `convert`, and
`convert` leaves no output folder. Tiny random checkpoints of each family, edited into their bad forms."""

import json
import re
import shutil
from pathlib import Path

import pytest

from mlx_dllm import DLLMError, load
from mlx_dllm.benchmark.tiny import build_tiny
from tests.test_cli import assert_user_error, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> its tiny checkpoint folder ("target" and "draft" for the DFlash pair)."""
    root = tmp_path_factory.mktemp("tiny")
    target, draft = build_tiny("dflash", root / "dflash")
    folders = {"target": target, "draft": draft}
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
    assert result.exit_code == 1 and not out.exists()
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
