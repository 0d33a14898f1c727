"""Bad input that used to crash, hang or print a traceback: each is one `Error:` line (or one DLLMError) now."""

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from transformers import PreTrainedTokenizerFast

import mlx_dllm
from mlx_dllm import DLLMError, chat_template
from mlx_dllm.benchmark import tiny
from mlx_dllm.kernels import patterns
from mlx_dllm.models import nemotron_diffusion

attention = importlib.import_module("mlx_dllm.kernels.attention")  # the package exports its function by that name


@pytest.fixture(scope="module")
def long_context_nemotron(tmp_path_factory):
    """A tiny Nemotron-Labs-Diffusion whose positions allow a 100,000-token block, as a real checkpoint's do."""
    folder = tmp_path_factory.mktemp("nld") / "model"
    tiny.save_checkpoint({**nemotron_diffusion.FAMILY.tiny.config, "max_position_embeddings": 262144}, folder, 0)
    return folder


def _generate(*args, stdin=None, timeout=120):
    environment = {**os.environ, "MLX_DLLM_BLAS_PRELOADED": "1"}
    command = [sys.executable, "-m", "mlx_dllm.cli", "generate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, input=stdin)


def _last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "mode, max_tokens, shape", [("diffusion", 8, "100000 x 100002"), ("linear-spec", 100000, "99999 x 100001")]
)
def test_a_block_whose_attention_cannot_fit_is_one_error_line_not_a_segfault(
    long_context_nemotron, mode, max_tokens, shape
):
    # Before: SIGSEGV (MLX's failed allocation of 4 x 100,000 x 100,002 scores killed the process).
    result = _generate(
        "--model",
        long_context_nemotron,
        "-p",
        "w5 w6",
        "--ignore-chat-template",
        "--mode",
        mode,
        "--block-length",
        100000,
        "-m",
        max_tokens,
    )
    assert result.returncode == 1, result.stderr
    assert _last_line(result).startswith(f"Error: attention over {shape} positions needs ")


def test_attention_that_fits_runs_and_one_that_does_not_is_refused_before_mlx(monkeypatch):
    queries = mx.zeros((1, 4, 64, 16))
    keys = mx.zeros((1, 2, 64, 16))
    assert attention.attention(queries, keys, keys, 0.25, patterns.bidirectional()).shape == (1, 4, 64, 16)
    monkeypatch.setattr(attention, "memory_size", lambda: 4 * 64 * 64 * attention.CPU_SCORE_BYTES - 1)
    with pytest.raises(DLLMError, match="attention over 64 x 64 positions needs 0 GiB, more than the 0 GiB"):
        attention.attention(queries, keys, keys, 0.25, patterns.bidirectional())
    with pytest.raises(DLLMError, match="attention over 64 x 64 positions"):
        attention.masked_attention(queries, keys, keys, 0.25, mx.ones((1, 1, 64, 64), dtype=mx.bool_))
    # A GPU streams the scores: only a 64 x 64 boolean mask is materialized there.
    monkeypatch.setattr(attention.routing, "current_backend", lambda: "metal")
    attention.check_fits(4, 64, 64)
    monkeypatch.setattr(attention, "memory_size", lambda: 64 * 64 - 1)
    with pytest.raises(DLLMError, match="attention over 64 x 64 positions"):
        attention.check_fits(4, 64, 64)


@pytest.fixture
def templated(long_context_nemotron):
    return PreTrainedTokenizerFast.from_pretrained(str(long_context_nemotron))


NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}w5"
HUGE_OUTPUT = "{{ 'w5 ' * 10000000 }}"
MESSAGES = [{"role": "user", "content": "w5 w6"}]


