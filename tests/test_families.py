"""Families are declared once, by their model files: the loader, the converter and `benchmark --tiny` read them."""

import pytest
from click.testing import CliRunner

from mlx_dllm import blas, loading
from mlx_dllm.benchmark import tiny
from mlx_dllm.cli import main
from mlx_dllm.convert import recipe_for
from mlx_dllm.models import dflash, dflash2, diffusion_gemma, nemotron_diffusion
from mlx_dllm.models.drafter import is_drafter
from mlx_dllm.models.family import families, model_file, model_files

FAMILY_FILES = {
    "dflash": dflash, "dflash2": dflash2, "diffusion-gemma": diffusion_gemma, "nemotron": nemotron_diffusion
}
RECIPES = {"dflash": "dflash", "dflash2": "dflash2", "diffusion-gemma": "diffusion_gemma", "nemotron": "own_model"}


def test_each_model_file_declares_its_family_and_the_registry_finds_it():
    assert model_files() == tuple(FAMILY_FILES.values())
    assert [family.name for family in families()] == list(FAMILY_FILES)
    for name, module in FAMILY_FILES.items():
        assert module.FAMILY.name == name and module.FAMILY.tiny is not None


@pytest.mark.parametrize(
    "config, module",
    [
        ({"architectures": ["DFlashDraftModel"], "model_type": "qwen3"}, dflash),  # a drafter says its target's type
        ({"model_type": "qwen3", "dflash_config": {}}, dflash),
        ({"architectures": ["MuseGlimmerAssistantModel"]}, dflash),
        ({"architectures": ["DFlash2DraftModel"], "model_type": "qwen3", "dflash_config": {}}, dflash2),  # v1's key too
        ({"model_type": "diffusion_gemma"}, diffusion_gemma),
        ({"architectures": ["NemotronLabsDiffusionModel"], "model_type": "diffusion_gemma"}, nemotron_diffusion),
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, None),
        ({"model_type": "dflash"}, None),  # never by model_type
    ],
)
def test_a_config_finds_its_model_file_by_architecture_key_then_model_type(config, module):
    assert model_file(config) is module


@pytest.mark.parametrize("name", list(FAMILY_FILES))
def test_each_family_converts_through_its_recipe_file_or_the_generic_one(name):
    assert recipe_for(FAMILY_FILES[name].FAMILY.tiny.config).__name__ == f"mlx_dllm.convert.{RECIPES[name]}"
    assert recipe_for({"model_type": "qwen3"}).__name__ == "mlx_dllm.convert.target"


@pytest.mark.parametrize("name", list(FAMILY_FILES))
def test_loading_picks_each_tiny_checkpoints_class(name, tmp_path):
    model_path, draft_path = tiny.build_tiny(name, tmp_path)
    model, tokenizer = loading.load(str(model_path))
    if draft_path is None:
        assert type(model) is FAMILY_FILES[name].Model and tokenizer is not None
        return
    draft, draft_tokenizer = loading.load(str(draft_path))
    assert type(draft) is FAMILY_FILES[name].Model and is_drafter(draft) and draft_tokenizer is None
    assert type(model).__module__ == "mlx_lm.models.qwen3" and not is_drafter(model)


def test_an_unknown_tiny_family_is_one_line_listing_the_registered_ones(monkeypatch):
    monkeypatch.setenv(blas.REEXEC_GUARD, "1")
    result = CliRunner().invoke(main, ["benchmark", "--tiny", "llama"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    names = ", ".join(family.name for family in families())
    assert result.stderr.strip().splitlines() == [f"Error: unknown tiny family 'llama' (choose from {names})"]
