"""DFlash2 drafters without the reference (tests/test_dflash2_reference.py compares them with it): the tiny family
loads and drafts losslessly as chains and as trees through its candidate lattice, and configs it cannot draft from
are one line each."""

import json
import re
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_dllm
from mlx_dllm import DLLMError
from mlx_dllm.benchmark.tiny import VOCAB, build_tiny
from mlx_dllm.models import dflash2
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.sampler.tree import Lattice
from tests.oracle import record_chain_proposals

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    target, draft = build_tiny("dflash2", tmp_path_factory.mktemp("tiny"))
    model, tokenizer = mlx_dllm.load(str(target))
    return model, tokenizer, draft


def test_greedy_chains_are_the_selectors_path_and_lossless(tiny, monkeypatch):
    model, tokenizer, folder = tiny
    draft, _ = mlx_dllm.load(str(folder))
    assert type(draft) is dflash2.Model
    ar = mlx_dllm.generate(model, tokenizer, PROMPT, max_tokens=24)
    seen = record_chain_proposals(monkeypatch)
    responses = list(mlx_dllm.stream_generate(model, tokenizer, PROMPT, 24, draft_model=draft, speculation="chain"))
    assert "".join(r.text for r in responses) == ar
    assert seen and responses[-1].speculation["chain"] == 1.0
    # Each proposal is the selector's walk over the head's logits, which the argmax at each position is not always.
    target = dflash_strategy.bind_target(draft, model)
    head = dflash_strategy.DraftHead(draft, target)
    hidden = mx.random.normal((7, draft.hidden_size), key=mx.random.key(3))
    logits = target.lm_head(hidden)
    path = head(hidden, 5)
    assert path.tolist() == _walk(draft, hidden, logits, 5)
    assert path.tolist() != mx.argmax(logits, axis=-1).tolist()


def _walk(draft, hidden, logits, anchor):
    """The selector's rule, spelled out: the best of each position's top-k by logit + pred(previous) . W h . succ."""
    selector = draft.candidate_selector
    path, previous = [], anchor
    for position in range(hidden.shape[0]):
        candidates = mx.argsort(-logits[position])[: selector.top_k].tolist()
        projected = selector.hidden_projection(hidden[position])
        code = selector.predecessor_codebook.weight[previous] * projected
        scores = [logits[position, c].item() + (code * selector.successor_codebook.weight[c]).sum().item()
                  for c in candidates]
        previous = candidates[max(range(len(scores)), key=scores.__getitem__)]
        path.append(previous)
    return path


def test_a_draft_vocab_chooses_among_its_own_tokens(tiny, tmp_path, monkeypatch):
    model, tokenizer, folder = tiny
    vocab = list(range(2, VOCAB, 3))
    config = json.loads((folder / "config.json").read_text())
    config["dflash_config"]["draft_vocab"] = vocab
    shutil.copytree(folder, tmp_path / "vocab")
    (tmp_path / "vocab" / "config.json").write_text(json.dumps(config))
    draft, _ = mlx_dllm.load(str(tmp_path / "vocab"))
    seen = record_chain_proposals(monkeypatch)
    ar = mlx_dllm.generate(model, tokenizer, PROMPT, max_tokens=16)
    assert mlx_dllm.generate(model, tokenizer, PROMPT, max_tokens=16, draft_model=draft, speculation="chain") == ar
    assert seen and all(token in vocab for block in seen for token in block)


def test_the_lattice_scores_every_candidate_given_every_candidate_before_it(tiny):
    """Brute force: position p's candidates, given candidate c of position p - 1 (the anchor at p = 0), score
    logit + pred(c) . W h_p . succ, normalised over the K candidates; and following each row's best from the anchor
    retraces the selector's greedy walk."""
    model, _, folder = tiny
    draft, _ = mlx_dllm.load(str(folder))
    head = dflash_strategy.DraftHead(draft, dflash_strategy.bind_target(draft, model))
    hidden = mx.random.normal((5, draft.hidden_size), key=mx.random.key(4))
    logits = head.logits(hidden)
    selector = draft.candidate_selector
    K = selector.top_k
    tokens, ranked, log_probs = (part.tolist() for part in head.lattice(hidden, 9, width=K))
    lattice = Lattice(tokens, ranked, log_probs)
    for position in range(5):
        assert sorted(tokens[position]) == sorted(mx.argsort(-logits[position])[:K].tolist())
        projected = selector.hidden_projection(hidden[position])
        parents = [9] * K if position == 0 else tokens[position - 1]
        for parent_index, parent in enumerate(parents):
            code = selector.predecessor_codebook.weight[parent] * projected
            scores = mx.array([logits[position, c].item() + (code * selector.successor_codebook.weight[c]).sum().item()
                               for c in tokens[position]])
            expected = (scores - mx.logsumexp(scores)).tolist()
            order, given = lattice.row(position, parent_index)
            assert list(order) == sorted(range(K), key=lambda i: -expected[i])
            assert given == pytest.approx([expected[i] for i in order], abs=1e-5)
    walk, choice = [], 0
    for position in range(5):
        choice = lattice.row(position, choice)[0][0]
        walk.append(tokens[position][choice])
    assert walk == _walk(draft, hidden, logits, 9)


