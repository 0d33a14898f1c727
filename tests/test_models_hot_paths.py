"""Model-level correctness and Mac hot paths: config checks, feature capture, dtypes, cache reads, MoE gathers."""

import json
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.models import qwen3
from mlx_lm.models.gemma4_text import Router, geglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import load_tokenizer

from mlx_dllm import DLLMError, convert, load, stream_generate
from mlx_dllm.cli import main
from mlx_dllm.models import dflash, diffusion_gemma, nemotron_diffusion
from mlx_dllm.models.target import Target
from mlx_dllm.sampler.diffusion import DiffusionSettings
from tests.oracle import record_chain_proposals

torch = pytest.importorskip("torch")
dg_ref = pytest.importorskip("tests.reference.diffusion_gemma")
harness = pytest.importorskip("tests.reference.harness")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion_gemma")
    dg_ref.build_model(folder)
    return folder


def _gemma_config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("canvas_length", [10**9, 0, -3, 8.0, "8", True, None])
def test_canvas_length_out_of_range_is_refused_before_mlx(gemma_folder, canvas_length):
    config = _gemma_config(gemma_folder)
    config["canvas_length"] = canvas_length
    with pytest.raises(DLLMError, match="canvas_length must be an integer from 1 to 4096"):
        diffusion_gemma.ModelArgs.from_dict(config)


def test_largest_canvas_length_is_accepted(gemma_folder):
    config = _gemma_config(gemma_folder)
    config["canvas_length"] = diffusion_gemma.MAX_CANVAS_LENGTH
    assert diffusion_gemma.ModelArgs.from_dict(config).canvas_length == 4096


@pytest.mark.parametrize(
    "knob, value",
    [
        ("entropy_bound", "0.1"),
        ("max_denoising_steps", "abc"),
        ("max_denoising_steps", 48.0),
        ("stability_threshold", True),
        ("t_min", [0.4]),
        ("confidence_threshold", {"value": 0.005}),
        ("t_max", float("inf")),
        ("t_min", float("nan")),
        ("entropy_bound", float("nan")),
        ("confidence_threshold", float("nan")),
    ],
)
def test_diffusion_knob_of_the_wrong_kind_is_named(knob, value):
    with pytest.raises(DLLMError, match=f"diffusion option {knob} must be"):
        DiffusionSettings.resolve({"sampler_config": {knob: value}}, {})
    with pytest.raises(DLLMError, match=f"diffusion option {knob} must be"):
        DiffusionSettings.resolve(None, {knob: value})


def test_cli_t_max_inf_is_one_error_line(gemma_folder):
    result = CliRunner().invoke(main, ["generate", "--model", str(gemma_folder), "-p", "w5", "--t-max", "inf"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == "Error: diffusion option t_max must be a finite number, got inf"


def _tiny_nemotron():
    mx.random.seed(0)
    args = nemotron_diffusion.ModelArgs(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        mask_token_id=100,
        block_size=4,
    )
    model = nemotron_diffusion.Model(args)
    mx.eval(model.parameters())
    return model


def _write_adapter(folder, config, shapes=((4, 128), (64, 4)), layers=2):
    folder.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    tensors = {}
    for i in range(layers):
        stem = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{stem}.lora_A.weight"] = mx.random.normal(shapes[0]) * 0.1
        tensors[f"{stem}.lora_B.weight"] = mx.random.normal(shapes[1]) * 0.1
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    return folder


GOOD_ADAPTER = {"target_modules": ["o_proj"], "r": 4, "lora_alpha": 16}


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "is not readable JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ({"target_modules": ["o_proj"], "lora_alpha": 16}, "r must be a positive integer, got None"),
        ({**GOOD_ADAPTER, "r": 0}, "r must be a positive integer, got 0"),
        ({**GOOD_ADAPTER, "r": -4}, "r must be a positive integer, got -4"),
        ({**GOOD_ADAPTER, "r": "4"}, "r must be a positive integer, got '4'"),
        ({**GOOD_ADAPTER, "r": 4.5}, "r must be a positive integer, got 4.5"),
        ({"target_modules": ["o_proj"], "r": 4}, "lora_alpha must be a positive number, got None"),
        ({**GOOD_ADAPTER, "lora_alpha": 0}, "lora_alpha must be a positive number, got 0"),
        ({**GOOD_ADAPTER, "lora_alpha": -1.0}, "lora_alpha must be a positive number, got -1.0"),
        ({**GOOD_ADAPTER, "lora_alpha": "16"}, "lora_alpha must be a positive number, got '16'"),
        ({**GOOD_ADAPTER, "lora_alpha": True}, "lora_alpha must be a positive number, got True"),
        ({**GOOD_ADAPTER, "target_modules": "o_proj"}, "LoRA targets 'o_proj' are not supported"),
    ],
)
def test_bad_lora_config_is_one_error(tmp_path, config, message):
    model = _tiny_nemotron()
    with pytest.raises(DLLMError, match=message):
        model.load_lora(_write_adapter(tmp_path / "lora", config))
    assert not model.has_lora


