"""`train-drafter`: the packed anchor forward, the losses, learning, exact resume, and one-line errors.

The learning tests use a counting target built here: its layers are zero (the residual stream stays the
embedding), its embeddings are one-hot and its head maps token t to t+1, so its greedy continuation of any
prompt counts upwards. A drafter that learns it proposes whole blocks right.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mlx_dllm
from mlx_dllm.models.dflash import AnchorBlocks, Model as DFlashDraft, ModelArgs
from mlx_dllm.training import checkpoints, data, trainer
from mlx_dllm.training.objective import Objective, block_loss, position_weights
from tests.test_cli import assert_user_error, run

VOCAB = 48
HIDDEN = 64
FIRST_WORD = 2  # 0 pad, 1 eos; words w2..w46 count round; 47 is a reserved special token (the mask)
WORDS = VOCAB - 1 - FIRST_WORD


def next_token(token: int) -> int:
    return FIRST_WORD + (token - FIRST_WORD + 1) % WORDS


def save_tokenizer(folder: Path, chat_template=True) -> None:
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(FIRST_WORD, VOCAB - 1)}, "<reserved>": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<reserved>"])
    if chat_template:
        fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)


def write_counting_target(folder: Path, chat_template=True, layers=4, layer_noise=0.0) -> Path:
    config = dict(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=layers, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512, eos_token_id=1)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.random.seed(0)
    weights = {name: layer_noise * mx.random.normal(value.shape) for name, value in tree_flatten(model.parameters())}
    embedding = np.zeros((VOCAB, HIDDEN), dtype=np.float32)
    head = np.zeros((VOCAB, HIDDEN), dtype=np.float32)
    for token in range(VOCAB):
        embedding[token, token] = 1.0
        if FIRST_WORD <= token < FIRST_WORD + WORDS:
            head[next_token(token), token] = 10.0
    weights["model.embed_tokens.weight"] = mx.array(embedding)
    weights["lm_head.weight"] = mx.array(head)
    for name in weights:
        if "norm" in name:
            weights[name] = mx.ones_like(weights[name])
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    save_tokenizer(folder, chat_template)
    return folder


def write_prompts(file: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"prompt": " ".join(f"w{t}" for t in rng.integers(FIRST_WORD, FIRST_WORD + WORDS, 3))})
             for _ in range(count)]
    file.write_text("\n".join(lines) + "\n")
    return file


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    root = tmp_path_factory.mktemp("counting")
    return write_counting_target(root / "target"), write_prompts(root / "prompts.jsonl", 40)


def config(target, prompts, out, **options) -> trainer.TrainConfig:
    # init="random": the counting target's layers are zeros, nothing to start from
    defaults = dict(block_size=4, num_layers=1, anchors=16, batch_tokens=96, lr=3e-3, save_every=5, init="random",
                    max_response_tokens=24, held_out=0.1, eval_prompts=4, eval_tokens=24, warmup=0.1)
    return trainer.TrainConfig(model=str(target), data=str(prompts), out=str(out), **{**defaults, **options})


def test_the_target_counts(counting):
    model, tokenizer = mlx_dllm.load(str(counting[0]))
    text = mlx_dllm.generate(model, tokenizer, [5, 9], max_tokens=4)
    assert text.split() == ["w10", "w11", "w12", "w13"]


def small_drafter(**changes):
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, head_dim=8, block_size=6, mask_token_id=0, target_layer_ids=[0, 2],
                rope_theta=10000.0, layer_types=["full_attention", "sliding_attention"], sliding_window=5)
    mx.random.seed(3)
    draft = DFlashDraft(ModelArgs.from_dict({**args, **changes}))
    mx.eval(draft.parameters())
    return draft


@pytest.mark.parametrize("causal", [True, False], ids=["causal-window", "bidirectional-window"])
def test_packed_anchor_forward_equals_one_inference_forward_per_anchor(causal):
    draft = small_drafter(is_causal=causal)
    rng = np.random.default_rng(0)
    N, B = 23, 6
    features = mx.array(rng.standard_normal((1, N, 64)).astype(np.float32))
    anchors = np.array([1, 4, 9, 10, 17, 22], dtype=np.int32)
    blocks = mx.array(rng.standard_normal((len(anchors), B, 32)).astype(np.float32))
    head = mx.array(rng.standard_normal((32, 50)).astype(np.float32))
    packed = draft(blocks, features, AnchorBlocks(mx.array(anchors)), start=1) @ head
    for row, anchor in enumerate(anchors.tolist()):
        cache = draft.make_cache()
        separate = draft(blocks[row : row + 1], features[:, :anchor], cache, start=1) @ head
        assert mx.abs(packed[row] - separate[0]).max().item() < 1e-5


def test_decay_weights_and_dpace_weights_follow_their_formulas():
    valid = mx.array([[1, 1, 1, 0]], dtype=mx.float32)
    decay = position_weights(Objective("decay", gamma=2.0), mx.zeros((1, 4)), valid)
    assert np.allclose(np.array(decay), [[1, np.exp(-0.5), np.exp(-1.0), 0]])
    p = mx.array([[0.8, 0.5, 0.2, 0.9]])
    weights = np.array(position_weights(Objective("dpace", alpha=0.5), p, valid))
    c = 0.5 + 0.5 * np.array([0.8, 0.5, 0.2])
    prefix = np.cumprod(c)  # the expected accepted length is prefix.sum(); position k's weight: sum_{m>=k}
    assert np.allclose(weights[0, :3], [prefix.sum(), prefix[1:].sum(), prefix[2]]) and weights[0, 3] == 0


def test_dpace_loss_gradient_is_the_weighted_cross_entropy():
    logits = mx.array(np.random.default_rng(1).standard_normal((2, 3, 7)).astype(np.float32))
    labels = mx.array([[1, 2, 3], [4, 5, 6]])
    valid = mx.array([[True, True, True], [True, True, False]])
    objective = Objective("dpace", alpha=0.3)
    loss = block_loss(objective, logits, labels, valid)[0]
    probabilities = mx.exp(-mx.take_along_axis(-mx.log(mx.softmax(logits, -1)), labels[..., None], -1)[..., 0])
    weights = position_weights(objective, probabilities, valid.astype(mx.float32))
    cross_entropy = -mx.log(mx.take_along_axis(mx.softmax(logits, -1), labels[..., None], -1)[..., 0])
    assert abs(loss.item() - (cross_entropy * weights).sum().item()) < 1e-4


def test_training_lowers_the_loss_and_learns_a_deterministic_target(counting, tmp_path):
    """tau >= 0.8 B on held-out prompts, measured by the real decoding loop, and output identical to AR."""
    target, prompts = counting
    settings = config(target, prompts, tmp_path / "drafter", steps=200, num_layers=2)
    folder = trainer.train(settings)
    facts = settings.facts
    assert facts["final_loss"] < 0.25 * facts["first_loss"]
    assert facts["held_out_acceptance_length"] >= 0.8 * 4
    model, tokenizer = mlx_dllm.load(str(target))
    draft, _ = mlx_dllm.load(str(folder))
    held = [r for r in data.read_records(prompts) if data.held_out(r.prompt, 0.1)]
    ids = data.prompt_ids(tokenizer, held[0].prompt)
    # 1 + 40 tokens: whole blocks of 4 when every proposal is right (a last round cut at max_tokens counts less).
    speculative = list(mlx_dllm.stream_generate(model, tokenizer, ids, 41, draft_model=draft))
    assert speculative[-1].acceptance_length >= 0.8 * 4
    assert mlx_dllm.generate(model, tokenizer, ids, max_tokens=20, draft_model=draft) == mlx_dllm.generate(
        model, tokenizer, ids, max_tokens=20
    )
    card = (folder / "README.md").read_text()
    assert "acceptance length" in card and str(facts["held_out_acceptance_length"]) in card


@pytest.mark.parametrize("older", [False, True], ids=["now", "before-arch"])
def test_resume_repeats_an_uninterrupted_run_exactly(counting, tmp_path, monkeypatch, older):
    assert_resume_repeats_an_uninterrupted_run(counting, tmp_path, monkeypatch, older=older)


def assert_resume_repeats_an_uninterrupted_run(counting, tmp_path, monkeypatch, older=False, **options):
    """A run interrupted at step 5 of 8 and resumed writes the weights of one never interrupted. `older`: its
    checkpoint's options are written as before --arch existed (a DFlash v1 run, no DFlash2 fields)."""
    target, prompts = counting
    settings = dict(steps=8, eval_prompts=0, save_every=3, **options)
    trainer.train(config(target, prompts, tmp_path / "whole", **settings))
    original_step = trainer.Run.train_step

    def interrupted(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(trainer.Run, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(target, prompts, tmp_path / "halves", **settings))
    assert not (tmp_path / "halves").exists()
    if older:
        state_file = checkpoints.latest(tmp_path / "halves.work") / "trainer.json"
        state = json.loads(state_file.read_text())
        state["options"] = {key: value for key, value in state["options"].items()
                            if key != "arch" and key not in trainer.DFLASH2_OPTIONS}
        state_file.write_text(json.dumps(state))
    monkeypatch.setattr(trainer.Run, "train_step", original_step)
    trainer.train(config(target, prompts, tmp_path / "halves", resume=True, **settings))
    first = mx.load(str(tmp_path / "whole" / "model.safetensors"))
    second = mx.load(str(tmp_path / "halves" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(np.array_equal(np.array(first[name]), np.array(second[name])) for name in first)


def test_cli_trains_a_drafter_that_generate_loads(counting, tmp_path):
    target, prompts = counting
    out = tmp_path / "drafter"
    result = run("train-drafter", "--model", target, "--data", prompts, "--out", out, "--block-size", 4,
                 "--steps", 3, "--batch-tokens", 64, "--max-response-tokens", 16, "--eval-prompts", 1)
    assert result.exit_code == 0, result.output
    config_file = json.loads((out / "config.json").read_text())
    assert config_file["dflash_config"]["block_size"] == 4 and config_file["architectures"] == ["DFlashDraftModel"]
    result = run("generate", "--model", target, "--draft-model", out, "-p", "w3 w4", "-m", 6)
    assert result.exit_code == 0, result.output


def assert_nothing_new(root: Path, before: set):
    assert {path.name for path in root.iterdir()} == before


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data="empty"), "holds no prompts"),
        (dict(block_size=1), "--block-size must be at least 2"),
        (dict(target_layers="1,9"), "target layer 9 is outside"),
        (dict(target="no-template"), "has no chat template"),
        (dict(out="exists"), "already exists"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(counting, tmp_path, change, message):
    target, prompts = counting
    if change.get("data") == "empty":
        prompts = tmp_path / "empty.jsonl"
        prompts.write_text("\n")
    if change.get("target") == "no-template":
        target = write_counting_target(tmp_path / "bare", chat_template=False)
    out = tmp_path / "drafter"
    if change.get("out") == "exists":
        out.mkdir()
    before = {path.name for path in tmp_path.iterdir()}
    arguments = ["train-drafter", "--model", target, "--data", prompts, "--out", out, "--steps", 2]
    if "block_size" in change:
        arguments += ["--block-size", change["block_size"]]
    if "target_layers" in change:
        arguments += ["--target-layers", change["target_layers"]]
    assert_user_error(run(*arguments), message)
    assert_nothing_new(tmp_path, before)


def test_records_take_prompts_in_every_shape_and_responses_only_by_name(tmp_path):
    file = tmp_path / "mixed.jsonl"
    lines = ['"w2 w3"', '{"question": "w4", "answer": "not a response"}', '{"turns": ["w5", "w6"]}',
             '{"prompt": "w7", "response": "w8 w9"}', ""]
    file.write_text("\n".join(lines))
    records = data.read_records(file)
    assert [(r.prompt, r.response) for r in records] == [
        ("w2 w3", None), ("w4", None), ("w5", None), ("w7", "w8 w9")
    ]
    file.write_text('{"prompt": "w2"}\n{"prompt": 3}\n')
    with pytest.raises(mlx_dllm.DLLMError, match="line 2: no prompt"):
        data.read_records(file)


def test_finished_pairs_train_without_asking_the_target(counting, tmp_path, monkeypatch):
    target, _ = counting
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"w{i}", "response": " ".join(f"w{i + k}" for k in range(1, 9))})
                               for i in range(2, 30)))
    monkeypatch.setattr(data, "greedy_batch", lambda *args: pytest.fail("pairs need no target responses"))
    settings = config(target, pairs, tmp_path / "drafter", steps=3, eval_prompts=0, held_out=0.0)
    trainer.train(settings)
    assert settings.facts["sequences"] == 28 and settings.facts["response_tokens"] == 28 * 8


