"""Nemotron-Labs-Diffusion against the PyTorch reference (transformers' Ministral3Model + untied head, float32):
forward parity in every attention pattern, the diffusion mode step by step, and lossless self-speculation."""

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_dllm import DLLMError, load, stream_generate
from mlx_dllm.sampler.common import Stats, make_token_selector
from mlx_dllm.sampler.linear_spec import generate_linear_spec
from mlx_dllm.sampler.mask_diffusion import generate_mask_diffusion

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.reference.nemotron")

TOLERANCE = 1e-4
PROMPTS = [[5, 17, 42, 9, 3], [200, 7, 7, 31, 64, 12, 90, 4, 150], [77, 3]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nld")
    reference = ref.build_checkpoint(folder)
    model, tokenizer = load(str(folder))
    return reference, model, tokenizer


def _mlx(model, ids, cache, **kwargs):
    return np.array(model(mx.array([ids]), cache, **kwargs)[0])


def test_forward_parity_in_every_pattern(tmp_path):
    """A prompt past the original context of 64 (the Llama-4 query scale is active), prefilled in chunks;
    then a bidirectional block with and without the LoRA, and a causal verify. The head keeps its plain
    initialisation here (logits of order 1), so that 1e-4 measures the backbone, not float32 rounding."""
    reference = ref.build_checkpoint(tmp_path, head_gain=1.0)
    model, _ = load(str(tmp_path))
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 250, 80).tolist()
    ref_cache, cache = reference.new_cache(), model.make_cache()
    errors = {}
    expected = reference.forward(prompt, ref_cache, mode="causal", write_cache=True).numpy()
    ours = np.concatenate([_mlx(model, prompt[:50], cache), _mlx(model, prompt[50:], cache)])
    errors["causal prefill"] = np.abs(expected - ours).max()
    block = [int(expected[-1].argmax())] + [100] * 7
    for lora in (False, True):
        expected = reference.forward(block, ref_cache, mode="bidirectional", write_cache=False, lora=lora).numpy()
        ours = _mlx(model, block, cache, pattern="bidirectional", write_cache=False, lora=lora)
        errors[f"bidirectional lora={lora}"] = np.abs(expected - ours).max()
    verify = block[:1] + rng.integers(3, 250, 7).tolist()
    expected = reference.forward(verify, ref_cache, mode="causal", write_cache=True).numpy()
    errors["causal verify"] = np.abs(expected - _mlx(model, verify, cache)).max()
    assert cache[0].offset == 88
    assert max(errors.values()) <= TOLERANCE, errors
    assert np.abs(expected).max() > 1.0  # the logits are not vanishingly small


@pytest.mark.parametrize("threshold", [0.9, 0.5, None])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_diffusion_mode_commits_like_the_reference(checkpoint, threshold, prompt):
    reference, model, _ = checkpoint
    tokens, stats = ref.diffusion_generate(reference, prompt, 24, block_length=8, threshold=threshold)
    commits, ours, our_stats = [], [], Stats()
    record = lambda state: commits.append((state.canvas_index, state.committed))  # noqa: E731
    run = generate_mask_diffusion(
        model,
        mx.array(prompt),
        select=make_token_selector(),
        stats=our_stats,
        max_tokens=24,
        options={"block_length": 8, "threshold": threshold, "on_step": record},
    )
    for block in run:
        ours += block
    expected = [(b, done) for b, per_block in enumerate(stats["commits"]) for done in per_block]
    assert commits == expected
    assert ours == tokens
    # The reference counts denoising steps and every block's commit; we count the prefill instead of the
    # commit after the last block (nothing reads it), so the totals agree.
    assert our_stats.forwards == stats["nfe"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ar_matches_the_reference(checkpoint, monkeypatch, prompt):
    reference, model, tokenizer = checkpoint
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])  # both run the full 20 tokens
    expected, _ = ref.ar_generate(reference, prompt, 20)
    ours = [t for r in stream_generate(model, tokenizer, prompt, 20, mode="ar") for t in r.tokens]
    assert len(expected) == 20 and ours == expected


