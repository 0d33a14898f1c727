"""The shared front: stopping at EOS and stop strings, max_tokens, and one-line errors for bad options."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mlx_dllm import DLLMError, stream_generate

harness = pytest.importorskip("tests.reference.harness")

PROMPT = [100, 3, 3, 250, 7, 64, 12]


def _run(target, tokenizer, max_tokens, **options):
    responses = list(stream_generate(target, tokenizer, PROMPT, max_tokens, **options))
    return [t for r in responses for t in r.tokens], "".join(r.text for r in responses), responses[-1]


@pytest.mark.parametrize("use_draft", [False, True], ids=["ar", "dflash"])
def test_stops_at_eos_without_emitting_it(models, monkeypatch, use_draft):
    target, tokenizer, draft = models
    reference = [int(t) for t, _ in generate_step(mx.array(PROMPT), target, max_tokens=30)]
    eos = reference[9]
    monkeypatch.setattr(tokenizer, "eos_token_ids", [eos])
    tokens, _, last = _run(target, tokenizer, 30, draft_model=draft if use_draft else None)
    assert tokens == reference[: reference.index(eos)]
    assert last.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 16])
def test_dflash_emits_exactly_max_tokens(models, monkeypatch, max_tokens):
    target, tokenizer, draft = models
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    tokens, _, last = _run(target, tokenizer, max_tokens, draft_model=draft, block_size=8)
    assert len(tokens) == last.generation_tokens == max_tokens
    assert last.finish_reason == "length"


def test_stop_string_cuts_the_text(models, monkeypatch):
    target, tokenizer, draft = models
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    _, full_text, _ = _run(target, tokenizer, 12, draft_model=draft)
    words = full_text.split()
    stop = f" {words[4]}"
    _, text, last = _run(target, tokenizer, 12, draft_model=draft, stop=[stop])
    assert text == full_text[: full_text.index(stop)]
    assert last.finish_reason == "stop"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_tokens": 0}, "max_tokens must be positive"),
        ({"block_size": 1}, "block size must be at least 2"),
        ({"block_size": 9}, "between 2 and the drafter's trained 8"),
        ({"mode": "bogus"}, "unknown mode"),
        ({"temp": -1.0}, "temp must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
    ],
)
def test_bad_options_raise_one_line_errors(models, options, message):
    target, tokenizer, draft = models
    options = {"max_tokens": 5, "draft_model": draft, **options}
    with pytest.raises(DLLMError, match=message) as error:
        list(stream_generate(target, tokenizer, PROMPT, **options))
    assert "\n" not in str(error.value)


def test_dflash_mode_needs_a_draft(models):
    target, tokenizer, _ = models
    with pytest.raises(DLLMError, match="needs a draft model"):
        list(stream_generate(target, tokenizer, PROMPT, 5, mode="dflash"))
