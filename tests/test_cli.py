"""The `mlx-dllm` CLI: convert + generate end to end, and one-line errors (nothing half-written) on bad input."""

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mlx_dllm.cli import main

PROMPT = [5, 17, 42]


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_user_error(result, pattern: str):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()  # progress bars may come first, also on stderr
    assert lines[-1].startswith("Error: ") and "Error" not in "".join(lines[:-1]), result.stderr
    assert pattern in lines[-1], lines[-1]
    assert "Traceback" not in result.output


def assert_nothing_written(mlx_path: Path):
    assert not mlx_path.exists()
    assert list(mlx_path.parent.iterdir()) == []  # no temporary folder either


def edited_copy(source: Path, destination: Path, **config_changes) -> Path:
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def words(ids):
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def converted(hf_checkpoints, tmp_path_factory):
    """qwen3_gqa converted through the CLI itself."""
    root = tmp_path_factory.mktemp("cli")
    for role in ("target", "draft"):
        result = run("convert", "--hf-path", hf_checkpoints["qwen3_gqa"][role], "--mlx-path", root / role)
        assert result.exit_code == 0, result.output
    return {"target": root / "target", "draft": root / "draft"}


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "model"


def generated_text(stdout: str) -> str:
    return stdout.split("=" * 10)[1].strip()


def test_generate_dflash_matches_the_reference_greedy(hf_checkpoints, converted):
    from tests.reference.harness import EOS_TOKEN_ID, reference_greedy

    reference = reference_greedy(hf_checkpoints["qwen3_gqa"]["target_model"], PROMPT, 16)
    reference = reference[: reference.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in reference else reference
    args = ["--model", converted["target"], "-p", words(PROMPT), "-m", 16]
    ar = run("generate", *args)
    dflash = run("generate", *args, "--draft-model", converted["draft"], "--block-size", 4)
    assert ar.exit_code == 0 and dflash.exit_code == 0, ar.output + dflash.output
    assert generated_text(ar.stdout) == generated_text(dflash.stdout) == words(reference)
    assert "Prompt: 3 tokens" in dflash.stdout and f"Generation: {len(reference)} tokens" in dflash.stdout
    assert "Peak memory: " in dflash.stdout and "Mode: dflash" in dflash.stdout and "acceptance length" in dflash.stdout


def test_generate_quiet_reads_stdin(converted):
    result = run("generate", "--model", converted["target"], "-p", "-", "-m", 4, "--no-verbose", input=words(PROMPT))
    assert result.exit_code == 0, result.output
    assert "=" * 10 not in result.stdout and "Prompt:" not in result.stdout
    assert len(result.stdout.split()) == 4


THINKING_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}w9{% else %}w8{% endif %}"
)


def with_chat_template(folder, destination, template):
    target = shutil.copytree(folder, destination)
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return target


def test_chat_template_gets_system_prompt(converted, tmp_path):
    target = with_chat_template(converted["target"], tmp_path / "chat", THINKING_TEMPLATE)
    chat = run("generate", "--model", target, "-p", "w5", "--system-prompt", "w3", "-m", 2)
    plain = run("generate", "--model", target, "-p", "w5", "--system-prompt", "w3", "-m", 2, "--ignore-chat-template")
    assert "Prompt: 3 tokens" in chat.stdout, chat.output  # w3 w5 w8
    assert "Prompt: 1 tokens" in plain.stdout, plain.output


@pytest.mark.parametrize("template_config", [None, '{"enable_thinking": false}'])
def test_same_prompt_same_text_as_mlx_lm_generate(converted, tmp_path, monkeypatch, capsys, template_config):
    """The template's own thinking default (no forced switch) and --chat-template-config, as mlx_lm.generate."""
    import importlib

    mlx_lm_generate = importlib.import_module("mlx_lm.generate")

    target = with_chat_template(converted["target"], tmp_path / "chat", THINKING_TEMPLATE)
    extra = [] if template_config is None else ["--chat-template-config", template_config]
    args = ["--model", str(target), "-p", "w5 w7", "-m", "6", "--verbose", "False", *extra]
    monkeypatch.setattr("sys.argv", ["mlx_lm.generate", *args])
    mlx_lm_generate.main()
    expected = capsys.readouterr().out
    ours = run("generate", *args)
    assert ours.exit_code == 0, ours.output
    assert ours.stdout.split() == expected.split() and len(expected.split()) == 6


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}", "the chat template failed: "),
        ("{{ raise_exception('no system role') }}", "the chat template failed: no system role"),
    ],
)
def test_a_broken_chat_template_is_one_error(converted, tmp_path, template, message):
    target = with_chat_template(converted["target"], tmp_path / "chat", template)
    assert_user_error(run("generate", "--model", target, "-p", "w5"), message)


def test_bad_chat_template_config(converted):
    result = run("generate", "--model", converted["target"], "--chat-template-config", "{nope")
    assert_user_error(result, "--chat-template-config is not valid JSON")
    result = run("generate", "--model", converted["target"], "--chat-template-config", "[1]")
    assert_user_error(result, "--chat-template-config must be a JSON object")


