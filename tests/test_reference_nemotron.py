"""Self-checks of the PyTorch NLD reference (tests/reference/nemotron.py): layout, attention modes, cache
policy, LoRA toggling, and greedy LinearSpec == greedy AR."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
N = pytest.importorskip("tests.reference.nemotron")

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12], [2, 2, 2], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nld")
    return folder, N.build_checkpoint(folder)


@pytest.fixture(scope="module")
def ref(saved):
    return saved[1]


@pytest.fixture(scope="module")
def ar_outputs(ref):
    return [N.ar_generate(ref, p, 32)[0] for p in PROMPTS]


def snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_layout(saved):
    from safetensors.torch import load_file

    folder, ref = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["NemotronLabsDiffusionModel"]
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert (config["mask_token_id"], config["block_size"], config["eos_token_id"]) == (100, 8, 11)
    assert config["head_dim"] == 32 and config["rope_parameters"]["rope_type"] == "yarn"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 11
    weights = load_file(folder / "model.safetensors")
    assert len(weights) == 9 * config["num_hidden_layers"] + 3
    assert {k.split(".")[0] for k in weights} == {"encoder", "diffusion_head"}
    assert torch.equal(weights["diffusion_head.weight"], ref.diffusion_head.weight.cpu())
    adapter = json.loads((folder / "linear_spec_lora" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["o_proj"] and adapter["lora_alpha"] / adapter["r"] == 4
    lora = load_file(folder / "linear_spec_lora" / "adapter_model.safetensors")
    A = lora["base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight"]
    B = lora["base_model.model.encoder.layers.0.self_attn.o_proj.lora_B.weight"]
    assert A.shape == (8, 4 * 32) and B.shape == (64, 8) and A.dtype == torch.float32
    assert B.abs().min() > 0


def test_bidirectional_leaves_cache_and_sees_everything(ref):
    cache = ref.new_cache()
    ref.forward([5, 17, 42, 9], cache, "causal")
    before = snapshot(cache)
    block = [7, 100, 100, 100]
    logits = ref.forward(block, cache, "bidirectional", write_cache=False)
    after = snapshot(cache)
    assert cache.get_seq_length() == 4
    assert all(torch.equal(a, b) for pair in zip(before, after) for a, b in zip(*pair))
    # no mask: the last token changes position 0; causally it does not
    changed = ref.forward([7, 100, 100, 55], cache, "bidirectional", write_cache=False)
    assert (changed[0] - logits[0]).abs().max() > 1e-3
    c1 = ref.forward(block, cache, "causal", write_cache=False)
    c2 = ref.forward([7, 100, 100, 55], cache, "causal", write_cache=False)
    assert torch.allclose(c1[:3], c2[:3], atol=1e-5)
    # explicit masks agree with the two modes
    full = torch.ones(4, 8, dtype=torch.bool)
    lower_right = torch.ones(4, 8, dtype=torch.bool).tril(diagonal=4)
    assert torch.allclose(ref.forward(block, cache, "custom", False, mask=full), logits, atol=1e-5)
    assert torch.allclose(ref.forward(block, cache, "custom", False, mask=lower_right), c1, atol=1e-5)
    assert cache.get_seq_length() == 4


def test_chunked_causal_equals_whole(ref):
    tokens = [(7 * i + 3) % 256 for i in range(80)]  # past original_max_position_embeddings: q-scale != 1
    whole = ref.forward(tokens, ref.new_cache(), "causal")
    cache = ref.new_cache()
    parts = [ref.forward(tokens[:50], cache), ref.forward(tokens[50:70], cache)]
    parts += [ref.forward([t], cache) for t in tokens[70:]]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-4)


def test_lora_toggles(ref):
    cache = ref.new_cache()
    ref.forward([5, 17, 42, 9], cache)
    block = [7] + [100] * 7
    plain = ref.forward(block, cache, "bidirectional", False)
    with_lora = ref.forward(block, cache, "bidirectional", False, lora=True)
    assert (with_lora - plain).abs().max() > 0.1
    assert torch.equal(ref.forward(block, cache, "bidirectional", False), plain)  # switched back off
    # the hook equals a merged o_proj (W + alpha/r * B @ A)
    saved = [layer.self_attn.o_proj.weight.clone() for layer in ref.encoder.layers]
    try:
        with torch.no_grad():
            for i, layer in enumerate(ref.encoder.layers):
                A, B = ref.lora[i]
                layer.self_attn.o_proj.weight += ref.lora_scale * B @ A
        merged = ref.forward(block, cache, "bidirectional", False)
    finally:
        with torch.no_grad():
            for layer, weight in zip(ref.encoder.layers, saved):
                layer.self_attn.o_proj.weight.copy_(weight)
    assert torch.allclose(merged, with_lora, atol=1e-4)


def test_linear_spec_drafts_with_lora_and_verifies_without(ref, monkeypatch):
    calls = []
    forward = ref.forward

    def recording(ids, cache, mode="causal", write_cache=True, lora=False, **kw):
        calls.append((mode, write_cache, lora))
        return forward(ids, cache, mode, write_cache, lora, **kw)

    monkeypatch.setattr(ref, "forward", recording)
    _, stats = N.linear_spec_generate(ref, PROMPTS[0], 16, 8)
    assert calls[0] == ("causal", True, False)
    assert set(calls[1:]) == {("bidirectional", False, True), ("causal", True, False)}
    assert stats["nfe"] == len(calls) == 1 + 2 * stats["cycles"]


@pytest.mark.parametrize("lora", [True, False])
def test_linear_spec_equals_ar(ref, ar_outputs, lora):
    accepted = []
    for prompt, ar in zip(PROMPTS, ar_outputs):
        for block in (4, 8, 16):
            out, stats = N.linear_spec_generate(ref, prompt, 32, block, lora=lora)
            assert out == ar, (prompt, block)
            assert stats["draft_steps"] == [1] * stats["cycles"]
            accepted += stats["accepted"]
        out, _ = N.linear_spec_generate(ref, prompt, 32, 8, lora=lora, threshold=0.9)
        assert out == ar
        eos = ar[20]
        out, _ = N.linear_spec_generate(ref, prompt, 32, 8, lora=lora, eos_id=eos)
        assert out == N.ar_generate(ref, prompt, 32, eos_id=eos)[0] == ar[: ar.index(eos) + 1]
    assert max(accepted) > 1  # the crop path is exercised


def test_diffusion_generate(ref):
    multi = 0
    for prompt in PROMPTS:
        out, stats = N.diffusion_generate(ref, prompt, 16, 8, threshold=0.9)
        assert len(out) == 16 and 100 not in out[:1]
        assert stats["nfe"] == sum(stats["steps_per_block"]) + len(stats["steps_per_block"])
        for block_commits, steps in zip(stats["commits"], stats["steps_per_block"]):
            assert len(block_commits) == steps <= 8
            assert all(len(step) >= 1 for step in block_commits)
            multi += sum(len(step) > 1 for step in block_commits)
        # the schedule (threshold None): 7 masks over 8 steps -> one per step
        _out_s, stats_s = N.diffusion_generate(ref, prompt, 16, 8, threshold=None)
        assert all(len(step) == 1 for block in stats_s["commits"] for step in block)
        # EOS: stop after the block that holds it, truncated after the first EOS
        eos = out[3]
        out_e, stats_e = N.diffusion_generate(ref, prompt, 16, 8, eos_id=eos)
        assert out_e == out[: out.index(eos) + 1] and len(stats_e["blocks"]) == 1
    assert multi > 0
    assert N.num_transfer_tokens(7, 8) == [1] * 7 + [0]
    assert N.num_transfer_tokens(10, 4) == [3, 3, 2, 2]


def test_reload_matches(saved):
    folder, ref = saved
    again = N.load_checkpoint(folder)
    assert again.config.rope_parameters == ref.config.rope_parameters
    block = [7] + [100] * 7
    for lora in (False, True):
        c1, c2 = ref.new_cache(), again.new_cache()
        ref.forward(PROMPTS[1], c1)
        again.forward(PROMPTS[1], c2)
        a = ref.forward(block, c1, "bidirectional", False, lora=lora)
        b = again.forward(block, c2, "bidirectional", False, lora=lora)
        assert torch.equal(a, b)