@pytest.mark.parametrize(
    "shapes", [((4, 64), (64, 4)), ((4, 128), (128, 4)), ((8, 128), (64, 8)), ((4, 128, 1), (64, 4))]
)
def test_lora_tensors_of_the_wrong_shape_are_refused(tmp_path, shapes):
    model = _tiny_nemotron()
    with pytest.raises(DLLMError, match="layer 0 has A .* expected \\(4, 128\\) and \\(64, 4\\)"):
        model.load_lora(_write_adapter(tmp_path / "lora", GOOD_ADAPTER, shapes))
    assert not model.has_lora


def test_lora_bad_in_a_later_layer_attaches_nothing(tmp_path):
    folder = _write_adapter(tmp_path / "lora", GOOD_ADAPTER)
    tensors = mx.load(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight"] = mx.zeros((64, 3))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    model = _tiny_nemotron()
    with pytest.raises(DLLMError, match="layer 1 has A"):
        model.load_lora(folder)
    assert all(layer.self_attn.lora is None for layer in model.layers)


def test_unreadable_lora_safetensors_is_one_error(tmp_path):
    folder = _write_adapter(tmp_path / "lora", GOOD_ADAPTER)
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(DLLMError, match="cannot read the LoRA weights"):
        _tiny_nemotron().load_lora(folder)


def test_good_lora_loads(tmp_path):
    model = _tiny_nemotron()
    model.load_lora(_write_adapter(tmp_path / "lora", GOOD_ADAPTER))
    assert model.has_lora and model.layers[0].self_attn.lora.scale == 4.0


@pytest.fixture(scope="module")
def last_layer_drafts(hf_checkpoints, tmp_path_factory):
    """name -> (torch drafter, our drafter): drafters reading the target's last layer."""
    root = tmp_path_factory.mktemp("last_layer_drafts")
    drafts = {}
    for name, checkpoint in hf_checkpoints.items():
        config = checkpoint["target_model"].config
        torch_draft = harness.build_draft(config, root / name / "hf", target_layer_ids=harness.LAST_LAYER_IDS)
        drafts[name] = (torch_draft, load(str(convert(root / name / "hf", root / name / "mlx")))[0])
    return drafts


@pytest.mark.parametrize("name", list(harness.TARGETS))
def test_last_layer_feature_is_the_final_normed_hidden_state(hf_checkpoints, mlx_checkpoints, name):
    ids = [5, 17, 42, 9, 3, 77, 120, 8, 64, 33, 2, 19]
    hidden = hf_checkpoints[name]["target_model"](torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[i + 1] for i in harness.LAST_LAYER_IDS], dim=-1).detach().numpy()
    model, _ = load(str(mlx_checkpoints[name]["target"]))
    target = Target(model, harness.LAST_LAYER_IDS)
    _, features = target(mx.array([ids]), target.make_cache())
    np.testing.assert_allclose(np.array(features), expected, atol=1e-4, rtol=0)