def test_non_utf8_stdin_is_one_error(converted):
    result = run("generate", "--model", converted["target"], "-p", "-", input=b"w5 \xff\xfe w7")
    assert_user_error(result, "the prompt read from stdin is not UTF-8 text (byte 3)")


def test_verbose_false_and_dash_h_as_in_mlx_lm(converted):
    quiet = run("generate", "--model", converted["target"], "-p", "w5", "-m", 3, "--verbose", "False")
    assert quiet.exit_code == 0, quiet.output
    assert "Prompt:" not in quiet.stdout and len(quiet.stdout.split()) == 3
    loud = run("generate", "--model", converted["target"], "-p", "w5", "-m", 3, "--verbose")
    assert "Prompt: 1 tokens" in loud.stdout, loud.output
    for args in (["-h"], ["generate", "-h"], ["convert", "-h"]):
        result = run(*args)
        assert result.exit_code == 0 and "Usage: " in result.stdout, result.output


def test_models_in_the_wrong_role(converted):
    result = run("generate", "--model", converted["draft"], "-p", "w5")
    assert_user_error(result, "is a DFlash drafter: pass it as --draft-model, with its target as --model")
    result = run("generate", "--model", converted["target"], "--draft-model", converted["target"], "-p", "w5")
    assert_user_error(result, "is not a DFlash drafter (it is a qwen3 model)")


def test_version_and_usage_errors():
    assert run("--version").stdout.startswith("mlx-dllm, version ")
    assert_user_error(run("convert", "--hf-path", "x", "--dtype", "float64"), "'float64' is not one of")


def test_unknown_architecture(hf_checkpoints, tmp_path, out):
    source = edited_copy(
        hf_checkpoints["qwen3_gqa"]["target"], tmp_path / "foo", architectures=["FooForCausalLM"], model_type="foo"
    )
    assert_user_error(run("convert", "--hf-path", source, "--mlx-path", out), "unknown architecture FooForCausalLM")
    assert_nothing_written(out)
    assert_user_error(run("generate", "--model", source), "foo")


def test_draft_hidden_size_mismatch(converted, tmp_path):
    from tests.reference.harness import build_draft

    build_draft(SimpleNamespace(hidden_size=32), tmp_path / "narrow")
    result = run("generate", "--model", converted["target"], "--draft-model", tmp_path / "narrow")
    assert_user_error(result, "draft hidden size 32 does not match the target's 64")


def test_mask_id_outside_the_embedding(converted, tmp_path):
    draft = edited_copy(converted["draft"], tmp_path / "draft", mask_token_id=10**6)
    result = run("generate", "--model", converted["target"], "--draft-model", draft)
    assert_user_error(result, "mask_token_id 1000000 is outside the target's embedding table (256 rows)")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block-size", 1], "block size must be at least 2, got 1"),
        (["--block-size", 9], "block size must be between 2 and the drafter's trained 8, got 9"),
        (["--max-tokens", 0], "max_tokens must be positive, got 0"),
        (["--top-p", 0], "top_p must be in (0, 1]"),
    ],
)
def test_bad_generate_flags(converted, flags, message):
    result = run("generate", "--model", converted["target"], "--draft-model", converted["draft"], *flags)
    assert_user_error(result, message)
    assert result.stdout == ""


def test_missing_config_keys(hf_checkpoints, tmp_path, out):
    draft = edited_copy(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "draft", target_layer_ids=None)
    assert_user_error(run("convert", "--hf-path", draft, "--mlx-path", out), "missing target_layer_ids")
    assert_nothing_written(out)


@pytest.mark.parametrize("role", ["target", "draft"])
def test_truncated_safetensors(hf_checkpoints, tmp_path, out, role):
    source = shutil.copytree(hf_checkpoints["qwen3_gqa"][role], tmp_path / role)
    weights = source / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert_user_error(run("convert", "--hf-path", source, "--mlx-path", out), "cannot read model.safetensors")
    assert_nothing_written(out)


