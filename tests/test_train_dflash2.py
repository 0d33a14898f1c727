"""`train-drafter --arch dflash2`: the identity start, the selector's loss, learning, resume, `--init`, and errors.

The counting target and the trained v1 drafter are tests/test_train_drafter.py's.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dllm
import mlx_dllm.loading
from mlx_dllm.models import dflash2
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.training import trainer
from mlx_dllm.training.objective import Objective
from mlx_dllm.training.selector import selector_loss
from tests import test_train_drafter as dflash_training
from tests.test_cli import assert_user_error, run
from tests.test_train_drafter import assert_nothing_new, assert_resume_repeats_an_uninterrupted_run, config

counting, trained = dflash_training.counting, dflash_training.trained  # its fixtures, here too

# Small DFlash2 fields for the counting target (hidden 64): a rank the 4-bit conversion's groups of 32 divide.
FIELDS = dict(conv_kernel_size=2, conv_group_size=16, selector_rank=32, selector_top_k=4)


def responses_within(vocab, count=6):
    """Prompt/response pairs whose responses use only `vocab`'s tokens (the drafter's vocabulary stays the same)."""
    words = [f"w{token}" for token in vocab if token >= 2][: count + 3]
    return "\n".join(json.dumps({"prompt": "w2", "response": " ".join(words[i : i + 3])}) for i in range(count))


def test_a_fresh_dflash2_from_a_trained_dflash_drafts_as_it(counting, trained, tmp_path, monkeypatch):
    """--init <v1> --arch dflash2, written before any step: v1's hidden states, and the selector's walk is v1's
    argmax chain (over the same draft vocabulary)."""
    target = counting[0]
    before = json.loads((trained[0] / "config.json").read_text())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(responses_within(before["dflash_config"]["draft_vocab"]))
    monkeypatch.setattr(trainer.Run, "loop", lambda self, work: None)
    trainer.train(config(target, pairs, tmp_path / "dflash2", steps=1, num_layers=None, init=str(trained[0]),
                         arch="dflash2", eval_prompts=0, held_out=0.0, loss_vocab="seen", **FIELDS))
    model, _ = mlx_dllm.load(str(target))
    v1, _ = mlx_dllm.load(str(trained[0]))
    v2, _ = mlx_dllm.load(str(tmp_path / "dflash2"))
    assert type(v2) is dflash2.Model and v2.draft_vocab == v1.draft_vocab
    rng = np.random.default_rng(0)
    features = mx.array(rng.standard_normal((1, 9, 2 * 64)).astype(np.float32))
    block = mx.array(rng.standard_normal((1, 6, 64)).astype(np.float32))
    hidden = v1(block, features, v1.make_cache(), start=1)[0]
    assert np.allclose(np.array(v2(block, features, v2.make_cache(), start=1)[0]), np.array(hidden), atol=1e-6)
    heads = [dflash_strategy.DraftHead(draft, dflash_strategy.bind_target(draft, model)) for draft in (v1, v2)]
    for anchor in (5, 30):
        assert heads[1](hidden, anchor).tolist() == heads[0](hidden, anchor).tolist()


def test_a_dflash_drafter_lacking_a_weight_cannot_start_a_dflash2_one():
    v1 = dflash_training.small_drafter()
    draft = dflash2.Model(dflash2.ModelArgs.from_dict({**vars(v1.args), "vocab_size": 50, **FIELDS}))
    weights = tree_flatten(v1.parameters())
    trainer.load_initial_weights(draft, weights)  # every v1 weight, the added modules untouched
    assert all(mx.array_equal(dict(tree_flatten(draft.parameters()))[name], value) for name, value in weights)
    with pytest.raises(mlx_dllm.DLLMError, match="the --init drafter lacks norm.weight"):
        trainer.load_initial_weights(draft, [(name, value) for name, value in weights if name != "norm.weight"])


def small_selector(rank=6, vocab=20, hidden=8, top_k=3):
    args = dflash2.ModelArgs.from_dict(dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, intermediate_size=16, vocab_size=vocab,
                                            block_size=4, mask_token_id=0, target_layer_ids=[0], conv_kernel_size=2,
                                            conv_group_size=4, selector_rank=rank, selector_top_k=top_k))
    mx.random.seed(5)
    selector = dflash2.CandidateSelector(args)
    mx.eval(selector.parameters())
    return selector


@pytest.mark.parametrize("kind", ["decay", "dpace"])
def test_selector_loss_is_the_per_position_cross_entropy_over_the_candidates(kind):
    """Against a brute force over a seen-vocabulary head (7 rows, token ids `ids`): the true token's rank among the
    top 3 rows after its true predecessor. Block 0 position 1 misses the candidates and block 1 position 2 has no
    label: neither counts."""
    selector = small_selector()
    ids = np.array([2, 3, 5, 8, 11, 13, 19])
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 3, 8)).astype(np.float32)
    logits = rng.standard_normal((2, 3, 7)).astype(np.float32)
    labels = np.array([[int(np.argmax(logits[0, 0])), int(np.argmin(logits[0, 1])), 4], [0, 6, 2]])
    logits[0, 2, 4] = logits[1, 0, 0] = logits[1, 1, 6] = 5.0  # these labels are among their candidates
    predecessors = np.array([[7, ids[labels[0, 0]], ids[labels[0, 1]]], [13, ids[0], ids[6]]])
    valid = np.array([[True, True, True], [True, True, False]])
    weights = rng.uniform(0.2, 1.0, (2, 3)).astype(np.float32)
    objective = Objective(kind)
    loss, hits = selector_loss(selector, objective, mx.array(hidden), mx.array(logits), mx.array(labels),
                               mx.array(predecessors), lambda rows: mx.array(ids)[rows], mx.array(weights),
                               mx.array(valid))
    codes = {name: np.array(getattr(selector, name).weight) for name in ("predecessor_codebook", "successor_codebook")}
    projection = np.array(selector.hidden_projection.weight)
    expected_hits = np.zeros((2, 3), dtype=bool)
    total = 0.0
    for j in range(2):
        block, block_weight = 0.0, 0.0
        for k in range(3):
            candidates = np.argsort(-logits[j, k])[:3]
            if not valid[j, k] or labels[j, k] not in candidates:
                continue
            expected_hits[j, k] = True
            query = codes["predecessor_codebook"][predecessors[j, k]] * (projection @ hidden[j, k])
            scores = np.array([logits[j, k, c] + query @ codes["successor_codebook"][ids[c]] for c in candidates])
            cross_entropy = np.log(np.exp(scores).sum()) - scores[list(candidates).index(labels[j, k])]
            block, block_weight = block + weights[j, k] * cross_entropy, block_weight + weights[j, k]
        total += block / block_weight if kind == "decay" else block
    assert np.array(hits).tolist() == expected_hits.tolist() == [[True, False, True], [True, True, False]]
    assert abs(loss.item() - total) < 1e-5


@pytest.fixture(scope="module")
def dflash2_drafter(counting, tmp_path_factory):
    """A DFlash2 drafter of the counting target, trained from scratch for 20 steps, and a 4-bit copy of it."""
    target, prompts = counting
    root = tmp_path_factory.mktemp("dflash2")
    settings = config(target, prompts, root / "drafter", steps=20, arch="dflash2", eval_prompts=1, loss_vocab="seen",
                      **FIELDS)
    trainer.train(settings)
    result = run("convert", "--hf-path", root / "drafter", "--mlx-path", root / "drafter-4bit", "-q",
                 "--q-group-size", 32)
    assert result.exit_code == 0, result.output
    return root / "drafter", root / "drafter-4bit", settings.facts


def test_training_lowers_the_loss_and_writes_a_lossless_dflash2_drafter(counting, dflash2_drafter, monkeypatch):
    target = counting[0]
    folder, quantized, facts = dflash2_drafter
    assert facts["final_loss"] < 0.5 * facts["first_loss"]
    assert 0 < facts["final_candidate_recall"] <= 1 and facts["final_selector_loss"] >= 0
    config_file = json.loads((folder / "config.json").read_text())
    assert config_file["architectures"] == ["DFlash2DraftModel"]
    assert {name: config_file["dflash_config"][name] for name in FIELDS} == FIELDS
    assert set(dflash2.CODEBOOKS) <= set(mx.load(str(folder / "model.safetensors")))  # z-lab's bare names
    card = (folder / "README.md").read_text()
    assert "DFlash2 drafter" in card and "selector_top_k 4" in card and "1.0 x selector loss" in card
    assert f"| candidate recall (last step) | {facts['final_candidate_recall']} |" in card
    model, tokenizer = mlx_dllm.load(str(target))
    ar = mlx_dllm.generate(model, tokenizer, [5, 9], max_tokens=12)
    for drafter in (folder, quantized):
        draft, _ = mlx_dllm.loading.load(str(drafter))
        assert type(draft) is dflash2.Model
        assert mlx_dllm.generate(model, tokenizer, [5, 9], max_tokens=12, draft_model=draft) == ar
    result = run("generate", "--model", target, "--draft-model", folder, "-p", "w3 w4", "-m", 6)
    assert result.exit_code == 0, result.output
    zlab = pytest.importorskip("dflash.model_mlx")
    monkeypatch.setattr(zlab, "snapshot_download", lambda *args, **kwargs: folder)
    assert type(zlab.load_draft("the folder")) is zlab.DFlash2DraftModel  # strict: every weight by z-lab's name


def test_resume_repeats_an_uninterrupted_dflash2_run_exactly(counting, tmp_path, monkeypatch):
    assert_resume_repeats_an_uninterrupted_run(counting, tmp_path, monkeypatch, arch="dflash2", **FIELDS)


def test_init_a_dflash2_folder_continues_it(counting, dflash2_drafter, tmp_path, monkeypatch):
    """Every weight (the convolutions' and the selector's too) and every field is the folder's; --arch defaults to
    its architecture."""
    target, _ = counting
    folder = dflash2_drafter[0]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(responses_within(json.loads((folder / "config.json").read_text())["dflash_config"]["draft_vocab"]))
    monkeypatch.setattr(trainer.Run, "loop", lambda self, work: None)
    settings = config(target, pairs, tmp_path / "continued", steps=1, num_layers=None, init=str(folder),
                      eval_prompts=0, held_out=0.0, loss_vocab="seen")
    trainer.train(settings)
    assert settings.arch == "dflash2" and {name: getattr(settings, name) for name in FIELDS} == FIELDS
    written = mx.load(str(tmp_path / "continued" / "model.safetensors"))
    expected = mx.load(str(folder / "model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(mx.array_equal(written[name], expected[name]) for name in written)


@pytest.mark.parametrize(
    "init, options, message",
    [
        ("target", ["--arch", "dflash", "--selector-top-k", 4], "--selector-top-k is a DFlash2 option"),
        ("target", ["--conv-kernel-size", 2], "--conv-kernel-size is a DFlash2 option: pass --arch dflash2"),
        ("target", ["--arch", "dflash2", "--conv-group-size", 24], "--conv-group-size 24 does not divide the "
                                                                    "target's hidden size 64"),
        ("target", ["--arch", "dflash2", "--selector-top-k", 49], "--selector-top-k 49 exceeds the 48 tokens"),
        ("target", ["--arch", "dflash2", "--conv-kernel-size", 0], "--conv-kernel-size must be between 1 and"),
        ("target", ["--arch", "dflash2", "--selector-loss-weight", -1], "--selector-loss-weight must be a finite"),
        ("dflash", ["--selector-rank", 8], "--selector-rank is a DFlash2 option"),
        ("dflash2", ["--arch", "dflash"], "is a DFlash2 drafter: --arch dflash cannot continue it"),
        ("dflash2", ["--selector-top-k", 5], "--selector-top-k 5 differs from the --init drafter's 4"),
    ],
)
def test_bad_dflash2_options_are_one_line_and_write_nothing(counting, trained, dflash2_drafter, tmp_path, init,
                                                            options, message):
    target, prompts = counting
    folders = {"target": "target", "dflash": trained[0], "dflash2": dflash2_drafter[0]}
    before = {path.name for path in tmp_path.iterdir()}
    arguments = ["train-drafter", "--model", target, "--data", prompts, "--out", tmp_path / "drafter", "--steps", 2,
                 "--init", folders[init], *options]
    assert_user_error(run(*arguments), message)
    assert_nothing_new(tmp_path, before)


def test_a_top_k_above_the_tokens_seen_is_one_line(counting, tmp_path):
    """With --loss-vocab seen the drafter drafts from the responses' tokens, known once they are (the cached
    responses stay for the next run); nothing else is written."""
    target, prompts = counting
    out = tmp_path / "drafter"
    result = run("train-drafter", "--model", target, "--data", prompts, "--out", out, "--steps", 2,
                 "--arch", "dflash2", "--loss-vocab", "seen", "--selector-top-k", 47)
    assert_user_error(result, "--selector-top-k 47 exceeds the")
    assert "--loss-vocab seen" in result.output and not out.exists()

