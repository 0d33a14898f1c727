"""Loading and conversion are safe: no checkpoint code runs, --force deletes only a previous conversion, no link
leads out of the checkpoint, nothing unloadable or non-finite replaces a good conversion, and I/O failures are one
line with nothing half-written."""

import errno
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dllm import DLLMError, convert, load
from mlx_dllm.convert import common as convert_common
from mlx_dllm import staging
from tests.test_cli import assert_nothing_written, assert_user_error, run

YES = "y\n" * 4


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    """A tiny Nemotron-Labs-Diffusion checkpoint with its `linear_spec_lora/`."""
    pytest.importorskip("torch")
    from tests.reference import nemotron as reference

    folder = tmp_path_factory.mktemp("nemotron") / "hf"
    reference.build_checkpoint(folder)
    return folder


def entries(folder: Path) -> list:
    return sorted(path.name for path in folder.iterdir())


def edit_json(file: Path, **changes) -> None:
    content = json.loads(file.read_text())
    content.update(changes)
    file.write_text(json.dumps(content))


def plant_remote_code(folder: Path, marker: Path, tokenizer_class: str = "PreTrainedTokenizerFast") -> None:
    """Python files that write `marker` when imported, wired up through `auto_map` as the hub does it."""
    body = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_planted.py").write_text(
        body + "from transformers import PretrainedConfig\n\n\nclass PlantedConfig(PretrainedConfig):\n"
        "    model_type = 'nemotron_labs_diffusion'\n"
    )
    (folder / "tokenization_planted.py").write_text(
        body + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    edit_json(folder / "config.json", auto_map={"AutoConfig": "configuration_planted.PlantedConfig"})
    edit_json(
        folder / "tokenizer_config.json",
        auto_map={"AutoTokenizer": [None, "tokenization_planted.PlantedTokenizer"]},
        tokenizer_class=tokenizer_class,
    )


@pytest.fixture
def planted(nemotron, tmp_path):
    folder = shutil.copytree(nemotron, tmp_path / "planted")
    marker = tmp_path / "ran"
    plant_remote_code(folder, marker)
    return folder, marker


def test_load_never_asks_nor_runs_checkpoint_code(planted, monkeypatch):
    folder, marker = planted
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    model, tokenizer = load(str(folder))
    assert tokenizer is not None and not marker.exists()
    assert sys.stdin.read() == YES  # transformers never asked


def test_an_unknown_tokenizer_class_with_auto_map_is_refused_not_run(planted, monkeypatch):
    folder, marker = planted
    edit_json(folder / "tokenizer_config.json", tokenizer_class="PlantedTokenizer")
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    with pytest.raises(DLLMError, match="cannot load the tokenizer .*custom code") as error:
        load(str(folder))
    assert "\n" not in str(error.value) and not marker.exists()
    assert sys.stdin.read() == YES


def test_cli_generate_keeps_stdin_for_the_prompt(planted):
    folder, marker = planted
    result = run("generate", "--model", folder, "-p", "-", "-m", 2, "--no-verbose", input="y\nw5 w17 w42\n")
    assert result.exit_code == 0, result.output
    assert not marker.exists() and "custom code" not in result.output


def test_cli_convert_runs_no_checkpoint_code_and_writes_no_auto_map(planted, tmp_path):
    folder, marker = planted
    out = tmp_path / "out"
    result = run("convert", "--hf-path", folder, "--mlx-path", out, input=YES)
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))
    load(str(out))
    assert not marker.exists()


@pytest.fixture
def draft(hf_checkpoints, tmp_path):
    return shutil.copytree(hf_checkpoints["qwen3_gqa"]["draft"], tmp_path / "draft")


@pytest.fixture
def target(hf_checkpoints, tmp_path):
    return shutil.copytree(hf_checkpoints["qwen3_gqa"]["target"], tmp_path / "target")