def test_target_init_starts_the_drafter_as_the_layers_after_the_last_one_read():
    from mlx_dllm.models.target import Target
    from mlx_dllm.training.drafter_config import drafter_config

    mx.random.seed(0)
    args = llama.ModelArgs.from_dict(dict(model_type="llama", hidden_size=32, num_hidden_layers=5,
                                          intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                          rms_norm_eps=1e-6, vocab_size=40, rope_theta=10000.0))
    model = llama.Model(args)
    model.update(tree_map(lambda w: mx.random.normal(w.shape), model.parameters()))
    target = Target(model, [0, 2])
    draft = DFlashDraft(ModelArgs.from_dict(drafter_config(args, 2, 4, [0, 2], 39)))
    trainer.initialize_from_target(draft, target)
    for layer, source in zip(draft.layers, model.layers[3:5]):
        assert mx.array_equal(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        assert mx.array_equal(layer.mlp.down_proj.weight, source.mlp.down_proj.weight)
        assert mx.array_equal(layer.post_attention_layernorm.weight, source.post_attention_layernorm.weight)
    assert mx.array_equal(draft.fc.weight, mx.concatenate([mx.zeros((32, 32)), mx.eye(32)], axis=1))
    assert mx.array_equal(draft.hidden_norm.weight, model.layers[3].input_layernorm.weight)
    assert mx.array_equal(draft.norm.weight, model.model.norm.weight)


@pytest.mark.parametrize("head", ["tied", "untied", "quantized"])
def test_seen_vocab_head_gives_the_full_heads_logits_on_its_rows(head):
    import mlx.nn as nn

    from mlx_dllm.models.target import Target
    from mlx_dllm.training.vocabulary import SeenVocabHead

    mx.random.seed(1)
    args = llama.ModelArgs.from_dict(dict(model_type="llama", hidden_size=64, num_hidden_layers=1,
                                          intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          rms_norm_eps=1e-6, vocab_size=300, rope_theta=10000.0,
                                          tie_word_embeddings=head == "tied"))
    model = llama.Model(args)
    if head == "quantized":
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    target = Target(model, [0])
    tokens = np.array([0, 3, 17, 150, 299], dtype=np.int32)
    seen = SeenVocabHead(target, tokens)
    hidden = mx.random.normal((2, 3, 64))
    tolerance = 1e-4 if head == "quantized" else 1e-5  # quantized: dequantize-then-matmul against the fused op
    assert mx.abs(seen(hidden) - target.lm_head(hidden)[..., mx.array(tokens)]).max().item() < tolerance
    assert seen.labels(np.array([[17, 299], [0, 3]])).tolist() == [[2, 4], [0, 1]]


def test_cached_features_train_exactly_as_computed_ones_and_run_the_target_once(counting, tmp_path, monkeypatch):
    from mlx_dllm.models.target import Target

    prompts = counting[1]
    target = write_counting_target(tmp_path / "noisy", layer_noise=0.1)  # features in full float32 precision
    forwards = []
    original = Target.__call__
    monkeypatch.setattr(Target, "__call__", lambda self, *args: forwards.append(1) or original(self, *args))
    options = dict(steps=30, eval_prompts=0, loss_vocab="seen")
    trainer.train(config(target, prompts, tmp_path / "computed", **options))
    computed_forwards = len(forwards)
    forwards.clear()
    cached = config(target, prompts, tmp_path / "cached", cache_features=True, **options)
    trainer.train(cached)
    files = list((tmp_path / "cached.work" / "features").glob("*/*.safetensors"))
    assert len(forwards) == len(files) == cached.facts["sequences"] < computed_forwards
    vocab = json.loads((tmp_path / "cached" / "config.json").read_text())["dflash_config"]["draft_vocab"]
    train_records = data.split(data.read_records(prompts), cached.held_out)[0]
    work, target_id = tmp_path / "cached.work", data.target_identity(target)
    examples = trainer.load_examples(cached, *mlx_dllm.load(str(target)), train_records, work, target_id)
    assert vocab == sorted({t for e in examples for t in e.ids[e.response_start :]})  # what the loss saw
    first = mx.load(str(tmp_path / "computed" / "model.safetensors"))
    second = mx.load(str(tmp_path / "cached" / "model.safetensors"))
    assert all(np.array_equal(np.array(first[name]), np.array(second[name])) for name in first)


def test_a_failure_after_the_last_step_loses_no_training(counting, tmp_path, monkeypatch):
    target, prompts = counting

    def broken(*args):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(trainer, "measure_acceptance", broken)
    with pytest.raises(RuntimeError):
        trainer.train(config(target, prompts, tmp_path / "drafter", steps=4, save_every=3))
    monkeypatch.undo()
    steps = []
    original = trainer.Run.train_step
    monkeypatch.setattr(trainer.Run, "train_step", lambda self: steps.append(self.step) or original(self))
    trainer.train(config(target, prompts, tmp_path / "drafter", steps=4, save_every=3, resume=True))
    assert steps == [] and (tmp_path / "drafter" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def trained(counting, tmp_path_factory):
    """A 2-layer drafter of the counting target, and a 4-bit copy of it."""
    target, prompts = counting
    root = tmp_path_factory.mktemp("trained")
    settings = config(target, prompts, root / "drafter", steps=30, num_layers=2, eval_prompts=0, loss_vocab="seen",
                      target_layers=[0, 2])
    trainer.train(settings)
    result = run("convert", "--hf-path", root / "drafter", "--mlx-path", root / "drafter-4bit", "-q",
                 "--q-group-size", 32)
    assert result.exit_code == 0, result.output
    return root / "drafter", root / "drafter-4bit", settings.facts


def drafter_weights(folder: Path) -> dict:
    from mlx_lm.utils import dequantize_model

    draft, _ = mlx_dllm.load(str(folder))
    return dict(tree_flatten(dequantize_model(draft).parameters()))


@pytest.mark.parametrize("source", ["float32", "4-bit"])
def test_init_folder_starts_from_that_drafter_and_keeps_its_architecture(counting, trained, tmp_path, monkeypatch,
                                                                         source):
    """With the training loop skipped, the drafter written is the --init one: its weights (dequantized when it is
    quantized), its layers, target layers and mask token. The block size may change; the vocabulary grows."""
    target, _ = counting
    folder = trained[0] if source == "float32" else trained[1]
    pairs = tmp_path / "pairs.jsonl"
    responses = [f"w{i + 1} w{i + 2} w{i + 3}" for i in range(2, 8)] + ["w3 </s>"]  # </s>: not a counting token
    pairs.write_text("\n".join(json.dumps({"prompt": "w2", "response": response}) for response in responses))
    monkeypatch.setattr(trainer.Run, "loop", lambda self, work: None)
    settings = config(target, pairs, tmp_path / "continued", steps=1, num_layers=None, block_size=6,
                      init=str(folder), eval_prompts=0, held_out=0.0, loss_vocab="seen")
    trainer.train(settings)
    written = mx.load(str(tmp_path / "continued" / "model.safetensors"))
    expected = drafter_weights(folder)
    assert written.keys() == expected.keys()
    assert all(written[name].dtype == mx.float32 and mx.array_equal(written[name], expected[name]) for name in written)
    before = json.loads((trained[0] / "config.json").read_text())
    after = json.loads((tmp_path / "continued" / "config.json").read_text())
    assert "quantization" not in after and after["num_hidden_layers"] == 2 and after["block_size"] == 6
    seen = {i + k for i in range(3, 9) for k in range(3)} | {1}
    old_vocab = before["dflash_config"]["draft_vocab"]
    assert 1 not in old_vocab and len(old_vocab) > len(seen)  # the union below is neither side alone
    assert after["dflash_config"] == {**before["dflash_config"], "block_size": 6,
                                      "draft_vocab": sorted(set(old_vocab) | seen)}
    assert "the drafter" in (tmp_path / "continued" / "README.md").read_text()


def test_a_drafter_continued_with_init_starts_where_it_stopped(counting, trained, tmp_path):
    target, prompts = counting
    settings = config(target, prompts, tmp_path / "continued", steps=3, num_layers=None, init=str(trained[0]),
                      eval_prompts=0, loss_vocab="seen", seed=1)
    trainer.train(settings)
    # from scratch the first loss is the untrained one; continued, it is already near the first run's last
    assert settings.facts["first_loss"] < 0.5 * trained[2]["first_loss"]
    assert settings.facts["first_loss"] < 2 * trained[2]["final_loss"]


def write_narrow_drafter(folder: Path) -> Path:
    """A drafter for a target of hidden size 32: not one the counting target (64) can continue."""
    draft = small_drafter()
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(draft.parameters())))
    config = dict(architectures=["DFlashDraftModel"], model_type="qwen3", hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=8, rope_theta=10000.0,
                  layer_types=["full_attention", "sliding_attention"], sliding_window=5, vocab_size=VOCAB,
                  dflash_config=dict(block_size=6, mask_token_id=0, target_layer_ids=[0, 2]))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "init, options, message",
    [
        ("target", [], "is not a DFlash drafter"),
        ("trained", ["--num-layers", 3], "--num-layers 3 differs from the --init drafter's 2"),
        ("trained", ["--target-layers", "0,1"], "--target-layers [0, 1] differs"),
        ("narrow", [], "built for another target: its hidden size is 32, the target's is 64"),
        ("missing", [], "does not exist"),
    ],
)
def test_bad_init_is_one_line_and_writes_nothing(counting, trained, tmp_path, init, options, message):
    target, prompts = counting
    folders = {"target": target, "trained": trained[0], "missing": tmp_path / "nowhere"}
    folder = write_narrow_drafter(tmp_path / "narrow") if init == "narrow" else folders[init]
    before = {path.name for path in tmp_path.iterdir()}
    arguments = ["train-drafter", "--model", target, "--data", prompts, "--out", tmp_path / "drafter", "--steps", 2,
                 "--init", folder, *options]
    assert_user_error(run(*arguments), message)
    assert_nothing_new(tmp_path, before)
