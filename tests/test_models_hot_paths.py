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
