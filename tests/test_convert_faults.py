"""Faults around `convert` and `generate`: a full disk (MLX's writers included), bad quantization values, text
that is not UTF-8, a stdout that cannot be written, SIGTERM, a kill between the two renames of a replacement, a
NaN LoRA adapter and a chat template that fails. Each is one line, and nothing is half-written or lost."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dllm import DLLMError, chat_template, convert, load, staging
from mlx_dllm.benchmark.tiny import build_tiny
from mlx_dllm.blas import REEXEC_GUARD
from mlx_dllm.checkpoint_files import LORA_FOLDER
from tests.test_cli import assert_nothing_written, assert_user_error, run

ENVIRONMENT = {**os.environ, REEXEC_GUARD: "1"}  # no OpenBLAS re-exec: the process we signal is the one we started
BLAS_WARNING = "warning: MLX runs the reference BLAS"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random checkpoints (no torch): an mlx-lm target, a DFlash drafter, Nemotron and its LoRA, DiffusionGemma."""
    root = tmp_path_factory.mktemp("tiny")
    target, draft = build_tiny("dflash", root / "dflash")
    nemotron, _ = build_tiny("nemotron", root / "nemotron")
    gemma, _ = build_tiny("diffusion-gemma", root / "gemma")
    return {"target": target, "draft": draft, "nemotron": nemotron, "diffusion-gemma": gemma}


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "model"


def entries(folder: Path) -> list:
    return sorted(path.name for path in folder.iterdir())


def gguf_file(folder: Path) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from tests.reference import gguf_files

    return gguf_files.write_llama(folder / "llama.gguf")


def problems(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(BLAS_WARNING)]


def with_template(source: Path, destination: Path, template: str, file: bool = False) -> Path:
    folder = shutil.copytree(source, destination)
    if file:
        (folder / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


# A full disk: MLX's writers throw a bare RuntimeError ("[write] Unable to write N bytes to file.")


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """MLX's safetensors writer on a full device: every file it writes goes to /dev/full, so the error is its own."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    device = tmp_path / "full.safetensors"
    device.symlink_to("/dev/full")
    real = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", lambda file, arrays, metadata=None: real(str(device), arrays, metadata))


@pytest.mark.parametrize("name", ["target", "draft", "nemotron", "diffusion-gemma", "gguf"])
def test_a_full_disk_is_one_line_for_every_recipe(tiny, tmp_path, out, full_disk, name):
    source = gguf_file(tmp_path) if name == "gguf" else tiny[name]
    result = run("convert", "--hf-path", source, "--mlx-path", out)
    assert_user_error(result, f"cannot write {out}: No space left on device")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "mlx_error, message",  # MLX's own texts (mlx/io/load.h, mlx/io/safetensors.cpp)
    [
        ("[write] Unable to write 8192 bytes to file.", "No space left on device"),
        ("[save_safetensors] Failed to open file {}/model.safetensors", "MLX could not create model.safetensors"),
    ],
)
def test_an_mlx_write_failure_keeps_the_previous_conversion(tiny, out, monkeypatch, mlx_error, message):
    convert(tiny["draft"], out, quiet=True)
    before = {file.name: file.read_bytes() for file in out.iterdir()}

    def failing(file, *args, **kwargs):
        raise RuntimeError(mlx_error.format(Path(file).parent))

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(DLLMError, match=f"cannot write {out}: {message}"):
        convert(tiny["target"], out, force=True)
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before and entries(out.parent) == ["model"]


def test_any_staged_writer_reports_a_full_disk_in_one_line(tmp_path, full_disk):
    """What `train-drafter` writes its drafter folder through, as every recipe does."""
    with pytest.raises(DLLMError, match=r"cannot write .*drafter: No space left on device"):
        with staging.staged_folder(tmp_path / "drafter", force=False) as folder:
            mx.save_safetensors(str(folder / "model.safetensors"), {"w": mx.zeros((4,))})
    assert entries(tmp_path) == ["full.safetensors"]


def test_a_tokenizer_copy_that_fills_the_disk_blames_the_disk_not_the_source(tiny, out, monkeypatch):
    """shutil's copy names its source on ENOSPC; the source is fine, the disk being written is full."""
    if not hasattr(os, "sendfile"):
        pytest.skip("shutil copies with sendfile on Linux only")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)
    result = run("convert", "--hf-path", tiny["target"], "--mlx-path", out)
    assert_user_error(result, f"cannot write {out}: No space left on device; nothing was written there")
    assert_nothing_written(out)


