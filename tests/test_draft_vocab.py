"""A drafter's `draft_vocab`: it proposes only those tokens, from those rows of the target's head, and DFlash
stays lossless."""

import json
import shutil

import mlx.core as mx
import pytest

import mlx_dllm
from mlx_dllm.benchmark.tiny import VOCAB, build_tiny
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.oracle import record_chain_proposals


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("dflash", tmp_path_factory.mktemp("tiny"))


def with_vocab(draft, folder, vocab):
    shutil.copytree(draft, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("dflash_config", {})["draft_vocab"] = vocab
    (folder / "config.json").write_text(json.dumps(config))
    return mlx_dllm.load(str(folder))[0]


def test_the_whole_vocabulary_as_draft_vocab_changes_nothing(tiny, tmp_path, monkeypatch):
    target, draft = tiny
    model, tokenizer = mlx_dllm.load(str(target))
    runs = []
    for drafter in (mlx_dllm.load(str(draft))[0], with_vocab(draft, tmp_path / "all", list(range(VOCAB)))):
        seen = record_chain_proposals(monkeypatch)
        text = mlx_dllm.generate(model, tokenizer, "w5 w6 w7", max_tokens=24, draft_model=drafter, speculation="chain")
        runs.append((text, seen))
        monkeypatch.undo()
    assert runs[0] == runs[1] and runs[0][1]


def test_a_draft_vocab_proposes_only_its_tokens_and_output_equals_ar(tiny, tmp_path, monkeypatch):
    target, draft = tiny
    model, tokenizer = mlx_dllm.load(str(target))
    prompt = "w5 w6 w7"
    ar = mlx_dllm.generate(model, tokenizer, prompt, max_tokens=24)
    full_ids = [t for block in [list(r.tokens) for r in mlx_dllm.stream_generate(model, tokenizer, prompt, 24)]
                for t in block]
    vocab = sorted(set(full_ids[::2]) | set(range(100, 140)))  # half of what AR says, and some it does not
    drafter = with_vocab(draft, tmp_path / "some", vocab)
    seen = record_chain_proposals(monkeypatch)
    assert mlx_dllm.generate(model, tokenizer, prompt, max_tokens=24, draft_model=drafter, speculation="chain") == ar
    assert seen and all(token in vocab for block in seen for token in block)
    for speculation in ("tree", "auto"):
        assert mlx_dllm.generate(model, tokenizer, prompt, max_tokens=24, draft_model=drafter,
                                 speculation=speculation) == ar
    # Each proposal is the argmax of the full head's logits over the draft vocabulary's columns.
    target_adapter = dflash_strategy.bind_target(drafter, model)
    hidden = mx.random.normal((1, 3, drafter.args.hidden_size))
    head = dflash_strategy.DraftHead(drafter, target_adapter)
    full = target_adapter.lm_head(hidden)[..., mx.array(vocab)]
    assert head(hidden, 5).tolist() == mx.array(vocab)[mx.argmax(full, axis=-1)].tolist()  # any anchor: v1 ignores it
    # A tree's candidates: the draft vocabulary's best 4 per position, their log-probabilities over it alone.
    tokens, log_probs = head.top(hidden, 4)
    ranked = mx.argsort(-full, axis=-1)[..., :4]
    assert tokens.tolist() == mx.array(vocab)[ranked].tolist()
    expected = mx.take_along_axis(full - mx.logsumexp(full, axis=-1, keepdims=True), ranked, axis=-1)
    assert mx.allclose(log_probs, expected, atol=1e-5)


@pytest.mark.parametrize("vocab, message", [
    ([5, 3], "draft_vocab must be a non-empty, increasing list"),
    ([1, "2"], "draft_vocab must be a non-empty, increasing list"),
    ([3, VOCAB + 7], f"draft_vocab token {VOCAB + 7} is outside the target's head"),
])
def test_a_bad_draft_vocab_is_one_error(tiny, tmp_path, vocab, message):
    target, draft = tiny
    model, tokenizer = mlx_dllm.load(str(target))
    with pytest.raises(mlx_dllm.DLLMError, match=message):
        drafter = with_vocab(draft, tmp_path / "bad", vocab)
        mlx_dllm.generate(model, tokenizer, "w5", max_tokens=4, draft_model=drafter)
