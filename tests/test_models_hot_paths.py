"""Model-level correctness and Mac hot paths: config checks, feature capture, dtypes, cache reads, MoE gathers."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load
from mlx_dllm.models import diffusion_gemma

torch = pytest.importorskip("torch")
dg_ref = pytest.importorskip("tests.reference.diffusion_gemma")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion_gemma")
    dg_ref.build_model(folder)
    return folder


def _gemma_config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("canvas_length", [10**9, 0, -3, 8.0, "8", True, None])
def test_canvas_length_out_of_range_is_refused_before_mlx(gemma_folder, canvas_length):
    config = _gemma_config(gemma_folder)
    config["canvas_length"] = canvas_length
    with pytest.raises(DLLMError, match="canvas_length must be an integer from 1 to 4096"):
        diffusion_gemma.ModelArgs.from_dict(config)


def test_largest_canvas_length_is_accepted(gemma_folder):
    config = _gemma_config(gemma_folder)
    config["canvas_length"] = diffusion_gemma.MAX_CANVAS_LENGTH
    assert diffusion_gemma.ModelArgs.from_dict(config).canvas_length == 4096


@pytest.mark.parametrize(
    "knob, value",
    [
        ("entropy_bound", "0.1"),
        ("max_denoising_steps", "abc"),
        ("max_denoising_steps", 48.0),
        ("stability_threshold", True),
        ("t_min", [0.4]),
        ("confidence_threshold", {"value": 0.005}),
        ("t_max", float("inf")),
        ("t_min", float("nan")),
        ("entropy_bound", float("nan")),
        ("confidence_threshold", float("nan")),
    ],
)
def test_diffusion_knob_of_the_wrong_kind_is_named(knob, value):
    from mlx_dllm.sampler.diffusion import DiffusionSettings

    with pytest.raises(DLLMError, match=f"diffusion option {knob} must be"):
        DiffusionSettings.resolve({"sampler_config": {knob: value}}, {})
    with pytest.raises(DLLMError, match=f"diffusion option {knob} must be"):
        DiffusionSettings.resolve(None, {knob: value})


def test_cli_t_max_inf_is_one_error_line(gemma_folder):
    from click.testing import CliRunner

    from mlx_dllm.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", str(gemma_folder), "-p", "w5", "--t-max", "inf"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == "Error: diffusion option t_max must be a finite number, got inf"
