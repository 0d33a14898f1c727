"""Chain against draft trees on the default model and its shipped drafter: tokens/s against our own AR in the same
run, acceptance (tokens committed per verify round), and whether every output equals AR's.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 MLX_DLLM_BLAS_PRELOADED=1 \\
        python benchmarks/tree_speculation.py gsm8k 5

A probe until `mlx-dllm benchmark` takes trees (issue 23): means over the first N prompts of a shipped set, 128
tokens each, greedy, after one warm-up run per configuration.
"""

import sys

import mlx_dllm
from mlx_dllm import default_model
from mlx_dllm.benchmark import prompts
from mlx_dllm.loading import load_pair

MAX_TOKENS = 128
BUDGETS = (4, 8, 16)


def main(prompt_set: str, count: int) -> None:
    target, tokenizer, draft = load_pair(default_model.NAME, default_model.default_drafter())
    ids = [prompts.encode(tokenizer, text) for text in prompts.read_prompts(prompt_set, count)]
    configs = {"ar": {"mode": "ar"}, "chain": {"draft_model": draft, "speculation": "chain"}}
    for budget in BUDGETS:
        configs[f"tree {budget}"] = {"draft_model": draft, "speculation": "tree", "tree_budget": budget}
    configs["auto"] = {"draft_model": draft}
    for options in configs.values():  # warm-up
        list(mlx_dllm.stream_generate(target, tokenizer, ids[0], 8, **options))
    rows = {}
    for label, options in configs.items():
        speeds, accepts, outputs = [], [], []
        for prompt in ids:
            responses = list(mlx_dllm.stream_generate(target, tokenizer, prompt, MAX_TOKENS, **options))
            speeds.append(responses[-1].generation_tps)
            accepts.append(responses[-1].acceptance_length or 1.0)
            if label == "auto":
                print(prompt_set, responses[-1].speculation, flush=True)
            outputs.append([token for response in responses for token in response.tokens])
        rows[label] = (sum(speeds) / len(speeds), sum(accepts) / len(accepts), outputs)
    ar_speed, _, ar_outputs = rows["ar"]
    print(f"| {prompt_set} | tok/s | vs our AR | acceptance | output = AR |")
    print("|---|---|---|---|---|")
    for label, (speed, accept, outputs) in rows.items():
        print(f"| {label} | {speed:.1f} | {speed / ar_speed:.2f}x | {accept:.2f} | {outputs == ar_outputs} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
