"""Modes and drafters are declared once: the front, the CLI, the server and the benchmark read the declarations,
so a new mode or a second drafter architecture is a new file."""

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

from mlx_dllm import DLLMError, stream_generate
from mlx_dllm.benchmark import roofline, runner
from mlx_dllm.cli import main
from mlx_dllm.models import diffusion_gemma, dflash, nemotron_diffusion
from mlx_dllm.models.drafter import is_drafter
from mlx_dllm.sampler import ar, mode
from mlx_dllm.sampler.mode import TARGET_MODES, Mode, Option, all_modes, declaration, modes_of, served_options
from mlx_dllm.server import requests

pytest.importorskip("tests.reference.harness")

PROMPT = [100, 3, 3, 250, 7, 64, 12]


def test_every_mode_a_model_names_is_declared_in_its_strategy_file():
    named = [TARGET_MODES] + [m.Model.modes for m in (dflash, diffusion_gemma, nemotron_diffusion)]
    for modes in named:
        for name, file in modes.items():
            assert declaration(file).name == name
    files = {file for modes in named for file in modes.values()}
    assert {declaration(file) for file in files} == set(all_modes())  # and nothing undeclared runs


def test_the_declared_facts():
    facts = {(m.name, m.lossless, m.honours_sampler, m.drafter) for m in all_modes()}
    assert facts == {
        ("ar", True, True, False),
        ("dflash", True, True, True),
        ("linear-spec", True, True, False),
        ("quadratic-spec", True, True, False),
        ("diffusion", False, False, False),  # DiffusionGemma's uniform noise and Nemotron's unmasking
    }


@pytest.mark.parametrize(
    "option, value, message",
    [
        (Option("n", int, "", minimum=2, label="block length"), 1, "block length must be at least 2, got 1"),
        (Option("n", int, "", minimum=2), 2.0, "n must be an integer, got 2.0"),
        (Option("n", int, "", minimum=0), True, "n must be an integer, got True"),
        (Option("x", float, "", minimum=0, maximum=1), 1.5, r"x must be a number in \[0, 1\], got 1.5"),
        (Option("x", float, "", minimum=0, above_minimum=True), 0, "x must be > 0, got 0"),
        (Option("x", float, ""), math.nan, "x must be a finite number, got nan"),
        (Option("x", float, ""), "0.5", "x must be a finite number, got '0.5'"),
        (Option("b", bool, ""), 1, "b must be true or false, got 1"),
        (Option("f", callable, "", public=False), 3, "f must be callable, got int"),
    ],
)
def test_an_option_checks_its_type_and_range_in_one_line(option, value, message):
    with pytest.raises(DLLMError, match=message):
        option.check(value)


def test_an_option_of_another_mode_is_refused_with_its_owner_and_none_means_the_default():
    quadratic = declaration("quadratic_spec")
    with pytest.raises(DLLMError, match=r"unknown option lora for mode quadratic-spec \(lora, --no-lora, is for"):
        quadratic.check_options({"lora": False})
    with pytest.raises(DLLMError, match="unknown option telepathy for mode quadratic-spec$"):
        quadratic.check_options({"telepathy": 1})
    assert quadratic.check_options({"block_length": None, "max_thinking_tokens": 3}) == {"max_thinking_tokens": 3}
    assert declaration("mask_diffusion").check_options({"threshold": None}) == {"threshold": None}  # its schedule


def test_one_option_name_is_one_declaration():
    seen = {}
    for declared in all_modes():
        for option in declared.options:
            assert seen.setdefault(option.name, option) == option, option.name


def test_the_cli_and_the_server_take_every_served_option():
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    for option in served_options():
        assert option.cli_flag in help_text
        assert option.name in requests.OURS
    hooks = {o.name for m in all_modes() for o in m.options if not o.served}
    assert hooks == {"on_step", "noise", "end_think_token_id"} and not hooks & set(requests.OURS)


def _echo(model, prompt, *, select, stats, max_tokens, options, **_):
    """A toy strategy: repeats `token` (its option), one per step."""
    stats.mark_prefill()
    while True:
        stats.forwards += 1
        yield [options.get("token", 7)]


ECHO = Mode(
    "echo",
    _echo,
    lossless=False,
    samples=False,
    honours_sampler=False,
    step_forwards=lambda model, draft, block: [(model, 1), (model, 1)],
    options=(Option("token", int, "the token to repeat", minimum=0),),
)


class EchoingTarget(nn.Module):
    """A model that runs the echo mode beside AR and DFlash: a new mode is its declaration and a name in `modes`."""

    modes = {**TARGET_MODES, "echo": "echo"}

    def __init__(self, model):
        super().__init__()
        self.inner = model


def test_a_new_mode_is_one_declaration_that_every_front_reads(models, monkeypatch):
    target, tokenizer, _ = models
    real = mode.declaration
    monkeypatch.setattr(mode, "declaration", lambda file: ECHO if file == "echo" else real(file))
    model = EchoingTarget(target)
    tokens = [t for r in stream_generate(model, tokenizer, PROMPT, 4, mode="echo", token=9) for t in r.tokens]
    assert tokens == [9, 9, 9, 9]
    with pytest.raises(DLLMError, match="unknown option block_length for mode echo"):
        next(stream_generate(model, tokenizer, PROMPT, 4, mode="echo", block_length=4))
    with pytest.raises(DLLMError, match="token must be at least 0"):
        next(stream_generate(model, tokenizer, PROMPT, 4, mode="echo", token=-1))
    run = runner.runners(model, ["ar", "echo"])
    assert run["echo"](model, tokenizer, PROMPT, 3).tokens == [7, 7, 7]
    assert runner.lossless(model, ["mlx_lm", "ar", "echo"]) == {"mlx_lm", "ar"}
    speedups = roofline.project("M3 Max", model, None, {"ar": 1.0, "echo": 1.0})
    assert speedups == pytest.approx({"ar": 1.0, "echo": 0.5})  # its step: two forwards for one token


def test_a_mode_replaced_in_its_file_is_what_runs(models, monkeypatch):
    target, tokenizer, _ = models
    monkeypatch.setattr(ar, "MODE", dataclasses.replace(ar.MODE, run=ECHO.run))
    assert [r.tokens for r in stream_generate(target, tokenizer, PROMPT, 2, mode="ar")] == [[7], [7]]
    assert modes_of(target)["ar"].run is ECHO.run


class WrappedDrafter(nn.Module):
    """A drafter of another architecture as far as the strategy can tell: not the DFlash class, only the
    interface of models/drafter.py (here computing with a DFlash drafter's layers)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.block_size, self.mask_token_id = inner.block_size, inner.mask_token_id
        self.target_layer_ids, self.hidden_size = inner.target_layer_ids, inner.hidden_size
        self.draft_vocab = inner.draft_vocab

    def __call__(self, block_embeddings, target_features, cache, start=0):
        return self.inner(block_embeddings, target_features, cache, start)

    def make_cache(self):
        return self.inner.make_cache()

    def logits(self, head_logits):
        return self.inner.logits(head_logits)


def test_a_second_drafter_architecture_meets_the_interface_and_decodes_losslessly(models):
    target, tokenizer, draft = models
    wrapped = WrappedDrafter(draft)
    assert is_drafter(wrapped) and is_drafter(draft) and not is_drafter(target)
    ours = [t for r in stream_generate(target, tokenizer, PROMPT, 24, draft_model=wrapped) for t in r.tokens]
    reference = [r.token for r in mlx_lm_stream_generate(target, tokenizer, mx.array(PROMPT), 24)]
    assert ours == reference[: len(ours)] and len(ours) >= 20
