"""One loading policy (loading.load_pair): a target and its drafter, each checked for its role, the same in
`generate`, `benchmark`, `train-drafter` and from Python."""

import re

import pytest
from click.testing import CliRunner

from mlx_dllm import DLLMError, blas
from mlx_dllm.benchmark.tiny import build_tiny
from mlx_dllm.cli import main
from mlx_dllm.loading import load_pair
from mlx_dllm.models.drafter import is_drafter

DRAFTER_AS_TARGET = "is a DFlash drafter: pass it as --draft-model, with its target as --model"
TARGET_AS_DRAFTER = "is not a DFlash drafter (it is a qwen3 model)"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    target, draft = build_tiny("dflash", tmp_path_factory.mktemp("tiny"))
    return str(target), str(draft)


def test_load_pair_gives_the_target_its_tokenizer_and_its_drafter(tiny_pair):
    model, tokenizer, draft = load_pair(*tiny_pair)
    assert not is_drafter(model) and tokenizer is not None and is_drafter(draft)
    assert load_pair(tiny_pair[0])[2] is None


def test_load_pair_refuses_models_in_the_wrong_role(tiny_pair):
    target, draft = tiny_pair
    with pytest.raises(DLLMError, match=re.escape(DRAFTER_AS_TARGET)):
        load_pair(draft)
    with pytest.raises(DLLMError, match=re.escape(f"--draft-model {target} {TARGET_AS_DRAFTER}")):
        load_pair(target, target)


def test_every_command_refuses_a_drafter_as_its_target(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv(blas.REEXEC_GUARD, "1")  # benchmark never re-execs inside pytest
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"w5 w6"\n')
    draft = tiny_pair[1]
    commands = [
        ["generate", "--model", draft, "-p", "w5"],
        ["benchmark", "--model", draft, "--draft-model", "none", "--num-prompts", "1", "-m", "2", "--repeats", "1"],
        ["train-drafter", "--model", draft, "--data", prompts, "--out", tmp_path / "drafter", "--steps", "1"],
    ]
    for command in commands:
        result = CliRunner().invoke(main, [str(part) for part in command])
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.strip().splitlines()[-1] == f"Error: {draft} {DRAFTER_AS_TARGET}", command