# The quadratic reference drafts without the LoRA, so it has no LoRA variant.
@pytest.mark.parametrize("mode, lora", [("linear-spec", True), ("linear-spec", False), ("quadratic-spec", False)])
@pytest.mark.parametrize("block_length", [2, 5, 8])
def test_self_speculation_equals_greedy_ar(checkpoint, monkeypatch, mode, block_length, lora):
    reference, model, tokenizer = checkpoint
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    for prompt in PROMPTS:
        expected, _ = ref.ar_generate(reference, prompt, 19)  # 19: the last block is longer than what is left
        options = {"block_length": block_length} | ({"lora": lora} if mode == "linear-spec" else {})
        responses = list(stream_generate(model, tokenizer, prompt, 19, mode=mode, **options))
        assert [t for r in responses for t in r.tokens] == expected, (prompt, block_length)
        # After the prefill's token each response is one verify round's commit; the last may be cut at 19.
        rounds = [len(r.tokens) for r in responses[1:]]
        assert all(1 <= n <= block_length for n in rounds)
        mean = responses[-1].acceptance_length
        assert sum(rounds) / len(rounds) <= mean <= (sum(rounds) + block_length - rounds[-1]) / len(rounds)


def test_linear_spec_matches_the_reference_cycle_by_cycle(checkpoint):
    reference, model, _ = checkpoint
    for prompt in PROMPTS:
        tokens, stats = ref.linear_spec_generate(reference, prompt, 20, block_length=8, lora=True)
        ours, our_stats = [], Stats()
        run = generate_linear_spec(
            model,
            mx.array(prompt),
            select=make_token_selector(),
            stats=our_stats,
            max_tokens=20,
            options={"block_length": 8, "lora": True},
        )
        for chunk in run:
            ours += chunk
        assert ours == tokens
        assert our_stats.accept_lengths == stats["accepted"][: len(our_stats.accept_lengths)]


