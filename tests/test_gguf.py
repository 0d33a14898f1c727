"""GGUF import: tiny llama and gemma3 files written with `gguf`, converted, and checked against transformers' own
GGUF loading (tokenizer ids, float32 logits, greedy text)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
gguf = pytest.importorskip("gguf")

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import mlx_dllm  # noqa: E402
from mlx_dllm.convert.gguf import open_gguf, read_tensor, sliding_period  # noqa: E402
from mlx_dllm.errors import DLLMError  # noqa: E402
from tests.reference import gguf_files  # noqa: E402
from tests.test_cli import assert_nothing_written, assert_user_error, run  # noqa: E402

WRITERS = {"llama": gguf_files.write_llama, "gemma3": gguf_files.write_gemma3}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv):\n    return sorted(set(argv))\nIn 1905 Einstein published four papers",
    "Numbers: 3.14159, 2718, 42 and -7. user: what is the capital of France? assistant: Paris. " * 2,
]
UNICODE = "héllo wörld — naïve café; Ελληνικά; русский; 日本語のテキスト; 中文; 한국어; 🙂🚀; tabs\tand  spaces\n"
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """arch -> (gguf file, float32 conversion folder)."""
    root = tmp_path_factory.mktemp("gguf")
    converted = {}
    for name, write in WRITERS.items():
        file = write(root / f"{name}.gguf")
        converted[name] = (file, mlx_dllm.convert(file, root / f"{name}_mlx", dtype="float32"))
    return converted


def reference_model(file: Path):
    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()


def reference_tokenizer(file: Path):
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def varied_text(reference, minimum_bytes: int = 100_000):
    """Code (the stdlib's own sources), prose (their docstrings and comments), Unicode and chat-formatted turns."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces = []
    for module in ("textwrap.py", "json/decoder.py", "argparse.py", "difflib.py", "fractions.py"):
        pieces += (stdlib / module).read_text(encoding="utf-8").split("\n\n")
    pieces += [UNICODE * 3] * 20
    turns = [{"role": "user", "content": UNICODE}, {"role": "assistant", "content": PROMPTS[1]}]
    pieces += [reference.apply_chat_template(turns, tokenize=False)] * 20
    chunks, size = [], 0
    for piece in pieces:
        chunks.append(piece)
        size += len(piece.encode("utf-8"))
    assert size >= minimum_bytes
    return chunks


@pytest.mark.parametrize("arch", WRITERS)
def test_tokenizer_ids_match_transformers(files, arch):
    file, folder = files[arch]
    reference = reference_tokenizer(file)
    _, tokenizer = mlx_dllm.load(str(folder))
    mismatches = [text for text in varied_text(reference) if tokenizer.encode(text) != reference.encode(text)]
    assert mismatches == []
    assert tokenizer.eos_token_id == reference.eos_token_id and tokenizer.bos_token == reference.bos_token
    turns = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == reference.apply_chat_template(turns, tokenize=False)


@pytest.mark.parametrize("arch", WRITERS)
def test_logits_match_transformers_in_float32(files, arch):
    file, folder = files[arch]
    reference, tokenizer = reference_model(file), reference_tokenizer(file)
    model, _ = mlx_dllm.load(str(folder))
    for prompt in PROMPTS:  # the longer prompts pass gemma3's 8-token window
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        logits = np.array(model(mx.array([ids]))[0])
        assert logits.dtype == np.float32
        assert np.abs(logits - expected).max() < LOGIT_TOLERANCE, (prompt, np.abs(logits - expected).max())


@pytest.mark.parametrize("arch", WRITERS)
def test_greedy_64_tokens_match_transformers(files, arch):
    file, folder = files[arch]
    reference, tokenizer = reference_model(file), reference_tokenizer(file)
    model, _ = mlx_dllm.load(str(folder))
    prompt = tokenizer.encode(PROMPTS[0])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(64):  # no cache on the reference side: each step is a full forward
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    steps = generate_step(mx.array(prompt), model, max_tokens=64, sampler=lambda logits: mx.argmax(logits, axis=-1))
    assert [int(token) for token, _ in steps] == ids[len(prompt) :]



def test_gemma3_embedding_scale_is_rounded_to_bfloat16_as_mlx_lm_does(tmp_path):
    """The one deliberate difference from transformers: mlx-lm's gemma3 scales embeddings by sqrt(hidden) rounded
    to bfloat16 (the value the bfloat16 original computes), transformers by the float32 sqrt. At hidden 96 the two
    differ (9.8125 vs 9.7980; the other tests' 64 gives an exact 8); with the rounded scale the weights agree."""
    file = gguf_files.write_gemma3(tmp_path / "g.gguf", hidden_size=96)
    model, _ = mlx_dllm.load(str(mlx_dllm.convert(file, tmp_path / "mlx", dtype="float32")))
    reference, tokenizer = reference_model(file), reference_tokenizer(file)
    ids = tokenizer.encode(PROMPTS[2])
    logits = np.array(model(mx.array([ids]))[0])

    def reference_logits():
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0].numpy()

    assert np.abs(logits - reference_logits()).max() > 10 * LOGIT_TOLERANCE
    scale = reference.model.embed_tokens.embed_scale
    scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))
    assert np.abs(logits - reference_logits()).max() < LOGIT_TOLERANCE