@pytest.mark.parametrize(
    "options", [{"speculation": "tree"}, {"speculation": "auto"}, {"tree_budget": 12}], ids=["tree", "auto", "budget"]
)
def test_trees_through_the_lattice_are_lossless(tiny, options):
    model, tokenizer, folder = tiny
    draft, _ = mlx_dllm.load(str(folder))
    ar = mlx_dllm.generate(model, tokenizer, PROMPT, max_tokens=24)
    responses = list(mlx_dllm.stream_generate(model, tokenizer, PROMPT, 24, draft_model=draft, **options))
    assert "".join(r.text for r in responses) == ar
    if "speculation" not in options or options["speculation"] == "tree":
        assert responses[-1].speculation["tree"] > 0


def _args(**changes):
    config = json.loads(json.dumps(dflash2.FAMILY.tiny.config))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
            config["dflash_config"].pop(key, None)
        elif key in dflash2.FIELDS or key == "draft_vocab":
            config["dflash_config"][key] = value
        else:
            config[key] = value
    return dflash2.ModelArgs.from_dict(config)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"selector_rank": None}, "DFlash2 config is missing selector_rank"),
        ({"vocab_size": None}, "DFlash2 config is missing vocab_size"),
        ({"conv_kernel_size": 0}, "conv_kernel_size must be an integer between 1 and 256, got 0"),
        ({"conv_kernel_size": 1000}, "conv_kernel_size must be an integer between 1 and 256, got 1000"),
        ({"conv_group_size": 128}, "conv_group_size must be an integer between 1 and 64, got 128"),
        ({"conv_group_size": 24}, "conv_group_size 24 does not divide hidden_size 64"),
        ({"selector_rank": "8"}, "selector_rank must be an integer between 1 and 4096, got '8'"),
        ({"selector_rank": True}, "selector_rank must be an integer between 1 and 4096, got True"),
        ({"selector_top_k": 2.0}, "selector_top_k must be an integer between 1 and 1024, got 2.0"),
        ({"selector_top_k": 300}, "selector_top_k 300 exceeds the 256 tokens it drafts from"),
        ({"draft_vocab": [3, 4, 5]}, "selector_top_k 4 exceeds the 3 tokens it drafts from"),
    ],
)
def test_a_config_it_cannot_draft_from_is_one_line(changes, message):
    with pytest.raises(DLLMError, match=re.escape(message)) as error:
        _args(**changes)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 128}, "the target's head has 256 tokens, the DFlash2 drafter's codebooks 128"),
        ({"vocab_size": 512, "selector_top_k": 300}, "the target's head has 256 tokens, fewer than the DFlash2"),
    ],
)
def test_a_target_head_the_codebooks_do_not_cover_is_refused(tiny, changes, message):
    model, tokenizer, _ = tiny
    draft = dflash2.Model(_args(mask_token_id=100, **changes))
    with pytest.raises(DLLMError, match=re.escape(message)):
        mlx_dllm.generate(model, tokenizer, PROMPT, max_tokens=4, draft_model=draft)


def test_the_trainer_starts_from_a_dflash2_drafter_with_all_its_weights(tiny):
    """`train-drafter --init` reads a DFlash2 folder (tests/test_train_dflash2.py trains from one)."""
    from mlx_dllm.training.warm_start import read_initial_drafter

    model, _, folder = tiny
    initial = read_initial_drafter(str(folder), model.args)
    draft, _ = mlx_dllm.load(str(folder))
    assert initial.arch == "dflash2" and [name for name, _ in initial.weights] == [
        name for name, _ in tree_flatten(draft.parameters())
    ]


def test_the_benchmark_sweeps_its_chains_trees_and_auto():
    from mlx_dllm.benchmark.session import SWEEP_BUDGETS, sweep_methods

    draft = dflash2.Model(_args())
    methods = sweep_methods(draft)
    assert methods[: draft.block_size - 1] == [f"dflash:speculation=chain:block_size={b}"
                                                for b in range(2, draft.block_size + 1)]
    assert methods[draft.block_size - 1:] == [f"dflash:speculation=tree:tree_budget={b}" for b in SWEEP_BUDGETS] + [
        "dflash:speculation=auto"]
