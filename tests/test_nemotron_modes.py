"""Nemotron-Labs-Diffusion decoding modes on a tiny random MLX model: the quadratic layout against brute-force
constructions, cache policies, the LoRA switch, and lossless self-speculation under forced acceptance."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from mlx_dllm import DLLMError
from mlx_dllm.models.nemotron_diffusion import LoRA, Model, ModelArgs
from mlx_dllm.sampler import blocks, linear_spec, quadratic_spec
from mlx_dllm.sampler.common import Stats, make_token_selector
from mlx_dllm.sampler.cost_curve import CostCurve
from mlx_dllm.kernels import patterns

YARN = {
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
PROMPT = [5, 17, 42, 9, 3, 77, 120, 8, 64, 33, 2, 19, 250, 31]  # past 16: the Llama-4 query scale is active


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = ModelArgs(
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        rope_parameters=YARN,
        max_position_embeddings=1024,
        mask_token_id=100,
        block_size=6,
    )
    model = Model(args)
    for layer in model.layers:
        layer.self_attn.lora = LoRA(mx.random.normal((4, 128)) * 0.2, mx.random.normal((64, 4)) * 0.2, 4.0)
    mx.eval(model.parameters())
    return model


def _brute_force_mask(rows):
    width = rows + 1
    tokens = [(row, col) for row in range(rows) for col in range(width)]
    allowed = np.zeros((len(tokens), len(tokens)), dtype=bool)
    for q, (q_row, q_col) in enumerate(tokens):
        for k, (k_row, k_col) in enumerate(tokens):
            draft_before = k_col == 0 and k_row <= q_row  # every token sees d_0 .. d_{its row}
            own_row = q_col != 0 and k_row == q_row  # a mask also sees its whole row
            allowed[q, k] = draft_before or own_row
    return allowed


@pytest.mark.parametrize("rows, prefix", [(2, 0), (3, 5), (6, 1)])
def test_quadratic_pattern_matches_brute_force(rows, prefix):
    L = rows * (rows + 1)
    seen = np.array(patterns.visible(patterns.quadratic(prefix, rows), L, prefix + L))
    assert seen[:, :prefix].all()  # the cache is always visible
    np.testing.assert_array_equal(seen[:, prefix:], _brute_force_mask(rows))


def _cache_with(model, tokens):
    cache = model.make_cache()
    model(mx.array([tokens]), cache)
    return cache


def test_quadratic_forward_rows_equal_causal_verify_and_row_drafts(model):
    """Row i's d token = the causal pass over d_0..d_i; row i's masks = a bidirectional pass over the
    masks once d_0..d_i are committed causally: the layout is those 2B forwards in one."""
    rows, mask_id = 4, model.args.mask_token_id
    draft = [11, 23, 5, 200]
    cache = _cache_with(model, PROMPT)
    committed = cache[0].offset
    layout = [t for d in draft for t in [d] + [mask_id] * rows]
    pattern = patterns.quadratic(committed, rows)
    fused = model(mx.array([layout]), copy.deepcopy(cache), pattern=pattern, row_offsets=committed + mx.arange(rows))
    fused = np.array(fused[0]).reshape(rows, rows + 1, -1)
    causal = np.array(model(mx.array([draft]), copy.deepcopy(cache))[0])
    for i in range(rows):
        np.testing.assert_allclose(fused[i, 0], causal[i], atol=1e-4)
        row_cache = _cache_with(model, PROMPT + draft[: i + 1])
        alone = model(mx.array([[mask_id] * rows]), row_cache, pattern="bidirectional", write_cache=False)
        np.testing.assert_allclose(fused[i, 1:], np.array(alone[0]), atol=1e-4)


def test_bidirectional_pass_leaves_the_cache_as_it_was(model):
    cache = _cache_with(model, PROMPT)
    before = [(c.offset, np.array(c.keys[..., : c.offset, :])) for c in cache]
    model(mx.array([[7] + [100] * 5]), cache, pattern="bidirectional", write_cache=False, lora=True)
    for (offset, keys), c in zip(before, cache):
        assert c.offset == offset
        np.testing.assert_array_equal(np.array(c.keys[..., : c.offset, :]), keys)


def test_lora_changes_drafts_and_never_the_verify(model):
    block = mx.array([[7] + [100] * 5])
    plain = model(block, _cache_with(model, PROMPT), pattern="bidirectional", write_cache=False)
    with_lora = model(block, _cache_with(model, PROMPT), pattern="bidirectional", write_cache=False, lora=True)
    assert float(mx.abs(plain - with_lora).max()) > 1e-2
    verify = model(mx.array([[7, 8, 9]]), _cache_with(model, PROMPT))
    lora_off = model(mx.array([[7, 8, 9]]), _cache_with(model, PROMPT), lora=False)
    np.testing.assert_array_equal(np.array(verify), np.array(lora_off))


def _run(strategy, model, max_tokens, stats=None, **options):
    """All tokens a strategy yields, called directly (no front, no EOS)."""
    chunks = strategy(
        model,
        mx.array(PROMPT),
        select=make_token_selector(),
        stats=stats or Stats(),
        max_tokens=max_tokens,
        options=options,
    )
    return [t for chunk in chunks for t in chunk]


def _ar(model, tokens):
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens)]


class Oracle:
    """Drafts that are the true continuation for the first k positions of a block (k cycling), then wrong."""

    def __init__(self, reference, pattern):
        self.reference, self.pattern, self.calls = reference, pattern, 0

    def tokens(self, position, count):
        correct = self.pattern[self.calls % len(self.pattern)]
        self.calls += 1
        start = position - len(PROMPT)
        truth = [self.reference[start + j] if start + j < len(self.reference) else 0 for j in range(count)]
        return [t if j < correct else (t + 1) % 256 for j, t in enumerate(truth)]


@pytest.mark.parametrize("block_length", [2, 4, 6])
@pytest.mark.parametrize("oracle", [False, True], ids=["model-drafts", "forced-acceptance"])
def test_quadratic_spec_is_lossless(model, monkeypatch, block_length, oracle):
    max_tokens = 25  # not a multiple of the block: the last forward runs past what is left
    reference = _ar(model, max_tokens + 2 * block_length)
    if oracle:
        forced = Oracle(reference, [5, 0, 2, 5, 1])
        monkeypatch.setattr(
            quadratic_spec,
            "propose",
            lambda model, hidden, position: mx.array(forced.tokens(position, hidden.shape[0]), dtype=mx.int32),
        )
    stats = Stats()
    out = _run(quadratic_spec.generate_quadratic_spec, model, max_tokens, stats, block_length=block_length)
    assert out[:max_tokens] == reference[:max_tokens]
    if oracle and block_length > 2:
        assert max(stats.accept_lengths) > 2


@pytest.mark.parametrize("block_length", [2, 4, 6])
@pytest.mark.parametrize("lora", [True, False])
def test_linear_spec_is_lossless(model, monkeypatch, block_length, lora):
    max_tokens = 23
    reference = _ar(model, max_tokens)
    forced = Oracle(reference, [5, 0, 2, 5, 1])
    real, sizes = linear_spec.draft_block, []

    def oracle_drafts(model, cache, seed, size, threshold, lora, stats):
        sizes.append(size)
        real(model, cache, seed, size, threshold, lora, stats)  # the real draft forward still runs
        return mx.array([seed] + forced.tokens(cache[0].offset + 1, size - 1), dtype=mx.int32)

    monkeypatch.setattr(linear_spec, "draft_block", oracle_drafts)
    stats = Stats()
    out = _run(linear_spec.generate_linear_spec, model, max_tokens, stats, block_length=block_length, lora=lora)
    assert out == reference
    assert stats.forwards == 1 + sum(stats.rounds.values())
    assert sizes[:-1] == [block_length] * (len(sizes) - 1)  # pinned: only the last block is cut to what is left
    if block_length > 2:
        assert max(stats.accept_lengths) > 2


# Synthetic machines (a tiny model's timings are noise): a GPU's forward costs about the same up to 72 tokens, a
# 2-core CPU's grows with its tokens.
GPU = CostCurve((1, 72), (0.010, 0.011), draft_seconds=0.011)
CPU = CostCurve((1, 8, 32, 72), (0.050, 0.090, 0.200, 0.400), draft_seconds=0.400)
# Drafts right for the first k positions of each block, k cycling: never, always, or by turns.
PATTERNS = {"never": [0], "always": [99], "mixed": [5, 0, 2, 5, 1, 3, 3]}


@pytest.fixture
def machine(monkeypatch):
    """The cost curve the adaptive block choice reads, instead of one measured here."""
    return lambda curve: monkeypatch.setattr(blocks, "measured_costs", lambda model: curve)


@pytest.mark.parametrize("curve", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("pattern", ["own-drafts", *PATTERNS])
def test_adaptive_linear_spec_is_lossless(model, monkeypatch, machine, curve, pattern):
    machine(curve)
    max_tokens = 40
    reference = _ar(model, max_tokens)
    sizes, real = [], linear_spec.draft_block

    def drafts(model, cache, seed, size, threshold, lora, stats):
        sizes.append(size)
        block = real(model, cache, seed, size, threshold, lora, stats)
        if pattern == "own-drafts":
            return block
        return mx.array([seed] + forced.tokens(cache[0].offset + 1, size - 1), dtype=mx.int32)

    forced = Oracle(reference, PATTERNS.get(pattern, [0]))
    monkeypatch.setattr(linear_spec, "draft_block", drafts)
    stats = Stats()
    assert _run(linear_spec.generate_linear_spec, model, max_tokens, stats) == reference
    assert stats.forwards == 1 + len(sizes) == 1 + sum(stats.rounds.values())
    assert stats.draft_forwards == sum(size > 1 for size in sizes)  # an AR step drafts nothing
    assert stats.rounds.get("ar", 0) == sizes.count(1) and max(sizes) <= model.args.block_size
    if pattern == "never":
        assert sizes.count(1) > len(sizes) / 2 and stats.speculation["ar"] > 0.5
    if pattern == "always" and curve is GPU:
        assert sizes[:-1] == [model.args.block_size] * (len(sizes) - 1)
    if pattern == "mixed":
        assert len(set(sizes)) > 1


@pytest.mark.parametrize("curve", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("pattern", ["own-drafts", *PATTERNS])
def test_adaptive_quadratic_spec_is_lossless(model, monkeypatch, machine, curve, pattern):
    machine(curve)
    max_tokens = 40
    reference = _ar(model, max_tokens + 2 * blocks.AUTO_ROWS)
    if pattern != "own-drafts":
        forced = Oracle(reference, PATTERNS[pattern])
        monkeypatch.setattr(
            quadratic_spec,
            "propose",
            lambda model, hidden, position: mx.array(forced.tokens(position, hidden.shape[0]), dtype=mx.int32),
        )
    drafts, real = [], quadratic_spec.layout_forward
    monkeypatch.setattr(
        quadratic_spec, "layout_forward", lambda model, cache, draft, select: drafts.append(draft.tolist()) or real(
            model, cache, draft, select
        )
    )
    stats = Stats()
    out = _run(quadratic_spec.generate_quadratic_spec, model, max_tokens, stats)
    assert out[:max_tokens] == reference[:max_tokens]
    rows = [len(draft) for draft in drafts]
    assert 2 <= min(rows) and max(rows) <= blocks.AUTO_ROWS
    assert stats.rounds == {"chain": len(rows)} and stats.verified_nodes == sum(rows) - len(rows)
    mask_id = model.args.mask_token_id
    for cycle in range(1, len(rows)):
        before, after = rows[cycle - 1], rows[cycle]
        if after > before:  # a grown draft: the last layout drafted `before` tokens, mask ids pad the rest
            assert drafts[cycle][before:] == [mask_id] * (after - before)
    if pattern == "never":
        assert rows[-3:] == [2, 2, 2]
    if pattern == "always" and curve is GPU:
        assert rows[-3:] == [blocks.AUTO_ROWS] * 3
    if pattern == "always" and curve is CPU:  # it grew, short of rows whose compute outgrows the tokens
        assert rows[0] < rows[-1] < blocks.AUTO_ROWS


def test_block_length_below_two_is_refused(model):
    with pytest.raises(DLLMError, match="block length must be at least 2"):
        next(
            linear_spec.generate_linear_spec(
                model,
                mx.array(PROMPT),
                select=make_token_selector(),
                stats=Stats(),
                max_tokens=4,
                options={"block_length": 1},
            )
        )


def _ar_with_forced(model, forced_at, token, length):
    """Greedy AR that emits `token` at generation index `forced_at` and carries on after it."""
    out = _ar(model, forced_at) + [token]
    rest = [int(t) for t, _ in generate_step(mx.array(PROMPT + out), model, max_tokens=length - len(out))]
    return out + rest


@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec", "diffusion"])
def test_thinking_budget_forces_the_end_of_thinking_once(model, mode):
    from mlx_dllm.sampler.mask_diffusion import generate_mask_diffusion

    end_think, limit, total = 250, 7, 20
    strategies = {
        "linear-spec": linear_spec.generate_linear_spec,
        "quadratic-spec": quadratic_spec.generate_quadratic_spec,
        "diffusion": generate_mask_diffusion,
    }
    options = {"block_length": 4, "max_thinking_tokens": limit, "end_think_token_id": end_think}
    out = _run(strategies[mode], model, total, **options)[:total]
    forced = out.index(end_think)
    assert forced >= limit and out.count(end_think) == 1
    if mode != "diffusion":  # self-speculation stays lossless around the forced token
        assert out == _ar_with_forced(model, forced, end_think, total)
    else:
        assert forced == limit
