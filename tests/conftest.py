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