def test_a_template_that_loops_for_hours_is_stopped_by_the_render_budget(templated, monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    templated.chat_template = NESTED_LOOPS
    start = time.monotonic()
    with pytest.raises(DLLMError, match="the chat template did not finish rendering within 0.5 s"):
        chat_template.template_ids(templated, MESSAGES)
    assert time.monotonic() - start < 5
    templated.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert chat_template.template_ids(templated, MESSAGES) == templated.encode("w5 w6")  # the budget is gone


def test_a_template_that_renders_too_much_or_runs_out_of_memory_is_one_line(templated, monkeypatch):
    templated.chat_template = HUGE_OUTPUT
    with pytest.raises(DLLMError, match="the chat template rendered 30,000,000 characters, more than 16,777,216"):
        chat_template.template_ids(templated, MESSAGES)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(templated, "apply_chat_template", out_of_memory)
    with pytest.raises(DLLMError, match="the chat template's output does not fit in memory"):
        chat_template.template_ids(templated, MESSAGES)


def test_generate_with_a_hanging_template_ends_with_one_error_line(long_context_nemotron, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in long_context_nemotron.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(long_context_nemotron))
    tokenizer.chat_template = NESTED_LOOPS
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer.json").unlink()
    tokenizer.save_pretrained(str(folder))
    start = time.monotonic()
    result = _generate("--model", folder, "-p", "w5 w6", "-m", 4, timeout=120)
    assert result.returncode == 1 and _last_line(result) == (
        f"Error: the chat template did not finish rendering within {chat_template.RENDER_SECONDS:g} s"
    ), result.stderr
    assert time.monotonic() - start < chat_template.RENDER_SECONDS + 60


def _overflowing(folder: Path):
    """The checkpoint with every down projection at 3e38: finite weights whose activations overflow."""
    model, tokenizer = mlx_dllm.load(str(folder))
    huge = [
        (name, mx.full(value.shape, 3e38, value.dtype))
        for name, value in tree_flatten(model.parameters())
        if "down_proj" in name and mx.issubdtype(value.dtype, mx.floating)
    ]
    assert huge
    model.load_weights(huge, strict=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.build_tiny(family, root / family) for family in ("dflash", "nemotron", "diffusion-gemma")}


@pytest.mark.parametrize(
    "family, options",
    [
        ("dflash", {"mode": "ar"}),
        ("dflash", {"mode": "ar", "temp": 1.0}),
        ("dflash", {"mode": "dflash"}),
        ("nemotron", {"mode": "ar"}),
        ("nemotron", {"mode": "diffusion"}),
        ("nemotron", {"mode": "linear-spec"}),
        ("nemotron", {"mode": "quadratic-spec"}),
        ("diffusion-gemma", {"mode": "diffusion"}),
    ],
)
def test_logits_that_overflow_stop_generation_with_one_error_line(tiny_folders, family, options):
    # Before: "w0 w0 w0 w0" (NaN logits: argmax picks index 0), exit 0.
    model_folder, draft_folder = tiny_folders[family]
    model, tokenizer = _overflowing(model_folder)
    draft = mlx_dllm.load(str(draft_folder))[0] if options["mode"] == "dflash" else None
    with pytest.raises(DLLMError, match=r"^the model's logits are not finite \(NaN or Inf\)"):
        mlx_dllm.generate(model, tokenizer, [5, 6, 7], 8, draft_model=draft, **options)


def test_a_prompt_chunk_whose_attention_cannot_fit_is_refused_for_any_target(tiny_folders, monkeypatch):
    # The sibling in mlx-lm's own attention: one prefill chunk over a long prompt (a huge --prefill-step-size).
    model, tokenizer = mlx_dllm.load(str(tiny_folders["dflash"][0]))
    prompt = list(range(2, 66))
    monkeypatch.setattr(attention, "memory_size", lambda: 4 * 64 * 64 * attention.CPU_SCORE_BYTES - 1)
    with pytest.raises(DLLMError, match="attention over 64 x 64 positions"):
        next(mlx_dllm.stream_generate(model, tokenizer, prompt, 2, prefill_step_size=4096))
    assert next(mlx_dllm.stream_generate(model, tokenizer, prompt, 2, prefill_step_size=32)).tokens  # 32 x 64 fits


def test_api_text_that_is_not_utf8_is_one_line(tiny_folders):
    # The CLI refuses such bytes by flag; the API took them to the tokenizer, which raised a traceback's error.
    model, tokenizer = mlx_dllm.load(str(tiny_folders["dflash"][0]))
    with pytest.raises(DLLMError, match="the prompt is not UTF-8 text \\(a lone surrogate at character 3\\)"):
        next(mlx_dllm.stream_generate(model, tokenizer, "w5 \udcff", 2))
    with pytest.raises(DLLMError, match="a stop string is not UTF-8 text"):
        next(mlx_dllm.stream_generate(model, tokenizer, "w5 w6", 2, stop=["\udcfe"]))


def test_weights_whose_squares_overflow_are_refused_at_load_by_name(tiny_folders, tmp_path):
    # Before: every weight at 3e38 loaded, and its norms turned the overflow into zeros: "w0 w0 w0 w0", exit 0.
    source = tiny_folders["dflash"][0]
    folder = tmp_path / "huge"
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"] = mx.full(weights["model.embed_tokens.weight"].shape, 3e38)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(DLLMError, match="tensor model.embed_tokens.weight in .* holds values beyond 2\\^64"):
        mlx_dllm.load(str(folder))
    # A float16 tensor whose plain sum overflows (the screen fails) but whose values are sound still loads.
    weights["model.embed_tokens.weight"] = mx.full(weights["model.embed_tokens.weight"].shape, 2000.0)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    assert mlx_dllm.load(str(folder))[0] is not None
