"""The front: stop strings held back until decided, one summary line for every mode, user errors before MLX,
mlx-lm's sampler / logits processors / housekeeping, and a prefill that never evaluates the head per row."""

import contextlib
import dataclasses
import itertools
import math
import re

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models import qwen3
from mlx_lm.sample_utils import make_logits_processors

from mlx_dllm import DLLMError, stream_generate
from mlx_dllm.models.dflash import Model as DFlashModel
from mlx_dllm.models.dflash import ModelArgs as DFlashArgs
from mlx_dllm.models.diffusion_gemma import Model as DiffusionGemmaModel
from mlx_dllm.models.diffusion_gemma import ModelArgs as DiffusionGemmaArgs
from mlx_dllm.models.nemotron_diffusion import LoRA
from mlx_dllm.models.nemotron_diffusion import Model as NemotronModel
from mlx_dllm.models.nemotron_diffusion import ModelArgs as NemotronArgs
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.sampler import ar, blocks, front, linear_spec, quadratic_spec, summary
from mlx_dllm.sampler.mode import modes_of
from mlx_dllm.sampler.common import Stats, TokenSelector
from mlx_dllm.sampler.cost_curve import CostCurve
from tests.oracle import Oracle

harness = pytest.importorskip("tests.reference.harness")

PROMPT = [100, 3, 3, 250, 7, 64, 12]
PENALTY = {"repetition_penalty": 1.8, "repetition_context_size": 12}


@pytest.fixture(scope="module")
def nemotron():
    mx.random.seed(0)
    args = NemotronArgs(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=1024,
        mask_token_id=100,
        block_size=32,
    )
    model = NemotronModel(args)
    for layer in model.layers:
        layer.self_attn.lora = LoRA(mx.random.normal((4, 64)) * 0.2, mx.random.normal((64, 4)) * 0.2, 4.0)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def no_eos(models, monkeypatch):
    monkeypatch.setattr(models[1], "eos_token_ids", [])


def _run(model, tokenizer, max_tokens, **options):
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens, **options))
    return [t for r in responses for t in r.tokens], "".join(r.text for r in responses), responses


@pytest.mark.parametrize("use_draft", [False, True], ids=["ar", "dflash"])
def test_stop_string_spanning_two_chunks_never_leaks(models, no_eos, use_draft):
    target, tokenizer, draft = models
    options = {"draft_model": draft, "block_size": 2} if use_draft else {}  # block 2: a chunk or two per word
    _, full_text, _ = _run(target, tokenizer, 14, **options)
    words = full_text.split()
    stop = f" {words[5]} {words[6]}"
    tokens, text, responses = _run(target, tokenizer, 14, stop=[stop], **options)
    assert text == full_text[: full_text.index(stop)]
    assert all(stop[: len(stop) - 1] not in r.text for r in responses)
    assert len(tokens) == responses[-1].generation_tokens == len(text.split()) == 5
    assert responses[-1].finish_reason == "stop"


def test_a_plain_string_is_one_stop_string(models, no_eos):
    target, tokenizer, _ = models
    _, full_text, _ = _run(target, tokenizer, 10)
    stop = f" {full_text.split()[3]}"
    _, text, responses = _run(target, tokenizer, 10, stop=stop)
    assert text == full_text[: full_text.index(stop)] and len(text.split()) == 3
    assert responses[-1].finish_reason == "stop"


SUMMARY_FIELDS = (
    r"Mode: [a-z-]+, forwards: \d+, draft forwards: \d+, tokens per forward: [\d.]+, acceptance length: \S+, "
    r"rounds: (-|ar \d+%, chain \d+%, tree \d+%, mean budget [\d.]+)"
)