# Quantization values: checked once, before any work, as MLX takes them


@pytest.mark.parametrize(
    "options, message",
    [
        ({"q_bits": 3.5}, "q_bits must be a whole number, got 3.5"),
        ({"q_bits": True}, "q_bits must be a whole number, got True"),
        ({"q_group_size": "64"}, "q_group_size must be a whole number, got '64'"),
        ({"q_group_size": 0}, "q_group_size must be at least 1, got 0"),
        ({"q_bits": -4}, "q_bits must be at least 1, got -4"),
        ({"q_bits": 7}, "cannot quantize: [quantize] The requested number of bits 7 is not supported"),
        ({"q_group_size": 48}, "cannot quantize: [quantize] The requested group size 48 is not supported"),
        ({"q_group_size": 2**40}, "cannot quantize: "),
    ],
)
def test_quantization_values_are_checked_before_any_work(tmp_path, options, message):
    with pytest.raises(DLLMError) as error:
        convert(tmp_path / "no such checkpoint", tmp_path / "out", quantize=True, **options)
    assert str(error.value).startswith(message), str(error.value)


def test_the_cli_checks_quantization_values_before_any_work(tmp_path):
    result = run("convert", "--hf-path", tmp_path / "no such checkpoint", "-q", "--q-group-size", 48)
    assert_user_error(result, "cannot quantize: [quantize] The requested group size 48 is not supported")
    assert_user_error(run("convert", "--hf-path", "x", "--q-group-size", 0), "Invalid value for '--q-group-size'")


def test_valid_quantization_values_still_convert(tiny, out):
    convert(tiny["target"], out, quantize=True, q_group_size=32, q_bits=8)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


# Text arguments: Python hands undecodable argv bytes over as lone surrogates


@pytest.mark.parametrize("flag", ["-p", "--system-prompt", "--stop", "--chat-template-config"])
def test_text_flags_that_are_not_utf8_are_one_error(flag):
    result = run("generate", "--model", "never loaded", flag, "w5 \udcff\udcfe")
    assert_user_error(result, "not UTF-8 text (byte 0xff)")
    assert flag in result.stderr


def test_a_non_utf8_prompt_from_a_real_shell_is_one_error():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_dllm.cli", "generate", "--model", "never loaded", "-p", b"\xff\xfe"],
        capture_output=True, text=True, env=ENVIRONMENT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: Invalid value for '-p' / '--prompt': not UTF-8")


def test_a_template_that_renders_lone_surrogates_is_one_error(tiny, tmp_path):
    """Valid JSON can still carry one (`"\\udcff"`), e.g. through --chat-template-config."""
    source = with_template(tiny["target"], tmp_path / "target", "{{ messages[0]['content'] }}{{ extra }}")
    target = convert(source, tmp_path / "converted", quiet=True)
    result = run("generate", "--model", target, "-p", "w5", "-m", 2, "--chat-template-config", '{"extra": "\\udcff"}')
    assert_user_error(result, "the chat template rendered text that is not UTF-8")


def test_paths_that_are_not_utf8_are_one_error(tiny, tmp_path):
    """Legal on Linux, but MLX cannot open them (it throws `std::bad_cast`), nor can the tokenizer."""
    odd = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    result = run("convert", "--hf-path", tiny["target"], "--mlx-path", odd)
    assert_user_error(result, "mlx_path '" + odd.encode("unicode_escape").decode() + "' is not UTF-8 text")
    assert entries(tmp_path) == []
    with pytest.raises(DLLMError, match="the model path .* is not UTF-8 text"):
        load(odd)


# stdout: a full device is one line; a closed pipe ends quietly


@pytest.fixture(scope="module")
def converted_target(tiny, tmp_path_factory):
    return convert(tiny["target"], tmp_path_factory.mktemp("converted") / "target", quiet=True)


def run_cli(*args, stdout):
    command = [sys.executable, "-m", "mlx_dllm.cli", *map(str, args)]
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("command", [["generate", "-p", "w5", "-m", 3], ["generate", "-p", "w5", "--no-verbose"]])
def test_generate_into_a_full_device_is_one_line(converted_target, command):
    with open("/dev/full", "w") as full:
        result = run_cli(*command, "--model", converted_target, stdout=full)
    assert result.returncode == 1
    assert problems(result.stderr) == ["Error: cannot write the output: No space left on device"], result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_benchmark_into_a_full_device_is_one_line():
    with open("/dev/full", "w") as full:
        result = run_cli("benchmark", "--tiny", "dflash", "--num-prompts", 1, "--max-tokens", 4, "--repeats", 1,
                         stdout=full)
    assert result.returncode == 1
    assert problems(result.stderr) == ["Error: cannot write the output: No space left on device"], result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_convert_into_a_full_stdout_is_one_line_and_writes_nothing(tiny, out):
    with open("/dev/full", "w") as full:
        result = run_cli("convert", "--hf-path", tiny["target"], "--mlx-path", out, stdout=full)
    assert result.returncode == 1
    assert problems(result.stderr)[-1] == "Error: cannot write the output: No space left on device", result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(out)