def test_modes_and_lora_requests_it_cannot_serve(checkpoint, tmp_path):
    import shutil

    _, model, tokenizer = checkpoint
    with pytest.raises(DLLMError, match="support ar, diffusion, linear-spec, quadratic-spec, not dflash"):
        list(stream_generate(model, tokenizer, [5, 6], 4, mode="dflash"))
    ref.build_checkpoint(tmp_path / "nld")
    (tmp_path / "nld" / "linear_spec_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(DLLMError, match="no LoRA adapter in"):
        load(str(tmp_path / "nld"))
    shutil.rmtree(tmp_path / "nld" / "linear_spec_lora")
    base, base_tokenizer = load(str(tmp_path / "nld"))
    with pytest.raises(DLLMError, match="no drafter LoRA is loaded"):
        list(stream_generate(base, base_tokenizer, [5, 6], 4, mode="linear-spec", lora=True))


def test_tokens_per_forward_leaves_the_prefill_out(checkpoint, monkeypatch):
    _, model, tokenizer = checkpoint
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    last = list(stream_generate(model, tokenizer, PROMPTS[0], 16, mode="quadratic-spec", block_length=4))[-1]
    assert last.tokens_per_forward == pytest.approx(15 / last.forwards)  # the prefill's token and forward out
    assert last.draft_forwards == 1


@pytest.mark.parametrize("quantize", [False, True])
def test_converted_checkpoint_keeps_names_and_lora(checkpoint, tmp_path, quantize):
    from mlx.utils import tree_flatten

    from mlx_dllm import convert

    _, model, tokenizer = checkpoint
    source = tmp_path / "hf"
    ref.build_checkpoint(source)
    out = convert(source, tmp_path / "mlx", quantize=quantize, q_group_size=32)
    assert (out / "linear_spec_lora" / "adapter_model.safetensors").exists()
    converted, _ = load(str(out))
    assert converted.has_lora
    names = {name for name, _ in tree_flatten(converted.parameters()) if ".lora." not in name}
    assert "diffusion_head.weight" in names and "encoder.layers.0.self_attn.o_proj.weight" in names
    prompt = PROMPTS[0]
    expected = [t for r in stream_generate(model, tokenizer, prompt, 12, mode="ar") for t in r.tokens]
    for mode in ("ar", "linear-spec", "quadratic-spec"):
        ours = [t for r in stream_generate(converted, tokenizer, prompt, 12, mode=mode) for t in r.tokens]
        if quantize:
            reference = [t for r in stream_generate(converted, tokenizer, prompt, 12, mode="ar") for t in r.tokens]
            assert ours == reference, mode  # lossless on the quantized model too (LoRA over a quantized o_proj)
        else:
            assert ours == expected, mode


def test_cli_modes(tmp_path):
    from tests.test_cli import assert_user_error, run

    ref.build_checkpoint(tmp_path / "nld")
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        block = [] if mode == "ar" else ["--block-length", 4]
        result = run("generate", "--model", tmp_path / "nld", "-p", "w5 w9", "-m", 8, "--mode", mode, *block)
        assert result.exit_code == 0, result.output
        assert f"Mode: {mode}" in result.stdout.strip().splitlines()[-1]
    result = run("generate", "--model", tmp_path / "nld", "-p", "w5", "--mode", "linear-spec", "--no-lora")
    assert result.exit_code == 0, result.output
    assert_user_error(run("generate", "--model", tmp_path / "nld", "-p", "w5", "--mode", "dflash"), "not dflash")
    assert_user_error(run("generate", "--model", tmp_path / "nld", "-p", "w5", "--block-length", 1), "at least 2")
    result = run("generate", "--model", tmp_path / "nld", "-p", "w5", "--mode", "quadratic-spec", "--threshold", 0.9)
    assert_user_error(result, "unknown option threshold for mode quadratic-spec")


def test_cli_visualize_draws_the_diffusion_blocks(tmp_path):
    from tests.test_cli import run

    ref.build_checkpoint(tmp_path / "nld")
    args = ["--model", tmp_path / "nld", "-p", "w5 w9", "-m", 8, "--block-length", 4, "--mode", "diffusion"]
    result = run("generate", *args, "--visualize")
    assert result.exit_code == 0, result.output
    assert "[canvas 1 step 1] " in result.stdout and "[canvas 2 step 1] " in result.stdout
    assert "\x1b[1;32m" in result.stdout and "\x1b8\x1b[J" in result.stdout  # committed tokens bold, redraws erased
    erased = re.sub(r"\x1b7.*?\x1b8\x1b\[J", "", result.stdout, flags=re.S)  # each drawing, up to its erasure
    shown = re.sub(r"\x1b\[\d*[A-Za-z]", "", erased)
    plain = run("generate", *args).stdout
    assert shown.split("=" * 10)[1].split() == plain.split("=" * 10)[1].split()  # what stays is the plain text


def test_bidirectional_context_variant(tmp_path):
    """causal_context=False: the prompt and each commit are encoded bidirectionally (their K/V kept) and
    blocks are all masks. Parity of such a written bidirectional pass, then the variant end to end."""
    reference = ref.build_checkpoint(tmp_path, head_gain=1.0)
    model, _ = load(str(tmp_path))
    prompt = PROMPTS[1]
    ref_cache, cache = reference.new_cache(), model.make_cache()
    expected = reference.forward(prompt, ref_cache, mode="bidirectional", write_cache=True).numpy()
    np.testing.assert_allclose(_mlx(model, prompt, cache, pattern="bidirectional"), expected, atol=TOLERANCE)
    block = [100] * 8
    expected = reference.forward(block, ref_cache, mode="bidirectional", write_cache=False).numpy()
    ours = _mlx(model, block, cache, pattern="bidirectional", write_cache=False)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE)
    blocks, stats, steps = [], Stats(), []
    options = {"block_length": 8, "causal_context": False, "on_step": lambda *step: steps.append(step)}
    run = generate_mask_diffusion(
        model, mx.array(prompt), select=make_token_selector(), stats=stats, max_tokens=16, options=options
    )
    for block in run:
        blocks.append(block)
    assert len(blocks) == 2 and all(100 not in b for b in blocks)
    assert stats.canvases == 2 and len(steps) >= 2
    assert stats.forwards == 1 + len(steps) + 1  # the prompt, every denoising step, one commit between the blocks


def test_sampled_diffusion_is_seeded_and_departs_from_greedy(checkpoint, monkeypatch):
    """At a temperature the guesses are samples (confidence stays on the untempered softmax), reproducible
    from the seed."""
    _, model, tokenizer = checkpoint
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])

    def run(**options):
        return [
            t for r in stream_generate(model, tokenizer, PROMPTS[1], 24, mode="diffusion", **options) for t in r.tokens
        ]

    sampled = run(temp=1.5, seed=7)
    assert sampled == run(temp=1.5, seed=7)
    assert sampled != run()