def test_summary_line_has_the_same_fields_in_every_mode(models, nemotron, no_eos):
    target, tokenizer, draft = models
    runs = {
        "ar": _run(target, tokenizer, 12)[2][-1],
        "dflash": _run(target, tokenizer, 12, draft_model=draft, speculation="chain")[2][-1],
        "dflash auto": _run(target, tokenizer, 12, draft_model=draft)[2][-1],
    }
    for mode in nemotron.modes:
        options = {} if mode == "ar" else {"block_length": 4}
        runs[f"nemotron {mode}"] = _run(nemotron, tokenizer, 12, mode=mode, **options)[2][-1]
    for mode, last in runs.items():
        assert re.fullmatch(SUMMARY_FIELDS, summary(last).splitlines()[-1]), mode
    assert runs["ar"].forwards == 11 and runs["ar"].tokens_per_forward == 1.0  # the prefill's token and forward out
    dflash = runs["dflash"]
    assert dflash.draft_forwards == dflash.forwards  # one drafter forward per verify
    assert dflash.tokens_per_forward == pytest.approx(11 / dflash.forwards)
    assert "rounds: ar 0%, chain 100%, tree 0%" in summary(dflash) and "rounds: ar" in summary(runs["dflash auto"])
    assert "rounds: -" in summary(runs["ar"])
    assert runs["nemotron linear-spec"].draft_forwards >= runs["nemotron linear-spec"].forwards - 1 > 0
    assert "rounds: ar 0%, chain 100%, tree 0%, mean budget 3.0" in summary(runs["nemotron quadratic-spec"])  # 4 rows
    assert "rounds: ar" in summary(runs["nemotron linear-spec"]) and "rounds: -" in summary(runs["nemotron diffusion"])
    assert runs["nemotron ar"].tokens_per_forward == 1.0
    assert "acceptance length: -" in summary(runs["nemotron diffusion"]) and "length: -" in summary(runs["ar"])


def _bad_call(models, nemotron, case):
    target, tokenizer, draft = models
    calls = {
        "id too large": lambda: stream_generate(target, tokenizer, [10**6]),
        "id negative": lambda: stream_generate(target, tokenizer, [5, -1]),
        "id one past the table": lambda: stream_generate(target, tokenizer, [256]),
        "dflash id past the target": lambda: stream_generate(target, tokenizer, [256], draft_model=draft),
        "nemotron id past the table": lambda: stream_generate(nemotron, tokenizer, [256], mode="linear-spec"),
        "float ids": lambda: stream_generate(target, tokenizer, [1.5]),
        "float array": lambda: stream_generate(target, tokenizer, mx.array([1.0])),
        "prompt of a wrong type": lambda: stream_generate(target, tokenizer, 3.5),
        "model not a module": lambda: stream_generate("qwen", tokenizer, PROMPT),
        "tokenizer None": lambda: stream_generate(target, None, PROMPT),
        "prefill step 0": lambda: stream_generate(target, tokenizer, PROMPT, prefill_step_size=0),
        "prefill step negative": lambda: stream_generate(target, tokenizer, PROMPT, prefill_step_size=-4),
        "prefill step float": lambda: stream_generate(target, tokenizer, PROMPT, prefill_step_size=2.5),
        "block length 0": lambda: stream_generate(nemotron, tokenizer, PROMPT, mode="diffusion", block_length=0),
        "block length huge": lambda: stream_generate(
            nemotron, tokenizer, PROMPT, mode="diffusion", block_length=100000
        ),
        "quadratic rows huge": lambda: stream_generate(
            nemotron, tokenizer, PROMPT, mode="quadratic-spec", block_length=100000
        ),
        "quadratic rows past the positions": lambda: stream_generate(
            nemotron, tokenizer, PROMPT, mode="quadratic-spec", block_length=32
        ),
        "block length float": lambda: stream_generate(
            nemotron, tokenizer, PROMPT, mode="linear-spec", block_length=4.0
        ),
        "seed negative": lambda: stream_generate(target, tokenizer, PROMPT, seed=-1),
        "seed 2**64": lambda: stream_generate(target, tokenizer, PROMPT, seed=2**64),
        "top_k above the vocabulary": lambda: stream_generate(target, tokenizer, PROMPT, temp=1.0, top_k=257),
        "temp nan": lambda: stream_generate(target, tokenizer, PROMPT, temp=math.nan),
        "temp inf": lambda: stream_generate(target, tokenizer, PROMPT, temp=math.inf),
        "top_p nan": lambda: stream_generate(target, tokenizer, PROMPT, temp=1.0, top_p=math.nan),
        "min_p nan": lambda: stream_generate(target, tokenizer, PROMPT, temp=1.0, min_p=math.nan),
        "max_tokens text": lambda: stream_generate(target, tokenizer, PROMPT, "5"),
        "max_tokens float": lambda: stream_generate(target, tokenizer, PROMPT, 5.0),
        "visualize without a canvas": lambda: stream_generate(target, tokenizer, PROMPT, on_step=print),
        "dflash block_length": lambda: stream_generate(target, tokenizer, PROMPT, draft_model=draft, block_length=4),
        "stop of a wrong type": lambda: stream_generate(target, tokenizer, PROMPT, stop=[3]),
        "draft that is an AR model": lambda: stream_generate(target, tokenizer, PROMPT, draft_model=target),
    }
    return calls[case]


