"""The loader: hub repos are fetched without remote code, and shipped code is never run."""

import json
import shutil

import pytest

from mlx_dllm import DLLMError, load
from mlx_dllm.loading import resolve


def test_hub_repo_is_fetched_without_python_files(hf_checkpoints, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(hf_checkpoints["qwen3_gqa"]["draft"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    draft, tokenizer = load("z-lab/Qwen3-8B-DFlash-b16", revision="main")
    assert calls and calls[0][:2] == ("z-lab/Qwen3-8B-DFlash-b16", "main")
    assert "model*.safetensors" in calls[0][2] and not any(p.endswith(".py") for p in calls[0][2])
    assert draft.args.block_size == 8 and tokenizer is None


def test_local_paths_are_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DLLMError, match="does not exist"):
        resolve(str(tmp_path / "missing"))


def test_code_shipped_with_a_checkpoint_never_runs(hf_checkpoints, tmp_path):
    folder = tmp_path / "target"
    shutil.copytree(hf_checkpoints["qwen3_gqa"]["target"], folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_file"] = "evil.py"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DLLMError, match="trust_remote_code|custom module"):
        load(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("value", [123, None, ["a/b"]])
def test_paths_of_the_wrong_type_are_our_error(value, tmp_path):
    from mlx_dllm import convert

    with pytest.raises(DLLMError, match="the model path must be a folder path or a hub repo id, got "):
        load(value)
    with pytest.raises(DLLMError, match="hf_path must be a folder path or a hub repo id, got "):
        convert(value, tmp_path / "out")
    with pytest.raises(DLLMError, match="mlx_path must be a folder path, got "):
        convert(str(tmp_path), value)