def test_kept_types_stay_quantized_and_others_are_dequantized(files):
    config = mlx_dllm.configs.read_json(files["llama"][1] / "config.json")
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 among Q4_0/Q4_1
    weights = mx.load(str(files["llama"][1] / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32  # Q4_0
    assert weights["model.layers.0.self_attn.k_proj.weight"].dtype == mx.uint32  # Q4_1
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32  # Q5_0: dequantized
    assert "model.layers.0.mlp.down_proj.scales" not in weights


def test_dequantize_stores_the_kept_types_as_floats_with_the_same_logits(files, tmp_path):
    """-d, as mlx_lm.convert's: a float32 baseline of a Q4_0/Q4_1/Q8_0 file, computing what the packed one does."""
    file, packed = files["llama"]
    out = tmp_path / "f32"
    result = run("convert", "--hf-path", file, "--mlx-path", out, "--dtype", "float32", "-d")
    assert result.exit_code == 0, result.output
    assert "quantization" not in mlx_dllm.configs.read_json(out / "config.json")
    weights = mx.load(str(out / "model.safetensors"))
    assert all(value.dtype == mx.float32 for value in weights.values()) and not any(".scales" in n for n in weights)
    ids = mx.array([[5, 17, 42, 9, 100]])
    logits = [mlx_dllm.load(str(folder))[0](ids) for folder in (packed, out)]
    assert mx.abs(logits[0] - logits[1]).max().item() < 1e-4
    result = run("convert", "--hf-path", packed, "--mlx-path", tmp_path / "x", "-d")
    assert_user_error(result, "--dequantize applies to GGUF files")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_affine_repacking_equals_mx_load(tmp_path, kind):
    """MLX's own GGUF reader gives the same affine weight, scales and biases, bit for bit."""
    file = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    value = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    writer.add_tensor("blk.0.attn_v.weight", gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    gguf_files.finish(writer)
    expected = mx.load(str(file))
    ours = read_tensor(open_gguf(file).tensors[0])
    assert sorted(ours) == sorted(expected)
    for name, array in ours.items():
        assert array.dtype == expected[name].dtype and mx.array_equal(array, expected[name]).item(), name


def test_cli_converts_with_requantization_and_generates(files, tmp_path):
    out = tmp_path / "q"
    result = run("convert", "--hf-path", files["gemma3"][0], "--mlx-path", out, "-q", "--q-group-size", "32")
    assert result.exit_code == 0, result.output
    quantization = mlx_dllm.configs.read_json(out / "config.json")["quantization"]
    assert quantization["bits"] == 8  # the Q8_0 embedding and V projections stay as they were
    assert quantization["model.layers.0.self_attn.q_proj"]["bits"] == 4  # Q5_0, dequantized, then quantized by -q
    result = run("generate", "--model", out, "-p", "hi", "-m", 4)
    assert result.exit_code == 0 and "Generation: " in result.stdout, result.output


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    file = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(file), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    gguf_files.finish(writer)
    out = tmp_path / "out" / "m"
    os.makedirs(out.parent)
    result = run("convert", "--hf-path", file, "--mlx-path", out)
    assert_user_error(result, "GGUF architecture 'qwen2' is not supported")
    assert_nothing_written(out)


def test_missing_and_truncated_files_are_one_error(files, tmp_path):
    out = tmp_path / "out" / "m"
    os.makedirs(out.parent)
    assert_user_error(run("convert", "--hf-path", tmp_path / "none.gguf", "--mlx-path", out), "does not exist")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(files["llama"][0].read_bytes()[:5000])
    assert_user_error(run("convert", "--hf-path", truncated, "--mlx-path", out), "cannot read cut.gguf as GGUF")
    assert_nothing_written(out)


def test_sliding_pattern_as_a_period_or_a_per_layer_list():
    assert sliding_period(6, {"num_hidden_layers": 7}) == 6
    assert sliding_period([True] * 5 + [False] + [True], {"num_hidden_layers": 7}) == 6
    with pytest.raises(DLLMError, match="not periodic"):
        sliding_period([True, False, False, True], {"num_hidden_layers": 4})


def test_files_beside_the_gguf_are_not_read_into_the_tokenizer(files, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    file = folder / "llama.gguf"
    file.write_bytes(files["llama"][0].read_bytes())
    (folder / "tokenizer_config.json").write_text('{"chat_template": "not the GGUF template", "eos_token": "x"}')
    out = mlx_dllm.convert(file, tmp_path / "out")
    _, tokenizer = mlx_dllm.load(str(out))
    assert tokenizer.chat_template == gguf_files.CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"


def test_rows_that_heads_cannot_split_are_one_error():
    from mlx_dllm.convert.gguf import unpermute_rows

    with pytest.raises(DLLMError, match="6 rows, which 4 heads cannot split"):
        unpermute_rows(mx.zeros((6, 8)), 4)


@pytest.mark.parametrize("arch", sorted(WRITERS))
def test_conversion_works_without_torch(files, tmp_path, arch):
    """torch is a test dependency only: a user's install has none (sys.modules None makes find_spec say so too)."""
    out = tmp_path / "out"
    script = "import sys; sys.modules['torch'] = None; import mlx_dllm; mlx_dllm.convert(sys.argv[1], sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", script, files[arch][0], out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer.json").read_text() == (files[arch][1] / "tokenizer.json").read_text()