BAD_CALLS = {
    "id too large": "token id 1000000 is outside the model's embedding table \\(256 rows\\)",
    "id negative": "token id -1 is outside",
    "id one past the table": "token id 256 is outside",
    "dflash id past the target": "token id 256 is outside",
    "nemotron id past the table": "token id 256 is outside",
    "float ids": "prompt token ids must be integers",
    "float array": "must hold integer token ids",
    "prompt of a wrong type": "prompt must be text, a list of token ids or an mx.array, got float",
    "model not a module": "model must be an mlx.nn.Module",
    "tokenizer None": "tokenizer must be a Hugging Face or mlx-lm tokenizer, got NoneType",
    "prefill step 0": "prefill_step_size must be positive, got 0",
    "prefill step negative": "prefill_step_size must be positive, got -4",
    "prefill step float": "prefill_step_size must be an integer",
    "block length 0": "block length must be at least 2, got 0",
    "block length huge": "block length 100000 is too long for this model \\(at most 1024\\)",
    "quadratic rows huge": "block length 100000 is too long for this model \\(at most 31\\)",
    "quadratic rows past the positions": "block length 32 is too long",
    "block length float": "block length must be an integer",
    "seed negative": "seed must be between 0 and 18446744073709551615, got -1",
    "seed 2**64": "seed must be between 0 and",
    "top_k above the vocabulary": "top_k 257 is above the vocabulary of 256",
    "temp nan": "temp must be a finite number",
    "temp inf": "temp must be a finite number",
    "top_p nan": "top_p must be a finite number",
    "min_p nan": "min_p must be a finite number",
    "max_tokens text": "max_tokens must be an integer",
    "max_tokens float": "max_tokens must be an integer",
    "visualize without a canvas": "unknown option on_step for mode ar \\(on_step, --visualize, is for diffusion\\)",
    "dflash block_length": "unknown option block_length for mode dflash \\(block_length, --block-length, is for",
    "stop of a wrong type": "stop must be a string or a list of strings",
    "draft that is an AR model": "the draft model must be a DFlash drafter, got Model",
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_user_errors_are_one_line_dllm_errors(models, nemotron, case):
    with pytest.raises(DLLMError, match=BAD_CALLS[case]) as error:
        next(_bad_call(models, nemotron, case)())
    assert "\n" not in str(error.value)


def test_a_tokenizer_mapping_text_outside_the_table_is_caught(models, monkeypatch):
    target, tokenizer, _ = models
    monkeypatch.setattr(tokenizer._tokenizer, "encode", lambda text, **_: [3, 999])
    with pytest.raises(DLLMError, match="token id 999 is outside"):
        next(stream_generate(target, tokenizer, "w3 w4"))


def test_eos_ids_of_the_wrong_type_are_an_error(models, monkeypatch):
    target, tokenizer, _ = models
    monkeypatch.setattr(tokenizer, "eos_token_ids", ["</s>"])
    with pytest.raises(DLLMError, match="eos_token_ids must be integers, got '</s>'"):
        next(stream_generate(target, tokenizer, PROMPT))


@pytest.mark.parametrize("family", ["ar", "nemotron", "diffusion_gemma"])
def test_an_absurd_max_tokens_is_handled(models, nemotron, no_eos, family):
    model = {"ar": models[0], "nemotron": nemotron, "diffusion_gemma": _wide_diffusion_gemma()}[family]
    mode = "ar" if family == "ar" else "diffusion"
    responses = stream_generate(model, models[1], PROMPT, 10**400, mode=mode)
    assert sum(len(r.tokens) for r in itertools.islice(responses, 3)) >= 3


def _recording_strategy(record, count):
    def strategy(model, prompt, **_):
        for _ in range(count):
            record.append(mx.default_stream(mx.default_device()))
            yield [5]

    return strategy


def test_housekeeping_stream_wired_limit_and_periodic_clear_cache(models, no_eos, monkeypatch):
    target, tokenizer, _ = models
    streams, clears, limits = [], [], []
    monkeypatch.setattr(ar, "MODE", dataclasses.replace(ar.MODE, run=_recording_strategy(streams, 600)))
    monkeypatch.setattr(mx, "clear_cache", lambda: clears.append(len(streams)))

    @contextlib.contextmanager
    def recording_limit(model, streams):
        limits.append((model, streams))
        yield

    monkeypatch.setattr(front, "wired_limit", recording_limit)
    tokens, _, _ = _run(target, tokenizer, 600)
    assert len(tokens) == 600 and clears == [256, 512]  # as mlx-lm: every 256 tokens
    with mx.stream(generation_stream):
        expected = mx.default_stream(mx.default_device())
    assert all(s == expected for s in streams) and expected != mx.default_stream(mx.default_device())
    assert limits == [(target, [generation_stream])]


def _with_processors(model, tokenizer, max_tokens, **options):
    processors = make_logits_processors(**PENALTY)
    return _run(model, tokenizer, max_tokens, logits_processors=processors, **options)[0]


def _mlx_lm_penalised(model, max_tokens):
    processors = make_logits_processors(**PENALTY)
    steps = generate_step(mx.array(PROMPT), model, max_tokens=max_tokens, logits_processors=processors)
    return [int(t) for t, _ in steps]


def test_dflash_with_a_repetition_penalty_equals_ar_with_it(models, no_eos, monkeypatch):
    target, tokenizer, draft = models
    max_tokens = 30
    reference = _mlx_lm_penalised(target, max_tokens + 8)
    assert _with_processors(target, tokenizer, max_tokens) == reference[:max_tokens]
    assert _with_processors(target, tokenizer, max_tokens) != _run(target, tokenizer, max_tokens)[0]
    oracle = Oracle(dflash_strategy.propose_block, reference, len(PROMPT), [7, 0, 3, 7, 1, 5, 2], 256)
    monkeypatch.setattr(dflash_strategy, "propose_block", oracle)
    chain = _with_processors(target, tokenizer, max_tokens, draft_model=draft, block_size=8, speculation="chain")
    assert chain == reference[:max_tokens]
    assert max(oracle.expected_accepts) > 3  # rows past the first were verified with their draft prefix
    for speculation in ("tree", "auto"):  # each tree row is processed after its own lineage
        tree = _with_processors(target, tokenizer, max_tokens, draft_model=draft, speculation=speculation)
        assert tree == reference[:max_tokens]


class SelfOracle:
    """Linear-spec drafts that are the true (penalised) continuation for the first k of each block."""

    def __init__(self, reference, pattern):
        self.reference, self.pattern, self.calls = reference, pattern, 0

    def __call__(self, model, cache, seed, size, threshold, lora, stats):
        correct = self.pattern[self.calls % len(self.pattern)]
        self.calls += 1
        start = cache[0].offset - len(PROMPT) + 1
        truth = [self.reference[start + j] if start + j < len(self.reference) else 0 for j in range(size - 1)]
        return mx.array([seed] + [t if j < correct else (t + 1) % 256 for j, t in enumerate(truth)], dtype=mx.int32)


def test_self_speculation_with_a_repetition_penalty_equals_ar_with_it(models, nemotron, no_eos, monkeypatch):
    tokenizer = models[1]
    max_tokens = 24
    reference = _mlx_lm_penalised(nemotron, max_tokens + 8)
    assert _with_processors(nemotron, tokenizer, max_tokens, mode="ar") == reference[:max_tokens]
    quadratic = _with_processors(nemotron, tokenizer, max_tokens, mode="quadratic-spec", block_length=4)
    assert quadratic == reference[:max_tokens]
    monkeypatch.setattr(linear_spec, "draft_block", SelfOracle(reference, [5, 0, 2, 5, 1]))
    linear = _with_processors(nemotron, tokenizer, max_tokens, mode="linear-spec", block_length=6)
    assert linear == reference[:max_tokens]


def test_a_custom_sampler_is_used_and_refused_where_it_cannot_apply(models, nemotron, no_eos):
    target, tokenizer, draft = models
    always_seven = lambda logprobs: mx.full(logprobs.shape[:-1], 7, dtype=mx.int32)  # noqa: E731
    assert _run(target, tokenizer, 5, sampler=always_seven)[0] == [7] * 5
    assert _run(target, tokenizer, 5, sampler=always_seven, draft_model=draft)[0] == [7] * 5
    with pytest.raises(DLLMError, match="sampler apply to AR logits"):
        next(stream_generate(nemotron, tokenizer, PROMPT, mode="diffusion", sampler=always_seven))
    with pytest.raises(DLLMError, match="logits_processors apply to AR logits"):
        next(stream_generate(nemotron, tokenizer, PROMPT, mode="diffusion", logits_processors=[lambda t, x: x]))
    with pytest.raises(DLLMError, match="either sampler= or temp"):
        next(stream_generate(target, tokenizer, PROMPT, sampler=always_seven, temp=0.5))


def test_num_draft_tokens_is_the_block_minus_its_anchor(models, no_eos, monkeypatch):
    target, tokenizer, draft = models
    sizes = []
    real = dflash_strategy.propose_block

    def recording(draft, target, anchor, features, draft_cache, size, head):
        sizes.append(size)
        return real(draft, target, anchor, features, draft_cache, size, head)

    monkeypatch.setattr(dflash_strategy, "propose_block", recording)
    _run(target, tokenizer, 20, draft_model=draft, num_draft_tokens=3, speculation="chain")
    assert sizes[0] == 4
    with pytest.raises(DLLMError, match="between 2 and the drafter's trained 8, got 9"):
        next(stream_generate(target, tokenizer, PROMPT, draft_model=draft, num_draft_tokens=8))
    with pytest.raises(DLLMError, match="not both"):
        next(stream_generate(target, tokenizer, PROMPT, draft_model=draft, num_draft_tokens=3, block_size=4))


def test_quadratic_spec_chooses_its_rows_up_to_its_cap(nemotron, monkeypatch):
    rows_seen = []
    real = quadratic_spec.layout_forward
    monkeypatch.setattr(
        quadratic_spec, "layout_forward", lambda model, cache, draft, *rest: rows_seen.append(draft.shape[0]) or real(
            model, cache, draft, *rest
        )
    )
    flat = CostCurve((1, 72), (0.010, 0.011), draft_seconds=0.011)  # a GPU's: more rows cost next to nothing
    monkeypatch.setattr(blocks, "measured_costs", lambda model: flat)
    chunks = quadratic_spec.generate_quadratic_spec(
        nemotron, mx.array(PROMPT), select=TokenSelector(), stats=Stats(), max_tokens=8, options={}
    )
    list(itertools.islice(chunks, 2))
    assert rows_seen[0] == blocks.AUTO_ROWS and max(rows_seen) <= blocks.AUTO_ROWS < nemotron.args.block_size
    assert nemotron.args.block_size == 32  # the checkpoint's block stays the other modes' default


def test_linear_spec_at_threshold_zero_takes_no_full_vocabulary_softmax(nemotron, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a softmax over the vocabulary at threshold 0")

    monkeypatch.setattr(mx, "softmax", refuse)
    chunks = linear_spec.generate_linear_spec(
        nemotron, mx.array(PROMPT), select=TokenSelector(), stats=Stats(), max_tokens=8, options={"block_length": 4}
    )
    assert sum(len(c) for c in chunks) >= 8


LONG_VOCAB, LONG_PROMPT, STEP = 65536, 2048, 512
# Tiny layers under a large vocabulary: the head dominates, so a head run on every prompt row shows at once.
WIDE = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)


def _wide_qwen3():
    args = qwen3.ModelArgs(
        model_type="qwen3",
        **WIDE,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=LONG_VOCAB,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return qwen3.Model(args)


def _peak(run) -> int:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    run()
    mx.synchronize()
    return mx.get_peak_memory()


def _first_token(model, prompt, mode, **options):
    strategy = modes_of(model)[mode].run(
        model, prompt, select=TokenSelector(), stats=Stats(), max_tokens=1, prefill_step_size=STEP, **options
    )
    next(strategy)
    strategy.close()


def _drafter():
    args = DFlashArgs(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        block_size=4,
        mask_token_id=LONG_VOCAB - 1,
        target_layer_ids=[0, 1],
    )
    return DFlashModel(args)


def _wide_nemotron():
    args = NemotronArgs(
        **WIDE,
        head_dim=16,
        vocab_size=LONG_VOCAB,
        max_position_embeddings=8192,
        mask_token_id=LONG_VOCAB - 1,
    )
    return NemotronModel(args)


def _wide_diffusion_gemma():
    text = dict(
        **WIDE,
        vocab_size=1024,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=64,
        sliding_window=512,
    )
    return DiffusionGemmaModel(DiffusionGemmaArgs(text_config=text, canvas_length=4))


@pytest.mark.parametrize("family", ["ar", "dflash", "nemotron"])
def test_prefill_memory_stays_near_mlx_lm(family):
    """A large vocabulary: a head evaluated for every prompt row would cost a chunk x vocab logits array."""
    mx.random.seed(0)
    model = _wide_nemotron() if family == "nemotron" else _wide_qwen3()
    draft = _drafter()
    prompt = mx.random.randint(0, LONG_VOCAB - 1, (LONG_PROMPT,))
    mx.eval(model.parameters(), draft.parameters(), prompt)
    theirs = _peak(lambda: next(generate_step(prompt, model, max_tokens=1, prefill_step_size=STEP)))
    mode = {"ar": "ar", "dflash": "dflash", "nemotron": "linear-spec"}[family]
    extra = {"draft_model": draft} if family == "dflash" else {}
    extra |= {"options": {}} if family == "nemotron" else {}
    ours = _peak(lambda: _first_token(model, prompt, mode, **extra))
    assert ours <= 1.2 * theirs


def test_diffusion_gemma_prefill_keeps_no_chunk_outputs():
    """Smaller chunks must mean a smaller peak: no chunk's K/V views or hidden states outlive it."""
    mx.random.seed(0)
    model = _wide_diffusion_gemma()
    prompt = mx.random.randint(0, 1000, (4096,))
    mx.eval(model.parameters(), prompt)

    def prefill(step):
        strategy = modes_of(model)["diffusion"].run(
            model, prompt, stats=Stats(), max_tokens=1, prefill_step_size=step, options={"stability_threshold": None}
        )
        next(strategy)
        strategy.close()

    assert _peak(lambda: prefill(512)) < 0.6 * _peak(lambda: prefill(2048))


def _cli(*args):
    from click.testing import CliRunner

    from mlx_dllm.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_num_draft_tokens_is_block_size_minus_one(mlx_checkpoints):
    checkpoint = mlx_checkpoints["qwen3_gqa"]
    common = ["generate", "--model", checkpoint["target"], "--draft-model", checkpoint["draft"], "-p", "w5 w9 w33"]
    by_draft_tokens = _cli(*common, "--num-draft-tokens", 3, "-m", 10)
    by_block = _cli(*common, "--block-size", 4, "-m", 10)
    assert by_draft_tokens.exit_code == 0 and by_block.exit_code == 0, by_draft_tokens.output
    assert by_draft_tokens.stdout.split("=" * 10)[1] == by_block.stdout.split("=" * 10)[1]
    both = _cli(*common, "--num-draft-tokens", 3, "--block-size", 4)
    assert both.exit_code != 0 and "Error: give block_size or num_draft_tokens, not both" in both.output


def test_cli_help_shows_the_adaptive_blocks_and_their_caps():
    help_text = " ".join(_cli("generate", "--help").output.split()).replace("- ", "-")  # unwrapped at hyphens
    assert "linear-spec and quadratic-spec choose theirs per cycle" in help_text
    assert f"up to the checkpoint's block and {blocks.AUTO_ROWS} rows" in help_text
    assert "--num-draft-tokens" in help_text
