"""Shared fixtures: tiny random HF checkpoints built by the transformers reference classes."""

import pytest


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> {"target": Path, "draft": Path, "target_model": torch model, "draft_model": torch model}."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.reference import harness

    root = tmp_path_factory.mktemp("hf")
    checkpoints = {}
    for name in harness.TARGETS:
        target = harness.build_target(name, root / name / "target")
        draft = harness.build_draft(target.config, root / name / "draft")
        checkpoints[name] = {
            "target": root / name / "target",
            "draft": root / name / "draft",
            "target_model": target,
            "draft_model": draft,
        }
    return checkpoints


@pytest.fixture(scope="session")
def mlx_checkpoints(hf_checkpoints, tmp_path_factory):
    """name -> {"target": Path, "draft": Path}: the HF checkpoints converted by our converter."""
    from mlx_dllm import convert

    root = tmp_path_factory.mktemp("mlx")
    return {
        name: {role: convert(checkpoint[role], root / name / role) for role in ("target", "draft")}
        for name, checkpoint in hf_checkpoints.items()
    }


@pytest.fixture(scope="module")
def models(mlx_checkpoints):
    """(target, tokenizer, drafter) of the qwen3_gqa checkpoints, loaded once per test module."""
    from mlx_dllm import load

    target, tokenizer = load(str(mlx_checkpoints["qwen3_gqa"]["target"]))
    draft, _ = load(str(mlx_checkpoints["qwen3_gqa"]["draft"]))
    return target, tokenizer, draft


@pytest.fixture
def metal_emulator(monkeypatch, request):
    """mx.fast.metal_kernel runs on the CPU Metal emulator (tests/metal_emulator) during the test.

    Yields the emulator module (for `options(sanitizer=...)` and its error types). Kernels built
    before the test (at import time) keep the real metal_kernel; build them inside the test."""
    import mlx.core as mx

    from tests import metal_emulator as emulator

    reason = emulator.unavailable_reason()
    if reason:
        pytest.skip(reason)
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        emulator.set_cache_dir(cache.mkdir("metal_emulator"))
    monkeypatch.setattr(mx.fast, "metal_kernel", emulator.metal_kernel)
    yield emulator


@pytest.fixture(scope="session")
def hybrid_checkpoints(tmp_path_factory):
    """name -> {"target": Path, "draft": Path, "target_model": torch model}: tiny hybrid (and Gemma 4) targets built by
    the transformers classes with a DFlash drafter reading layers 0, 2 and 4 (the last), both converted by us."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mlx_dllm import convert
    from tests.reference import harness, hybrid

    root = tmp_path_factory.mktemp("hybrid")
    checkpoints = {}
    for name, build in hybrid.HYBRID_TARGETS.items():
        target = build(root / name / "hf-target")
        harness.build_draft(hybrid.text_config(target.config), root / name / "hf-draft", target_layer_ids=[0, 2, 4])
        checkpoints[name] = {
            "target": convert(root / name / "hf-target", root / name / "target"),
            "draft": convert(root / name / "hf-draft", root / name / "draft"),
            "target_model": target,
        }
    return checkpoints


@pytest.fixture(scope="session", autouse=True)
def cost_curves(tmp_path_factory):
    """Adaptive speculation's measured cost curves go to a folder of the session's, not the user's cache (the
    variable reaches the CLI's subprocesses too)."""
    import os

    from mlx_dllm.sampler.cost_curve import FOLDER_VARIABLE

    os.environ[FOLDER_VARIABLE] = str(tmp_path_factory.mktemp("cost-curves"))
    yield
    os.environ.pop(FOLDER_VARIABLE, None)