def test_missing_tokenizer(hf_checkpoints, tmp_path, out):
    source = shutil.copytree(hf_checkpoints["qwen3_gqa"]["target"], tmp_path / "target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    assert_user_error(run("convert", "--hf-path", source, "--mlx-path", out), "no tokenizer in")
    assert_nothing_written(out)
    assert_user_error(run("generate", "--model", source), "no tokenizer in")


def test_existing_output_folder(hf_checkpoints, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("convert", "--hf-path", hf_checkpoints["qwen3_gqa"]["draft"], "--mlx-path", out)
    assert_user_error(result, "already exists and is not empty (use --force")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"] and (out / "keep.txt").read_text() == "mine"


def test_bad_quantization_bits(hf_checkpoints, out):
    result = run("convert", "--hf-path", hf_checkpoints["qwen3_gqa"]["target"], "--mlx-path", out, "-q", "--q-bits", 7)
    assert_user_error(result, "cannot quantize")
    assert_nothing_written(out)


def assert_interrupted(result):
    assert result.exit_code == 130, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("warning: MLX runs the reference BLAS")] == ["Aborted!"]


def test_ctrl_c_while_a_command_imports(monkeypatch):
    def interrupted(name, package=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlx_dllm.cli.importlib.import_module", interrupted)
    assert_interrupted(run("generate", "--model", "x"))


def test_ctrl_c_while_generating(converted, monkeypatch):
    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr("mlx_dllm.stream_generate", interrupted)
    assert_interrupted(run("generate", "--model", converted["target"], "-p", "w5"))


def test_the_cli_imports_no_mlx_until_a_command_runs():
    """What makes Ctrl-C during imports land in click's handling: the entry point itself imports almost nothing."""
    import subprocess

    heavy = ("mlx.core", "mlx_lm", "transformers")
    probe = f"import sys, mlx_dllm.cli, mlx_dllm; print([m for m in {heavy} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("argv, preloads", [
    (["generate", "-p", "hi"], True), (["serve"], True), (["train-drafter", "--model", "m"], True),
    (["convert", "--hf-path", "x"], False), (["generate", "--help"], False), ([], False),
])
def test_console_script_preloads_openblas_for_the_matmul_commands(monkeypatch, argv, preloads):
    import mlx_dllm.cli as cli
    from mlx_dllm import blas

    calls = []
    monkeypatch.setattr(blas, "ensure_blas", lambda choice: calls.append(("blas", choice)))
    monkeypatch.setattr(cli, "main", lambda **options: calls.append(("main", options)))
    monkeypatch.setattr(sys, "argv", ["mlx-dllm", *argv])
    cli.entry()
    assert calls == [("blas", "auto")] * preloads + [("main", {"prog_name": "mlx-dllm"})]


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_generate_reruns_itself_with_openblas_preloaded(converted, tmp_path):
    """A real process: the one that generates has OpenBLAS mapped, though nothing preloaded it from outside."""
    import subprocess

    from mlx_dllm import blas

    if blas.find_openblas() is None:
        pytest.skip(f"no OpenBLAS here ({blas.FIX})")
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: print('BLAS:', 'libopenblas' in open('/proc/self/maps').read(), file=sys.stderr))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", blas.REEXEC_GUARD)}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "mlx_dllm.cli", "generate", "--model", converted["target"], "-p", "hi",
               "-m", "2"]
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "BLAS: True"
    environment[blas.REEXEC_GUARD] = "1"  # the opt-out: the BLAS stays as it is
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=environment)
    assert result.returncode == 0 and result.stderr.strip().splitlines()[-1] == "BLAS: False", result.stderr


@pytest.fixture
def no_model_resolved(monkeypatch):
    """Fails the command if it resolves the default model or loads any model."""
    from mlx_dllm import default_model

    def resolved(*args, **kwargs):
        raise AssertionError("a model was resolved before the flags were checked")

    monkeypatch.setattr(default_model, "default_model", resolved)
    monkeypatch.setattr("mlx_dllm.load", resolved)


@pytest.mark.parametrize(
    "command, message",
    [
        (["generate", "-p", ""], "the prompt is empty: give some text with -p"),
        (["generate", "-p", "-"], "the prompt is empty: -p - read nothing from stdin"),
        (["generate", "--draft-model", "x", "--no-draft"], "--no-draft and --draft-model x contradict each other"),
        (["serve", "--draft-model", "x", "--no-draft"], "--no-draft and --draft-model x contradict each other"),
        (["generate", "--max-tokens", -5], "max_tokens must be positive, got -5"),
        (["generate", "--model", "default", "--temp", -1], "temp must be >= 0, got -1.0"),
        (["generate", "--seed", -1], "seed must be between 0 and"),
        (["generate", "--stop", ""], "stop strings must not be empty"),
        (["generate", "--num-draft-tokens", 0], "num_draft_tokens must be positive, got 0"),
    ],
)
def test_flag_errors_come_before_any_model_is_resolved(no_model_resolved, command, message):
    result = run(*command, input="")
    assert_user_error(result, message)
    assert result.stdout == ""


def test_generate_says_which_blas_ran_and_warns_once_on_the_reference_one(converted, monkeypatch):
    import mlx.core as mx

    from mlx_dllm import blas

    monkeypatch.setattr(blas, "current_blas", lambda: "reference")
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    blas.warn_reference_blas.cache_clear()  # once per process: this test's process is pytest's
    try:
        result = run("generate", "--model", converted["target"], "--draft-model", converted["draft"], "-p", "w5",
                     "-m", 2)
    finally:
        blas.warn_reference_blas.cache_clear()
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: MLX runs the reference BLAS")]
    assert len(warnings) == (1 if mx.default_device() == mx.cpu else 0)  # target and drafter loaded, one line
    assert f"[INFO] BLAS: reference, device {mx.default_device()}" in result.stderr
    assert "BLAS" not in result.stdout
