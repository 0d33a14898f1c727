"""Host time of the Nemotron self-speculative modes: the share of wall time spent outside model forwards.

    python benchmarks/nemotron_host_time.py [--hidden 256] [--vocab 32768] [--max-tokens 128] [--repeats 3]

Two numbers per mode on a tiny random model (greedy, the strategy called directly, no detokenizer):
- `outside_share`: an instrumented run in which every model and head call is evaluated on the spot and timed;
  the rest of the wall time is sampling, acceptance, host syncs and Python (median over repeats);
- `ms_per_token`: the plain, uninstrumented run, where queued forwards overlap the host work (median).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_dllm.benchmark.overhead import outside_share
from mlx_dllm.models.nemotron_diffusion import LoRA, Model, ModelArgs
from mlx_dllm.sampler.common import Stats, make_token_selector
from mlx_dllm.sampler.linear_spec import generate_linear_spec
from mlx_dllm.sampler.quadratic_spec import generate_quadratic_spec

MODES = {"linear-spec": (generate_linear_spec, 8), "quadratic-spec": (generate_quadratic_spec, 4)}


def tiny_model(hidden: int, vocab: int) -> Model:
    mx.random.seed(0)
    heads = 4
    args = ModelArgs(
        hidden_size=hidden,
        num_hidden_layers=4,
        intermediate_size=2 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        mask_token_id=100,
    )
    model = Model(args)
    for layer in model.layers:
        layer.self_attn.lora = LoRA(mx.random.normal((8, hidden)) * 0.05, mx.random.normal((hidden, 8)) * 0.05, 4.0)
    mx.eval(model.parameters())
    return model


def run(model, mode: str, prompt: mx.array, max_tokens: int) -> float:
    strategy, block = MODES[mode]
    start = time.perf_counter()
    options = {"block_length": block}
    select = make_token_selector()
    chunks = strategy(model, prompt, select=select, stats=Stats(), max_tokens=max_tokens, options=options)
    produced = sum(len(chunk) for chunk in chunks)
    assert produced >= max_tokens
    return time.perf_counter() - start


def measure(model, mode: str, prompt: mx.array, max_tokens: int, repeats: int) -> dict:
    run(model, mode, prompt, max_tokens)  # warm-up
    plain = [run(model, mode, prompt, max_tokens) for _ in range(repeats)]
    shares = [outside_share(lambda: run(model, mode, prompt, max_tokens), model, None) for _ in range(repeats)]
    return {
        "outside_share": round(statistics.median(shares), 3),
        "ms_per_token": round(1e3 * statistics.median(plain) / max_tokens, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = tiny_model(args.hidden, args.vocab)
    prompt = mx.array([5, 17, 42, 9, 3, 77, 120, 8, 64, 33, 2, 19, 250, 31])
    results = {mode: measure(model, mode, prompt, args.max_tokens, args.repeats) for mode in MODES}
    for mode, row in results.items():
        print(f"{mode:>15}: outside forwards {100 * row['outside_share']:5.1f}%   {row['ms_per_token']:.2f} ms/token")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