def _record_transformers_drafts(monkeypatch):
    generator = transformers.generation.candidate_generator.DFlashTokenCandidateGenerator
    drafts, get_candidates = [], generator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidates, logits = get_candidates(self, input_ids, *args, **kwargs)
        if candidates.shape[1] > input_ids.shape[1]:
            drafts.append(candidates[0, input_ids.shape[1] :].tolist())
        return candidates, logits

    monkeypatch.setattr(generator, "get_candidates", recording)
    return drafts


@pytest.mark.parametrize("name", list(harness.TARGETS))
def test_last_layer_drafter_drafts_as_transformers_does(
    hf_checkpoints, mlx_checkpoints, last_layer_drafts, name, monkeypatch
):
    """Greedy DFlash with a drafter on the last layer: same tokens and the same proposals, round by round."""
    torch_draft, draft = last_layer_drafts[name]
    target, tokenizer = load(str(mlx_checkpoints[name]["target"]))
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    prompt, max_tokens = [100, 3, 3, 250, 7, 64, 12], 24
    theirs = _record_transformers_drafts(monkeypatch)
    expected = harness.reference_dflash_greedy(hf_checkpoints[name]["target_model"], torch_draft, prompt, max_tokens)
    ours = record_chain_proposals(monkeypatch)
    chain = stream_generate(target, tokenizer, prompt, max_tokens, draft_model=draft, speculation="chain")
    tokens = [t for r in chain for t in r.tokens]
    assert tokens == expected
    # Near the end we shrink the block to the tokens left and transformers does not: compare full blocks.
    full = [i for i, (a, b) in enumerate(zip(ours, theirs)) if len(a) == len(b) == 7]
    assert len(full) >= 10 and [ours[i] for i in full] == [theirs[i] for i in full]


def _dflash_tokens(responses):
    return [t for r in responses for t in r.tokens]


@pytest.fixture
def qwen_pair(mlx_checkpoints, monkeypatch):
    target, tokenizer = load(str(mlx_checkpoints["qwen3_gqa"]["target"]))
    draft, _ = load(str(mlx_checkpoints["qwen3_gqa"]["draft"]))
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    return target, tokenizer, draft


def test_two_interleaved_dflash_generators_on_one_target(qwen_pair):
    target, tokenizer, draft = qwen_pair
    prompts = ([5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12])
    alone = [_dflash_tokens(stream_generate(target, tokenizer, p, 20, draft_model=draft)) for p in prompts]
    generators = [stream_generate(target, tokenizer, p, 20, draft_model=draft) for p in prompts]
    interleaved = [[], []]
    for first, second in zip(*generators):
        interleaved[0] += first.tokens
        interleaved[1] += second.tokens
    for index, generator in enumerate(generators):
        interleaved[index] += _dflash_tokens(generator)
    assert interleaved == alone
    assert alone[0] != alone[1]


def test_dflash_generators_on_two_threads_share_one_target(qwen_pair):
    target, tokenizer, draft = qwen_pair
    prompts = [[5, 17, 42, 9], [100, 3, 3, 250, 7, 64, 12], [77], [9, 8, 7]]
    alone = [_dflash_tokens(stream_generate(target, tokenizer, p, 16, draft_model=draft)) for p in prompts]

    def run(prompt):
        return _dflash_tokens(stream_generate(target, tokenizer, prompt, 16, draft_model=draft))

    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(run, prompts))
    assert threaded == alone


def _unsorted_experts(experts, x, indices, weights):
    """The gathers in token order, as before sorting."""
    x = mx.expand_dims(x, (-2, -3))
    gate_up = experts.gate_up_proj(x, indices)
    hidden = geglu(gate_up[..., : experts.intermediate], gate_up[..., experts.intermediate :])
    return (experts.down_proj(hidden, indices).squeeze(-2) * weights[..., None]).sum(axis=-2)