def test_generate_into_a_closed_pipe_ends_quietly(converted_target):
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -c1` once it has its byte
    try:
        result = run_cli("generate", "--model", converted_target, "-p", "w5", "-m", 3, stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode != 0 and problems(result.stderr) == [], result.stderr


# SIGTERM: a real process, stopped at a known point, unwinds like Ctrl-C

SIGNALLED = """
import importlib, os, signal, sys
module, name, ready = importlib.import_module(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real = getattr(module, name)

def stopped_here(*args, **kwargs):
    os.write(ready, b"!")
    signal.pause()
    return real(*args, **kwargs)

setattr(module, name, stopped_here)
from mlx_dllm.cli import main
main(sys.argv[4:], prog_name="mlx-dllm")
"""


def terminated_at(where: str, *args):
    """Run the CLI in a new process, send it SIGTERM once it reaches `where` (module:function), wait for its end."""
    module, name = where.split(":")
    ready, signal_ready = os.pipe()
    command = [sys.executable, "-c", SIGNALLED, module, name, str(signal_ready), *map(str, args)]
    process = subprocess.Popen(command, pass_fds=(signal_ready,), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENVIRONMENT)
    os.close(signal_ready)
    try:
        reached = os.read(ready, 1) == b"!"
    finally:
        os.close(ready)
    if reached:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert reached, stderr
    return process.returncode, stderr


def test_sigterm_while_writing_prints_aborted_and_keeps_the_old_folder(tiny, out):
    convert(tiny["draft"], out, quiet=True)
    before = {file.name: file.read_bytes() for file in out.iterdir()}
    code, stderr = terminated_at("mlx_dllm.convert.common:save_config", "convert", "--hf-path", tiny["target"],
                                 "--mlx-path", out, "--force")
    assert code == 128 + signal.SIGTERM
    assert problems(stderr)[-1] == "Aborted!" and "Traceback" not in stderr, stderr
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before and entries(out.parent) == ["model"]


def test_sigterm_before_writing_prints_aborted_and_writes_nothing(tiny, out):
    code, stderr = terminated_at("mlx_dllm.loading:load_tokenizer_checked", "convert", "--hf-path", tiny["target"],
                                 "--mlx-path", out)
    assert code == 128 + signal.SIGTERM
    assert problems(stderr)[-1] == "Aborted!" and "Traceback" not in stderr, stderr
    assert_nothing_written(out)


# A kill between the two renames of a replacement (no atomic exchange): the previous conversion is found

KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from mlx_dllm import staging
staging.exchange = lambda first, second: False  # a filesystem without an atomic exchange
output, rename = Path(sys.argv[1]).absolute(), os.rename

def killed_before_the_new_folder_moves_in(source, destination):
    if Path(destination) == output:  # the old folder is already aside
        os.kill(os.getpid(), signal.SIGKILL)
    rename(source, destination)

os.rename = killed_before_the_new_folder_moves_in
from mlx_dllm.cli import main
main(sys.argv[2:], prog_name="mlx-dllm")
"""


@pytest.fixture
def parked(tiny, out):
    """`out` missing: its previous conversion (of the drafter) sits aside, where a SIGKILL left it."""
    convert(tiny["draft"], out, quiet=True)
    command = [sys.executable, "-c", KILLED_BETWEEN_RENAMES, out,
               "convert", "--hf-path", tiny["target"], "--mlx-path", out, "--force"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    [old] = out.parent.glob(".model.*.old")
    return old


def is_drafter_conversion(folder: Path) -> bool:
    return "block_size" in json.loads((folder / "config.json").read_text())


def test_load_of_a_folder_left_aside_says_where_it_is(parked, out):
    with pytest.raises(DLLMError, match=f"{out} does not exist: .* previous contents in {parked}; rename"):
        load(str(out))
    assert_user_error(run("generate", "--model", out), str(parked))


def test_the_next_convert_restores_it_before_anything_else(parked, tiny, out):
    with pytest.raises(DLLMError, match=f"{out} was restored from {parked.name}.*use --force to replace it"):
        convert(tiny["target"], out)
    assert is_drafter_conversion(out) and not parked.exists()
    load(str(out))


def test_the_next_convert_force_restores_it_then_replaces_it(parked, tiny, out):
    convert(tiny["target"], out, force=True, quiet=True)
    assert not is_drafter_conversion(out) and not parked.exists()
    assert [name for name in entries(out.parent) if name.endswith(".old")] == []


def test_two_folders_left_aside_are_both_named_and_neither_is_chosen(parked, out):
    second = shutil.copytree(parked, parked.with_name(".model.0123abcd.old"))
    with pytest.raises(DLLMError, match=f"{out} is missing: .*{second}.*rename the one to keep back"):
        staging.check_destination(out, force=True)
    assert parked.exists() and second.exists() and not out.exists()


# A NaN LoRA adapter is refused by name before writing, as NaN weights are


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_lora_adapter_is_refused_at_convert(tiny, tmp_path, out, value):
    source = shutil.copytree(tiny["nemotron"], tmp_path / "nemotron")
    adapter = source / LORA_FOLDER / "adapter_model.safetensors"
    weights = mx.load(str(adapter))
    name = sorted(weights)[0]
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 2, value, weights[name])
    mx.save_safetensors(str(adapter), weights)
    with pytest.raises(DLLMError, match=f"tensor {name} in {LORA_FOLDER}/adapter_model.safetensors holds NaN or Inf"):
        convert(source, out)
    assert_nothing_written(out)


# Chat templates: rendered once at convert, under generate's budget; a broken one is refused by where it lives


BROKEN_TEMPLATES = {
    "syntax": ("{% for m in messages %}", "the chat template failed: "),
    "raises": ("{{ raise_exception('no user role here') }}", "the chat template failed: no user role here"),
    "divides by zero": ("{{ 1 / 0 }}", "the chat template failed: division by zero"),
    "range too big": ("{% for i in range(10**9) %}{% endfor %}", "the chat template failed: "),
    "hangs": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "the chat template did not finish rendering within 0.2 s",
    ),
    "floods": (
        "{% for i in range(1000) %}{{ 'w5 ' * 100 }}{% endfor %}",
        "the chat template rendered 300,000 characters, more than 1,000",
    ),
}


@pytest.mark.parametrize("file", [False, True], ids=["tokenizer_config", "jinja_file"])
@pytest.mark.parametrize("kind", list(BROKEN_TEMPLATES))
def test_a_broken_chat_template_is_refused_by_where_it_lives(tiny, tmp_path, out, monkeypatch, kind, file):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.2)  # the budget's size is not under test
    monkeypatch.setattr(chat_template, "RENDER_CHARACTERS", 1000)
    template, message = BROKEN_TEMPLATES[kind]
    source = with_template(tiny["target"], tmp_path / "target", template, file)
    where = source / "chat_template.jinja" if file else f"{source / 'tokenizer_config.json'} (chat_template)"
    result = run("convert", "--hf-path", source, "--mlx-path", out)
    assert_user_error(result, f"Error: {where}: {message}")
    assert_nothing_written(out)


@pytest.mark.parametrize("name", ["nemotron", "diffusion-gemma"])
def test_our_families_check_their_template_too(tiny, tmp_path, out, name):
    source = with_template(tiny[name], tmp_path / name, "{{ raise_exception('nope') }}")
    with pytest.raises(DLLMError, match="tokenizer_config.json \\(chat_template\\): the chat template failed: nope"):
        convert(source, out)
    assert_nothing_written(out)


def test_a_working_chat_template_is_rendered_and_copied(tiny, tmp_path, out):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w9{% endif %}"
    source = with_template(tiny["target"], tmp_path / "target", template, file=True)
    convert(source, out, quiet=True)
    assert (out / "chat_template.jinja").read_text() == template


def test_a_broken_gguf_chat_template_is_refused(tmp_path, out, monkeypatch):
    pytest.importorskip("torch")
    from tests.reference import gguf_files

    monkeypatch.setattr(gguf_files, "CHATML_TEMPLATE", "{{ raise_exception('bad gguf template') }}")
    file = gguf_file(tmp_path)
    result = run("convert", "--hf-path", file, "--mlx-path", out)
    assert_user_error(result, f"{file} (tokenizer.chat_template): the chat template failed: bad gguf template")
    assert_nothing_written(out)
