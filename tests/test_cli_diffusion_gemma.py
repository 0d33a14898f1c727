"""`mlx-dllm generate` on a DiffusionGemma checkpoint: diffusion mode by itself, its flags, --visualize."""

import pytest

from tests.test_cli import assert_user_error, run

ref = pytest.importorskip("tests.reference.diffusion_gemma")

KNOBS = ["--max-denoising-steps", 6, "--entropy-bound", 0.5, "--stability-threshold", 0, "--confidence-threshold", 1.3]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dg_cli")
    ref.build_model(root / "hf")
    result = run("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    assert result.exit_code == 0, result.output
    return root / "mlx"


def test_generate_picks_diffusion_and_prints_its_stats(converted):
    result = run("generate", "--model", converted, "-p", "w5 w9 w33", "-m", 12, "--seed", 0, *KNOBS)
    assert result.exit_code == 0, result.output
    stats = result.stdout.strip().splitlines()[-1]
    assert stats.startswith("Mode: diffusion, forwards: ") and "draft forwards: 0" in stats
    assert "tokens per forward: " in stats and "Generation: " in result.stdout


def test_visualize_redraws_the_canvas(converted):
    result = run("generate", "--model", converted, "-p", "w5 w9", "-m", 8, "--seed", 1, "--visualize", *KNOBS)
    assert result.exit_code == 0, result.output
    assert "[canvas 1 step 1, mean entropy" in result.stdout
    assert result.stdout.count("\x1b8\x1b[J") >= 1  # each redraw erases the previous one
    assert "\x1b[1;32m" in result.stdout  # accepted tokens are highlighted


def test_image_input_is_refused(converted):
    assert_user_error(
        run("generate", "--model", converted, "-p", "hi", "--image", "cat.png"), "image input is not supported yet"
    )


def test_bad_denoising_flag(converted):
    result = run("generate", "--model", converted, "-p", "hi", "--entropy-bound", 0)
    assert_user_error(result, "entropy_bound must be > 0")


def test_diffusion_flags_on_an_ar_model(hf_checkpoints):
    result = run("generate", "--model", hf_checkpoints["qwen3_gqa"]["target"], "-p", "w5", "--max-denoising-steps", 4)
    assert_user_error(result, "unknown option max_denoising_steps for mode ar")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": None, "top_k_experts": None}, "missing the expert fields num_experts, top_k_experts"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all' is not supported"),
    ],
)
def test_config_errors_write_nothing(converted, tmp_path, change, message):
    import json
    import shutil

    source = shutil.copytree(converted.parent / "hf", tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config["text_config"].update(change)
    config["text_config"] = {k: v for k, v in config["text_config"].items() if v is not None}
    (source / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    assert_user_error(run("convert", "--hf-path", source, "--mlx-path", tmp_path / "out" / "mlx"), message)
    assert list((tmp_path / "out").iterdir()) == []
    assert_user_error(run("generate", "--model", source, "-p", "hi"), message)