def test_force_never_deletes_the_source(draft):
    with pytest.raises(DLLMError, match="overlaps the checkpoint"):
        convert(draft, draft, force=True)
    with pytest.raises(DLLMError, match="overlaps the checkpoint"):
        convert(draft, draft.parent, force=True)
    with pytest.raises(DLLMError, match="overlaps the checkpoint"):
        convert(draft, draft / "mlx")
    assert entries(draft) == ["config.json", "model.safetensors"]


def test_force_never_replaces_a_file_or_a_foreign_folder(draft, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(DLLMError, match="is a file"):
        convert(draft, file, force=True)
    assert file.read_text() == "mine"
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_text("meow")
    with pytest.raises(DLLMError, match="not an mlx-dllm conversion"):
        convert(draft, folder, force=True)
    assert (folder / "cat.jpg").read_text() == "meow"


def test_force_never_deletes_files_added_to_a_conversion(draft, tmp_path):
    out = convert(draft, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DLLMError, match="holds notes.txt, which no conversion writes"):
        convert(draft, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_the_current_directory_is_refused_in_one_line(draft, tmp_path, monkeypatch):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    assert_user_error(run("convert", "--hf-path", draft, "--mlx-path", "."), "the current directory")
    assert_user_error(run("convert", "--hf-path", draft, "--mlx-path", "..", "--force"), "the current directory")
    assert entries(here) == [] and entries(here.parent) == ["here"]


class PathWatch:
    """Records, at every rename/delete/foreign call (Python audit events), whether a path exists."""

    EVENTS = {"os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "ctypes.call_function"}
    path = None
    seen: list = []

    @classmethod
    def hook(cls, event, args):
        if cls.path is not None and event in cls.EVENTS:
            cls.seen.append((event, os.path.lexists(cls.path)))


sys.addaudithook(PathWatch.hook)  # audit hooks cannot be removed: it records only while `path` is set


def test_force_replaces_without_an_instant_where_the_output_is_missing(draft, target, tmp_path):
    out = convert(target, tmp_path / "work" / "out")
    PathWatch.path, PathWatch.seen = str(out), []
    try:
        convert(draft, out, force=True)
    finally:
        PathWatch.path = None
    assert PathWatch.seen and all(exists for _, exists in PathWatch.seen), PathWatch.seen
    assert "tokenizer.json" not in entries(out) and "block_size" in json.loads((out / "config.json").read_text())
    assert entries(tmp_path / "work") == ["out"]


def test_force_without_an_atomic_exchange_still_replaces(draft, target, tmp_path, monkeypatch):
    out = convert(target, tmp_path / "work" / "out")
    monkeypatch.setattr(staging, "exchange", lambda first, second: False)
    convert(draft, out, force=True)
    assert "block_size" in json.loads((out / "config.json").read_text()) and entries(tmp_path / "work") == ["out"]


def test_sigterm_cleans_up_like_ctrl_c(draft, target, tmp_path, monkeypatch):
    out = convert(target, tmp_path / "work" / "out")
    before = entries(out)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(convert_common, "save_config", terminated)
    with pytest.raises(SystemExit) as exit:
        convert(draft, out, force=True)
    assert exit.value.code == 128 + signal.SIGTERM
    assert entries(tmp_path / "work") == ["out"] and entries(out) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def outside_secret(tmp_path: Path, content: str) -> Path:
    secret = tmp_path / "private" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_text(content)
    return secret


def test_a_link_out_of_the_checkpoint_is_refused(target, tmp_path):
    tokenizer = target / "tokenizer.json"
    secret = outside_secret(tmp_path, tokenizer.read_text())  # a valid tokenizer, so only the link is wrong
    tokenizer.unlink()
    tokenizer.symlink_to(secret)
    (tmp_path / "out").mkdir()
    assert_user_error(run("convert", "--hf-path", target, "--mlx-path", tmp_path / "out" / "m"), "tokenizer.json links")
    assert_nothing_written(tmp_path / "out" / "m")
    with pytest.raises(DLLMError, match="tokenizer.json links outside the checkpoint folder"):
        load(str(target))


def test_a_link_out_of_the_lora_folder_is_refused(nemotron, tmp_path):
    source = shutil.copytree(nemotron, tmp_path / "hf")
    adapter = source / "linear_spec_lora" / "adapter_config.json"
    secret = outside_secret(tmp_path, adapter.read_text())
    adapter.unlink()
    adapter.symlink_to(secret)
    with pytest.raises(DLLMError, match="adapter_config.json links outside"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DLLMError, match="adapter_config.json links outside"):
        load(str(source))


def hub_snapshot(source: Path, cache: Path) -> Path:
    """The hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(source.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{index}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{index}"))
    return snapshot


def test_hub_snapshot_links_into_its_blobs_keep_working(target, tmp_path, monkeypatch):
    snapshot = hub_snapshot(target, tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *args, **kwargs: str(snapshot))
    model, tokenizer = load("org/tiny")
    assert tokenizer is not None
    out = convert("org/tiny", tmp_path / "out")
    assert not any(path.is_symlink() for path in out.iterdir())
    with pytest.raises(DLLMError, match="overlaps the checkpoint"):
        convert("org/tiny", snapshot.parent.parent / "mlx")


def test_a_fifo_named_like_the_weights_is_refused(draft, tmp_path):
    (draft / "model.safetensors").unlink()
    os.mkfifo(draft / "model.safetensors")
    with pytest.raises(DLLMError, match="model.safetensors is not a regular file"):
        load(str(draft))
    with pytest.raises(DLLMError, match="model.safetensors is not a regular file"):
        convert(draft, tmp_path / "out")


@pytest.fixture
def converted_target(target, tmp_path):
    return convert(target, tmp_path / "converted")


def test_a_stray_shard_beside_the_index_is_never_merged(converted_target, target, tmp_path):
    weights = mx.load(str(converted_target / "model.safetensors"))
    stale = {name: mx.zeros_like(value) for name, value in weights.items()}
    mx.save_safetensors(str(converted_target / "model-old.safetensors"), stale)
    with pytest.raises(DLLMError, match="model-old.safetensors .* is not named in model.safetensors.index.json"):
        load(str(converted_target))
    shutil.copy(converted_target / "model-old.safetensors", target / "model-old.safetensors")
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(weights, "model.safetensors")})
    )
    with pytest.raises(DLLMError, match="is not named in"):
        convert(target, tmp_path / "again")


def test_the_index_names_only_files_beside_it(converted_target):
    index = converted_target / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"] = dict.fromkeys(content["weight_map"], "../model.safetensors")
    index.write_text(json.dumps(content))
    with pytest.raises(DLLMError, match="shards must be model\\*.safetensors files beside it"):
        load(str(converted_target))
    content["weight_map"] = dict.fromkeys(content["weight_map"], "model-00002-of-00002.safetensors")
    index.write_text(json.dumps(content))
    with pytest.raises(DLLMError, match="names model-00002-of-00002.safetensors, which is missing"):
        load(str(converted_target))


def hub_error(kind: str):
    from httpx2 import Request, Response
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if kind == "offline":
        return LocalEntryNotFoundError(
            "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
            "outgoing traffic has been disabled. To enable repo look-ups and downloads online, set "
            "'HF_HUB_OFFLINE=0' as environment variable."
        )
    url = "https://huggingface.co/api/models/org/missing/revision/main"
    return RepositoryNotFoundError(
        "404 Client Error. (Request ID: Root=1-abc)\n\nRepository Not Found for url: " + url + ".\n"
        "Please make sure you specified the correct `repo_id` and `repo_type`.",
        response=Response(404, request=Request("GET", url)),
    )


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("offline", "LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder"),
        ("missing", "RepositoryNotFoundError: Repository Not Found for url: https://huggingface.co/api/models/org"),
    ],
)
def test_hub_failures_keep_the_hubs_reason(kind, reason, monkeypatch):
    def failing(*args, **kwargs):
        raise hub_error(kind)

    monkeypatch.setattr("huggingface_hub.snapshot_download", failing)
    with pytest.raises(DLLMError, match="cannot fetch org/missing from the hub: ") as error:
        load("org/missing")
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_force_never_swaps_in_a_conversion_that_cannot_load(nemotron, draft, tmp_path):
    out = convert(draft, tmp_path / "out")
    before = {file.name: file.read_bytes() for file in out.iterdir()}
    source = shutil.copytree(nemotron, tmp_path / "hf")
    edit_json(source / "linear_spec_lora" / "adapter_config.json", target_modules=["q_proj"])
    with pytest.raises(DLLMError, match="the conversion would not load, so .* is left as it was: LoRA targets"):
        convert(source, out, force=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    with pytest.raises(DLLMError, match="no tokenizer in"):
        convert(source, out, force=True)
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before
    assert entries(tmp_path) == ["draft", "hf", "out"]


def poison(folder: Path, name: str, value: float) -> None:
    weights = mx.load(str(folder / "model.safetensors"))
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 3, value, weights[name])
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


NAME = "layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "value, options",
    [(float("nan"), {}), (float("inf"), {}), (float("nan"), {"quantize": True, "q_group_size": 32})],
)
def test_non_finite_weights_are_refused_at_convert(draft, tmp_path, value, options):
    poison(draft, NAME, value)
    (tmp_path / "out").mkdir()
    with pytest.raises(DLLMError, match=rf"tensor {NAME} in model.safetensors holds NaN or Inf"):
        convert(draft, tmp_path / "out" / "m", **options)
    assert entries(tmp_path / "out") == []


def test_float16_overflow_is_refused_at_convert(draft, tmp_path):
    poison(draft, NAME, 1e6)
    with pytest.raises(DLLMError, match=rf"tensor {NAME} .*NaN or Inf \(float16 overflows"):
        convert(draft, tmp_path / "out", dtype="float16")
    convert(draft, tmp_path / "out", dtype="bfloat16")


def test_non_finite_weights_are_refused_at_load(draft, target):
    poison(draft, NAME, float("nan"))
    with pytest.raises(DLLMError, match=rf"tensor {NAME} in .* holds NaN or Inf"):
        load(str(draft))
    load(str(draft), lazy=True)  # lazy loading reads no weights, so it cannot look at them
    poison(target, "model.layers.0.self_attn.o_proj.weight", float("inf"))
    with pytest.raises(DLLMError, match=r"tensor model.layers.0.self_attn.o_proj.weight in .* holds NaN or Inf"):
        load(str(target))


def raise_oserror(code: int):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return failing


@pytest.mark.parametrize(
    "patch, code",
    [
        (lambda monkeypatch, f: monkeypatch.setattr(mx, "save_safetensors", f), errno.ENOSPC),
        (lambda monkeypatch, f: monkeypatch.setattr(Path, "mkdir", f), errno.EROFS),
        (lambda monkeypatch, f: monkeypatch.setattr(convert_common.shutil, "copy", f), errno.EIO),
    ],
)
def test_write_failures_are_one_line_and_leave_nothing(target, tmp_path, monkeypatch, patch, code):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m"
    patch(monkeypatch, raise_oserror(code))
    result = run("convert", "--hf-path", target, "--mlx-path", out)
    assert_user_error(result, f"cannot write {out}: {os.strerror(code)}")
    monkeypatch.undo()
    assert_nothing_written(out)


def test_a_finite_tensor_whose_sum_overflows_is_not_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    ones = mx.ones((100_000,), dtype=mx.float16)  # its float16 sum is inf; its elements are fine
    mx.save_safetensors(str(file), {"big": ones})
    convert_common.check_finite_files([file])
    mx.save_safetensors(str(file), {"big": mx.where(mx.arange(100_000) == 7, float("nan"), ones)})
    with pytest.raises(DLLMError, match="tensor big in model.safetensors holds NaN or Inf"):
        convert_common.check_finite_files([file])


def test_a_link_out_of_the_extra_chat_templates_is_refused(target, tmp_path):
    templates = target / "additional_chat_templates"
    templates.mkdir()
    (templates / "tools.jinja").symlink_to(outside_secret(tmp_path, "{{ messages }}"))
    with pytest.raises(DLLMError, match="tools.jinja links outside the checkpoint folder"):
        load(str(target))