def _spy(monkeypatch, name):
    calls, original = [], getattr(mx, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("sorted_indices", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(mx, name, spy)
    return calls


def _moe_layer(quantized=False):
    """A DiffusionGemma router + experts with gather-friendly sizes (64 wide, 8 experts, top 2)."""
    args = diffusion_gemma.TextArgs.from_dict(
        dict(
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=32,
        )
    )
    mx.random.seed(3)
    router, experts = Router(args), diffusion_gemma.Experts(args)
    if quantized:
        nn.quantize(experts, group_size=32, bits=4)
    mx.eval(router.parameters(), experts.parameters())
    return router, experts


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_moe_sorts_canvas_tokens_by_expert(monkeypatch, quantized):
    router, experts = _moe_layer(quantized)
    x = mx.random.normal((1, 64, 64))  # a canvas: 64 tokens x top-2 experts
    indices, weights = router(x)
    expected = _unsorted_experts(experts, x, indices, weights)
    calls = _spy(monkeypatch, "gather_qmm" if quantized else "gather_mm")
    out = experts(x, indices, weights)
    assert calls == [True, True]
    np.testing.assert_array_equal(np.array(out), np.array(expected))


def test_moe_leaves_a_few_tokens_in_order(monkeypatch):
    router, experts = _moe_layer()
    x = mx.random.normal((1, 3, 64))
    calls = _spy(monkeypatch, "gather_mm")
    experts(x, *router(x))
    assert calls == [False, False]


def _cache_sized_concatenations(monkeypatch, cached_rows):
    """Counts mx.concatenate calls fed a [B, H, T, D] tensor with T >= the cached rows: a copy of the cache."""
    calls, concatenate = [], mx.concatenate

    def spy(arrays, *args, **kwargs):
        calls.extend(a.shape for a in arrays if a.ndim == 4 and a.shape[2] >= cached_rows)
        return concatenate(arrays, *args, **kwargs)

    monkeypatch.setattr(mx, "concatenate", spy)
    return calls


def _attention_inputs(monkeypatch, module):
    seen, attention = [], module.attention

    def spy(queries, keys, values, *args, **kwargs):
        seen.append((keys, values))
        return attention(queries, keys, values, *args, **kwargs)

    monkeypatch.setattr(module, "attention", spy)
    return seen


def _snapshot(cache):
    return [(c.offset, np.array(c.keys_and_values()[0]), np.array(c.keys_and_values()[1])) for c in cache]


def _assert_cache_unchanged(before, cache):
    for (offset, keys, values), layer_cache in zip(before, cache):
        assert layer_cache.offset == offset
        np.testing.assert_array_equal(np.array(layer_cache.keys_and_values()[0]), keys)
        np.testing.assert_array_equal(np.array(layer_cache.keys_and_values()[1]), values)


def _assert_attends_cache_then_block(seen, before, block_rows):
    """What the old concat path fed attention: every cached row, bit for bit, then the block's."""
    for (keys, values), (offset, cached_keys, cached_values) in zip(seen, before):
        assert keys.shape[2] == offset + block_rows
        np.testing.assert_array_equal(np.array(keys[..., :offset, :]), cached_keys)
        np.testing.assert_array_equal(np.array(values[..., :offset, :]), cached_values)


@pytest.mark.parametrize("lora", [False, True])
def test_nemotron_bidirectional_pass_does_not_copy_the_cache(monkeypatch, lora):
    model = _tiny_nemotron()
    for layer in model.layers:
        layer.self_attn.lora = nemotron_diffusion.LoRA(mx.random.normal((4, 128)), mx.random.normal((64, 4)), 4.0)
    cache = model.make_cache()
    model(mx.random.randint(0, 256, (1, 40)), cache)
    block = mx.random.randint(0, 256, (1, 6))
    before = _snapshot(cache)
    expected = np.array(model(block, cache, "bidirectional", False, lora=lora))
    seen = _attention_inputs(monkeypatch, nemotron_diffusion)
    copies = _cache_sized_concatenations(monkeypatch, 40)
    logits = model(block, cache, "bidirectional", False, lora=lora)
    mx.eval(logits)
    assert copies == []
    np.testing.assert_array_equal(np.array(logits), expected)
    _assert_attends_cache_then_block(seen, before, 6)
    _assert_cache_unchanged(before, cache)


def test_diffusion_gemma_denoiser_does_not_copy_the_cache(gemma_folder, monkeypatch):
    model, _ = load(str(gemma_folder))
    cache = model.make_cache()
    model.encode(mx.random.randint(0, 256, (1, 30)), cache)
    canvas = mx.random.randint(0, 256, (1, dg_ref.CANVAS))
    before = _snapshot(cache)
    expected = np.array(model.denoise(canvas, cache))
    seen = _attention_inputs(monkeypatch, diffusion_gemma)
    copies = _cache_sized_concatenations(monkeypatch, 30)  # sliding layers copy only their last window-1 rows
    logits = model.denoise(canvas, cache)
    mx.eval(logits)
    assert copies == []
    np.testing.assert_array_equal(np.array(logits), expected)
    full = [i for i, t in enumerate(model.text.layer_types) if t == "full_attention"]
    _assert_attends_cache_then_block([seen[i] for i in full], [before[i] for i in full], dg_ref.CANVAS)
    _assert_cache_unchanged(before, cache)


@pytest.mark.parametrize("architecture", ["DFlashDraftModel", "MuseGlimmerAssistantModel"])
def test_dflash_drafter_does_not_copy_the_cache(monkeypatch, architecture):
    args = dflash.ModelArgs(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        block_size=8,
        mask_token_id=1,
        target_layer_ids=[0, 1],
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
        architectures=[architecture],
    )
    mx.random.seed(5)
    draft = dflash.Model(args)
    cache = draft.make_cache()
    draft(mx.random.normal((1, 8, 64)), mx.random.normal((1, 30, 128)), cache)
    block, features = mx.random.normal((1, 8, 64)), mx.random.normal((1, 2, 128))
    before = _snapshot(cache)
    seen = _attention_inputs(monkeypatch, dflash)
    copies = _cache_sized_concatenations(monkeypatch, 30)
    hidden = draft(block, features, cache, start=1)
    mx.eval(hidden)
    assert copies == []
    offset, cached_keys, _ = before[0]
    keys = seen[0][0]
    assert keys.shape[2] == offset + 2 + 8  # cache, new context rows, block
    np.testing.assert_array_equal(np.array(keys[..., :offset, :]), cached_keys)
    assert [c.offset for c in cache] == [32, 32]  # the new context rows stay, the block does not


class DtypeProbe:
    """Records the output dtypes of every linear, embedding and decoder layer a generation runs."""

    def __init__(self, monkeypatch, layer_classes):
        self.seen = set()
        for cls in (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear):
            self._watch(monkeypatch, cls, "linear")
        for cls in (nn.Embedding, nn.QuantizedEmbedding):
            self._watch(monkeypatch, cls, "embedding")
        for cls in layer_classes:
            self._watch(monkeypatch, cls, "hidden")

    def _watch(self, monkeypatch, cls, kind):
        original = cls.__call__

        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            self.seen.add((kind, (out[0] if isinstance(out, tuple) else out).dtype))
            return out

        monkeypatch.setattr(cls, "__call__", recorded)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    harness.save_tokenizer(folder)
    return load_tokenizer(folder)


def _cast(model, dtype):
    """bf16, or 4-bit weights with bf16 scales (a quantized bf16 checkpoint)."""
    model.set_dtype(mx.bfloat16)
    if dtype == "4-bit":
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    return model


def _run(model, tokenizer, monkeypatch, max_tokens=10, **options):
    monkeypatch.setattr(tokenizer, "eos_token_ids", [])
    return [t for r in stream_generate(model, tokenizer, [5, 17, 42, 9], max_tokens, **options) for t in r.tokens]


BF16_ONLY = {("linear", mx.bfloat16), ("embedding", mx.bfloat16), ("hidden", mx.bfloat16)}


@pytest.mark.parametrize("dtype", ["bf16", "4-bit"])
@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_nemotron_stays_in_its_dtype_in_every_mode(tmp_path, word_tokenizer, monkeypatch, dtype, mode):
    model = _cast(_tiny_nemotron(), dtype)
    model.load_lora(_write_adapter(tmp_path / "lora", GOOD_ADAPTER))  # float32 tensors, as PEFT saves them
    probe = DtypeProbe(monkeypatch, [nemotron_diffusion.TransformerBlock])
    assert len(_run(model, word_tokenizer, monkeypatch, mode=mode)) == 10
    assert probe.seen == BF16_ONLY


@pytest.mark.parametrize(
    "target_dtype, draft_dtype", [("bf16", mx.bfloat16), ("4-bit", mx.float32), ("fp16", mx.bfloat16)]
)
def test_dflash_runs_in_the_target_dtype(mlx_checkpoints, word_tokenizer, monkeypatch, target_dtype, draft_dtype):
    """A drafter of another dtype (fp16 target + bf16 drafter) is aligned at bind time, not promoted to fp32."""
    target, _ = load(str(mlx_checkpoints["qwen3_gqa"]["target"]))
    draft, _ = load(str(mlx_checkpoints["qwen3_gqa"]["draft"]))
    if target_dtype == "fp16":
        target.set_dtype(mx.float16)
    else:
        _cast(target, target_dtype)
    draft.set_dtype(draft_dtype)
    expected = mx.float16 if target_dtype == "fp16" else mx.bfloat16
    probe = DtypeProbe(monkeypatch, [qwen3.TransformerBlock, dflash.DecoderLayer])
    for mode in ("ar", "dflash"):
        probe.seen.clear()
        draft_model = draft if mode == "dflash" else None
        assert len(_run(target, word_tokenizer, monkeypatch, draft_model=draft_model, mode=mode)) == 10
        assert probe.seen == {("linear", expected), ("embedding", expected), ("hidden", expected)}, mode


@pytest.fixture(scope="module")
def quantizable_gemma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusion_gemma_q")
    dg_ref.build_model(folder, intermediate_size=64, moe_intermediate_size=32)
    return folder


@pytest.mark.parametrize("dtype", ["bf16", "4-bit"])
def test_diffusion_gemma_stays_in_its_dtype(quantizable_gemma_folder, word_tokenizer, monkeypatch, dtype):
    """The denoiser's logits are float32 by design (transformers); everything before them keeps the dtype."""
    model, _ = load(str(quantizable_gemma_folder))
    _cast(model, dtype)
    probe = DtypeProbe(monkeypatch, [diffusion_gemma.DecoderLayer])
    denoised = []
    denoise = model.denoise
    monkeypatch.setattr(model, "denoise", lambda *a: denoised.append(denoise(*a)) or denoised[-1])
    mx.random.seed(0)
    assert len(_run(model, word_tokenizer, monkeypatch, max_tokens=12)) >= 12
    assert probe.seen == BF16_ONLY
    assert {logits.dtype for logits in denoised} == {mx.float32}


def _relative_error(logits, reference):
    return float(np.abs(logits - reference).mean() / np.abs(reference).mean())


def _reference_denoise(folder, dtype, prompt, canvas):
    reference = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype).eval()
    cache = dg_ref.new_cache(reference)
    dg_ref.encode(reference, prompt, cache)
    return dg_ref.denoise(reference, canvas, cache).numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_diffusion_gemma_runs_in_half_precision_on_the_cpu(gemma_folder, word_tokenizer, monkeypatch, dtype):
    """MLX's CPU GatherMM is float32-only: unquantized experts of a bf16 or fp16 model must still run, and
    land as close to the float32 logits as transformers' own model in that dtype does (within 2x)."""
    half, _ = load(str(gemma_folder))
    half.set_dtype(getattr(mx, dtype))
    mx.random.seed(0)
    tokens = _run(half, word_tokenizer, monkeypatch, max_tokens=16)
    assert len(tokens) == 16 and all(0 <= t < dg_ref.VOCAB for t in tokens)
    prompt, canvas = [5, 17, 42, 9, 3, 77], tokens[: dg_ref.CANVAS]
    cache = half.make_cache()
    half.encode(mx.array([prompt]), cache)
    ours = np.array(half.denoise(mx.array([canvas]), cache))
    full = _reference_denoise(gemma_folder, torch.float32, prompt, canvas)
    theirs = _reference_denoise(gemma_folder, getattr(torch, dtype), prompt, canvas)
    assert np.isfinite(ours).all()
    assert _relative_error(ours, full) <= 2 * _relative_error(theirs, full)
